"""SAE corpora, in-model evaluation, latent ranking and the `avec sae` commands (tiny only)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from avec.cli.main import main
from avec.data import ContrastPair, save_jsonl_pairs
from avec.models import Model
from avec.sae import SAEConfig, SparseAutoencoder, load_sae
from avec.sae.corpus import collect_activations, load_texts, sample_corpus, template_skips
from avec.sae.evaluate import latent_top_examples, rank_latents, reconstruction_loss_increase

TEXTS = ["hello world, this is a test", "short",
         "another text that is a bit longer than the others in this list", "a",
         "the quick brown fox jumps over the lazy dog"]
POSITIVE = ["abc ~ def", "the ~ cat sat", "hello there ~", "x ~ y ~ z"]
NEGATIVE = ["abc + def", "the dog sat", "hello there !", "x y z w"]


@pytest.fixture(scope="module")
def llama(tiny_llama: Model) -> Model:
    return tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, llama):
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    llama.hf.save_pretrained(path)
    llama.tokenizer.save_pretrained(path)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ---- corpus ---------------------------------------------------------------------------------
def test_collect_activations_rows_and_batch_invariance(llama):
    ids = llama.encode(TEXTS)
    acts = collect_activations(llama, TEXTS, 1, batch_size=2)
    assert acts.dtype == torch.float32 and acts.device.type == "cpu"
    assert acts.shape == (sum(len(x) - 1 for x in ids), llama.d_model)  # "a" gives no row
    one_by_one = torch.cat([collect_activations(llama, [t], 1, batch_size=1)
                            for t in TEXTS if len(llama.encode([t])[0]) > 1])
    torch.testing.assert_close(acts, one_by_one, atol=1e-5, rtol=1e-5)
    # the rows are block 1's output (= HF hidden_states[2]) from token 1 on, in input order
    with torch.no_grad():
        ref = llama.hf(torch.tensor([ids[0]]), output_hidden_states=True).hidden_states[2][0]
    torch.testing.assert_close(acts[: len(ids[0]) - 1], ref[1:], atol=1e-5, rtol=1e-5)
    capped = collect_activations(llama, TEXTS, 1, max_tokens=4, skip_first=0)
    assert capped.shape[0] == sum(min(len(x), 4) for x in ids)


def test_template_head_is_skipped_per_text(llama):
    templated = [llama.chat_prompt("Name a colour.") + "Blue.", llama.chat_prompt("Hi") + "Hello"]
    texts = templated + ["plain text without a template"]
    skips = template_skips(llama, texts)
    assert llama.has_chat_template and skips[0] == skips[1] > 1 and skips[2] == 1
    ids = llama.encode(texts)
    # the skipped head is the same tokens in both templated texts; what follows differs
    assert ids[0][:skips[0]] == ids[1][:skips[1]] and ids[0][skips[0]] != ids[1][skips[1]]
    acts = collect_activations(llama, texts, 1, skip_first=skips)
    assert acts.shape[0] == sum(len(x) - k for x, k in zip(ids, skips))
    with pytest.raises(ValueError, match="one per text"):
        collect_activations(llama, texts, 1, skip_first=[1, 1])


def test_load_texts_splits_paragraphs(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first doc\nstill first\n\nsecond doc\n\n\n", encoding="utf-8")
    assert load_texts([path]) == ["first doc\nstill first", "second doc"]


def test_sample_corpus_is_seeded(llama):
    a = sample_corpus(llama, 5, 6, seed=0, batch_size=3)
    assert len(a) == 5 and all(isinstance(t, str) and t for t in a)
    assert sample_corpus(llama, 5, 6, seed=0, batch_size=3) == a
    assert sample_corpus(llama, 5, 6, seed=1, batch_size=3) != a
    assert a[0].startswith(sample_corpus(llama, 1, 6, seed=0)[0][:10])  # same prompt order


# ---- evaluation -----------------------------------------------------------------------------
def identity_sae(d: int, layer: int) -> SparseAutoencoder:
    """relu(x) - relu(-x) = x: a ReLU SAE with 2d latents that reconstructs exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, activation="relu",
                                      apply_b_dec_to_input=False, hook_layer=layer))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def constant_sae(value: torch.Tensor, layer: int) -> SparseAutoencoder:
    """An SAE none of whose latents ever fires: it reconstructs every token as ``value``."""
    sae = SparseAutoencoder(SAEConfig(d_in=value.shape[0], d_sae=4, activation="relu",
                                      hook_layer=layer))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.copy_(value)
    return sae


def manual_ce(model: Model, texts: list[str], layer: int, zero: bool) -> float:
    """One text at a time: CE of tokens 2.. with block ``layer``'s output zeroed from token 1."""
    total, n = 0.0, 0

    def hook(_m, _a, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = torch.cat([hidden[:, :1], torch.zeros_like(hidden[:, 1:])], 1)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    for ids in model.encode(texts):
        if len(ids) < 3:
            continue
        handle = model.blocks[layer].register_forward_hook(hook) if zero else None
        with torch.no_grad():
            logits = model.hf(torch.tensor([ids])).logits[0]
        if handle:
            handle.remove()
        total += float(F.cross_entropy(logits[1:-1], torch.tensor(ids[2:]), reduction="sum"))
        n += len(ids) - 2
    return total / n


def test_reconstruction_loss_increase(llama):
    layer = 1
    perfect = reconstruction_loss_increase(llama, identity_sae(llama.d_model, layer), layer,
                                           TEXTS, batch_size=2)
    ids = llama.encode(TEXTS)
    assert perfect["n_predictions"] == sum(len(x) - 2 for x in ids if len(x) >= 3)
    assert perfect["ce_sae"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    assert perfect["ce_increase"] == pytest.approx(0.0, abs=1e-5)
    assert perfect["fraction_recovered"] == pytest.approx(1.0, abs=1e-4)
    # the references are real splices: checked against a one-text-at-a-time computation
    assert perfect["ce_clean"] == pytest.approx(manual_ce(llama, TEXTS, layer, False), abs=1e-4)
    assert perfect["ce_zero_ablation"] == pytest.approx(manual_ce(llama, TEXTS, layer, True),
                                                        abs=1e-4)
    assert abs(perfect["ce_zero_ablation"] - perfect["ce_clean"]) > 1e-3
    # an SAE that outputs the mean activation scores like mean ablation: nothing recovered
    mean = collect_activations(llama, TEXTS, layer).mean(0)
    flat = reconstruction_loss_increase(llama, constant_sae(mean, layer), layer, TEXTS)
    assert flat["ce_sae"] == pytest.approx(flat["ce_mean_ablation"], abs=1e-4)
    assert flat["fraction_recovered_mean"] == pytest.approx(0.0, abs=1e-3)
    assert flat["ce_clean"] == pytest.approx(perfect["ce_clean"], abs=1e-5)
    # per-text skips: only predictions from each text's own skip + 1 on are counted
    skips = [1, 3, 2, 1, 4]
    per_text = reconstruction_loss_increase(llama, identity_sae(llama.d_model, layer), layer,
                                            TEXTS, skip_first=skips, batch_size=2)
    assert per_text["n_predictions"] == sum(len(x) - k - 1 for x, k in zip(ids, skips)
                                            if len(x) >= k + 2)
    assert per_text["ce_increase"] == pytest.approx(0.0, abs=1e-5)


def marker_sae(model: Model, layer: int = 0) -> SparseAutoencoder:
    """Latent 2 fires only on '~' tokens; latent 0 is 100 on every token; 1 and 3 never fire."""
    texts = POSITIVE + NEGATIVE
    flat = torch.tensor([t for x in model.encode(texts) for t in x])
    marker = flat == model.encode(["~"])[0][0]
    acts = collect_activations(model, texts, layer, skip_first=0)
    direction = acts[marker].mean(0) - acts[~marker].mean(0)
    direction /= direction.norm()
    proj = acts @ direction
    assert proj[marker].min() > proj[~marker].max(), "'~' is not separable at this layer"
    sae = SparseAutoencoder(SAEConfig(d_in=model.d_model, d_sae=4, activation="relu",
                                      apply_b_dec_to_input=False, hook_layer=layer))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 2] = direction
        sae.b_enc.copy_(torch.tensor([100.0, -1.0, -float(proj[~marker].max()), -1.0]))
        sae.b_dec.zero_()
    return sae


def test_rank_latents_finds_the_marker_latent(llama):
    sae = marker_sae(llama)
    rows = rank_latents(llama, sae, 0, POSITIVE, NEGATIVE)
    assert rows[0]["latent"] == 2 and len(rows) == 4
    top = rows[0]
    assert top["mean_negative"] == 0.0 and top["mean_positive"] > 0
    assert top["difference"] == pytest.approx(top["mean_positive"] - top["mean_negative"])
    assert top["fire_rate_positive"] == 1.0 and top["fire_rate_negative"] == 0.0
    const = next(r for r in rows if r["latent"] == 0)
    assert const["difference"] == pytest.approx(0.0, abs=1e-4)
    alone = rank_latents(llama, sae, 0, POSITIVE, top=2)  # no negatives: by mean activation
    assert [r["latent"] for r in alone] == [0, 2] and alone[0]["mean_negative"] is None
    assert alone[0]["mean_positive"] == pytest.approx(100.0)
    last = rank_latents(llama, sae, 0, ["abc ~", "x y ~"], ["abc ~ d", "x y"], position="last")
    assert last[0]["latent"] == 2 and last[0]["mean_negative"] == 0.0
    examples = latent_top_examples(llama, sae, 0, NEGATIVE + POSITIVE, [2, 1], k=3)
    assert examples[1] == []  # never fires
    assert len(examples[2]) == 3
    assert all(e.text_index >= len(NEGATIVE) and e.tokens[e.token_index] == "~"
               for e in examples[2])


def test_selective_ranking_demotes_a_latent_that_fires_everywhere():
    from avec.sae.evaluate import latent_scores

    # latent 0: a "style" latent on every text, much stronger on the positives;
    # latent 1: a concept latent, weaker, but only on the positives
    pos = torch.tensor([[5.0, 1.0, 0.0], [5.0, 1.0, 0.0], [5.0, 0.0, 0.0], [5.0, 1.0, 0.0]])
    neg = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.5], [1.0, 0.0, 0.0]])
    diff = latent_scores(pos, neg, "difference")
    sel = latent_scores(pos, neg, "selective")
    assert int(diff.argmax()) == 0 and int(sel.argmax()) == 1
    assert sel[1] == pytest.approx(0.75 * 0.75)  # difference 0.75 x firing rates 0.75 - 0
    assert sel[0] == 0.0 and sel[2] == 0.0  # same firing rate; more on the negatives
    with pytest.raises(ValueError, match="unknown ranking"):
        latent_scores(pos, neg, "auroc")  # type: ignore[arg-type]


# ---- the `avec sae` commands ----------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    """An SAE trained by `avec sae train --sample` (and its JSON summary)."""
    out = tmp_path_factory.mktemp("sae") / "sae"
    code = main(["sae", "train", "--model", str(model_dir), "--layer", "1", "--sample", "8",
                 "--sample-tokens", "12", "--latents", "64", "--k", "4", "--steps", "30",
                 "--batch-size", "32", "--holdout", "0.25", "--seed", "3", "-o", str(out),
                 "--json"])
    assert code == 0
    return out


def test_sae_train_writes_sae_and_record(trained):
    assert {p.name for p in trained.iterdir()} == {"cfg.json", "sae_weights.safetensors",
                                                    "train.json", "corpus.jsonl"}
    sae = load_sae(trained)
    assert (sae.d_in, sae.d_sae, sae.cfg.k, sae.cfg.avec_layer) == (32, 64, 4, 1)
    assert sae.cfg.model_name == "tiny-llama"
    record = json.loads((trained / "train.json").read_text())
    assert record["corpus"] == {"source": "sampled", "seed": 3, "temperature": 1.0,
                                "max_new_tokens": 12, "file": "corpus.jsonl", "n_sampled": 8,
                                "prompts": "built-in", "n_texts": 8, "n_train": 6,
                                "n_heldout": 2}
    assert record["steps"] == 30 and record["n_tokens"] > 0 and record["config"]["k"] == 4
    metrics = record["metrics"]
    assert set(metrics) == {"train", "heldout", "ce_loss"}
    for key in ("fve", "l0", "dead_latents"):
        assert key in metrics["train"] and key in metrics["heldout"]
    assert metrics["train"]["l0"] <= 4
    assert metrics["ce_loss"]["ce_sae"] > 0 and "fraction_recovered" in metrics["ce_loss"]
    seconds = record["seconds"]
    assert seconds["sample"] > 0 and seconds["total"] >= seconds["sample"] + seconds["train"]
    assert len((trained / "corpus.jsonl").read_text().splitlines()) == 8


def test_sae_train_from_texts(capsys, tmp_path, model_dir):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(TEXTS), encoding="utf-8")
    out = tmp_path / "sae"
    code, stdout, _ = run(capsys, "sae", "train", "--model", str(model_dir), "--layer", "2",
                          "--texts", str(docs), "--latents", "32", "--k", "2", "--epochs", "2",
                          "--batch-size", "16", "--holdout", "0", "-o", str(out), "--json")
    assert code == 0
    summary = json.loads(stdout)
    assert summary["corpus"]["source"] == "files" and summary["corpus"]["n_train"] == 5
    assert summary["metrics"]["ce_loss"] is None and summary["layer"] == 2
    assert not (out / "corpus.jsonl").exists()
    one = tmp_path / "one.txt"
    one.write_text("only one document", encoding="utf-8")
    code, _, err = run(capsys, "sae", "train", "--model", str(model_dir), "--layer", "1",
                       "--texts", str(one), "-o", str(tmp_path / "x"))
    assert code == 2 and "--holdout 0" in err


def test_sae_train_files_plus_sampled_from_given_prompts(capsys, tmp_path, model_dir):
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(TEXTS), encoding="utf-8")
    seeds = tmp_path / "seeds.json"
    seeds.write_text(json.dumps([{"instruction": "Name a colour."},
                                 {"instruction": "Count to three."}]), encoding="utf-8")
    out = tmp_path / "sae"
    code, stdout, _ = run(capsys, "sae", "train", "--model", str(model_dir), "--layer", "1",
                          "--texts", str(docs), "--sample", "3", "--prompts", str(seeds),
                          "--sample-tokens", "6", "--latents", "32", "--k", "2", "--steps",
                          "5", "--holdout", "0", "-o", str(out), "--json")
    assert code == 0
    corpus = json.loads(stdout)["corpus"]
    assert corpus["source"] == "files+sampled" and corpus["prompts"] == [str(seeds)]
    assert (corpus["n_file_texts"], corpus["n_sampled"], corpus["n_texts"]) == (5, 3, 8)
    sampled = [json.loads(line)["text"] for line in
               (out / "corpus.jsonl").read_text().splitlines()]
    assert len(sampled) == 3  # only the model's texts are saved; the files are referenced
    assert all("Name a colour." in t or "Count to three." in t for t in sampled)
    code, _, err = run(capsys, "sae", "train", "--model", str(model_dir), "--layer", "1",
                       "--texts", str(docs), "--prompts", str(seeds), "-o", str(tmp_path / "y"))
    assert code == 2 and "--sample" in err


def test_sae_features(capsys, tmp_path, model_dir, trained):
    pairs = tmp_path / "pairs.jsonl"
    save_jsonl_pairs([ContrastPair(p, n) for p, n in zip(POSITIVE, NEGATIVE)], pairs)
    out = tmp_path / "features"
    code, stdout, _ = run(capsys, "sae", "features", "--model", str(model_dir), "--sae",
                          str(trained), "--pairs", str(pairs), "--top", "3", "--examples", "2",
                          "--rank", "difference", "-o", str(out), "--json")
    assert code == 0
    result = json.loads(stdout)
    assert result == json.loads((out / "features.json").read_text())
    assert result["layer"] == 1 and result["ranked_by"] == "mean_positive - mean_negative"
    rows = result["latents"]
    assert len(rows) == 3 and [r["score"] for r in rows] == sorted(
        (r["score"] for r in rows), reverse=True)
    for row in rows:
        page = out / row["html"]
        assert page.is_file() and f"Latent {row['latent']}" in page.read_text()
        assert len(row["top_examples"]) <= 2
    texts = tmp_path / "pos.txt"
    texts.write_text("\n\n".join(POSITIVE), encoding="utf-8")
    code, stdout, _ = run(capsys, "sae", "features", "--model", str(model_dir), "--sae",
                          str(trained), "--texts", str(texts), "--position", "last",
                          "--top", "2", "-o", str(tmp_path / "f2"))
    assert code == 0 and "top 2 latents at layer 1 (mean_positive)" in stdout


def test_sae_steer(capsys, model_dir, trained):
    base = ["sae", "steer", "--model", str(model_dir), "--sae", str(trained), "--latent", "5",
            "--prompt", "Tell me", "--prompt", "hi", "--max-new-tokens", "6", "--json"]
    code, stdout, _ = run(capsys, *base, "--add", "0")
    assert code == 0
    result = json.loads(stdout)
    assert (result["op"], result["value"], result["layer"]) == ("add", 0.0, 1)
    assert [r["prompt"] for r in result["completions"]] == ["Tell me", "hi"]
    assert all(r["steered"] == r["unsteered"] for r in result["completions"])
    code, stdout, _ = run(capsys, *base, "--add", "40")
    assert code == 0
    assert any(r["steered"] != r["unsteered"] for r in json.loads(stdout)["completions"])
    code, stdout, _ = run(capsys, *base[:-1], "--clamp", "30")
    assert code == 0 and "unsteered:" in stdout and "clamp latent 5 = 30" in stdout
    code, _, err = run(capsys, *base, "--latent", "999", "--add", "1")
    assert code == 2 and "out of range" in err
