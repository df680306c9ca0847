"""The fine-tuning rows of the comparison (lora, lora+mean_diff) on a tiny model: their KL and
effect arithmetic, the combination's starting point, the costs, and that the base model is
never changed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from avec.data import ContrastPair
from avec.data.demo import CONCEPT_PROMPTS, NEUTRAL_PROMPTS
from avec.evaluate.ab import ABItem, ab_variants
from avec.generation.hf import format_prompt
from avec.studies.compare import CompareSettings, Task, compare, write_outputs
from avec.studies.compare.cost import Meter
from avec.studies.compare.finetuned import (TRAIN_PROMPTS, ScaledUpdate, lora_config,
                                            lora_scales, training_examples)
from avec.studies.refusal.finetune import finetune

AB_PAIRS = [ContrastPair(f"({a})", f"({b})", prompt=f"Question {i}?\n(A) yes\n(B) no")
            for i, (a, b) in enumerate(["AB", "BA"] * 4)]
ITEMS = [ABItem("Good?\n(A) yes\n(B) no", "A", "B"), ABItem("Bad?\n(A) yes\n(B) no", "B", "A")]
SENTENCES = [ContrastPair(f"I love thing {i}!", f"I hate thing {i}.") for i in range(6)]
KL_PROMPTS = ["hi", "tell me a story"]


def logits(model, prompts):
    return [model.hf(torch.tensor([format_prompt(model, p)[0]])).logits[0].detach()
            for p in prompts]


def kl_by_hand(base, tuned, prompts):
    """Mean over prompts of KL(base || tuned) of the next-token distribution after the prompt."""
    total = 0.0
    for p, q in zip(logits(base, prompts), logits(tuned, prompts)):
        lp, lq = p[-1].log_softmax(-1), q[-1].log_softmax(-1)
        total += float((lp.exp() * (lp - lq)).sum())
    return total / len(prompts)


def test_lora_rows_ab_arithmetic(tiny_llama):
    before = logits(tiny_llama, KL_PROMPTS)
    settings = CompareSettings(layer=1, methods=("mean_diff", "lora", "lora+mean_diff"),
                               n_pairs=(2, 4), seeds=1, coefs=(1.0, 4.0), kl_budget=0.1,
                               chat=True, position="ab_letter", lora_steps=6,
                               lora_lr=5e-3, lora_scales=(0.25, 1.0, 3.0))
    res = compare(tiny_llama, AB_PAIRS, Task(items=ITEMS), settings, KL_PROMPTS)
    after = logits(tiny_llama, KL_PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # the base is untouched

    lora = {r["n_pairs"]: r for r in res.rows if r["method"] == "lora"}
    both = {r["n_pairs"]: r for r in res.rows if r["method"] == "lora+mean_diff"}
    assert sorted(lora) == sorted(both) == [2, 4]
    scales = [0.0, 0.25, 1.0, 3.0]
    for n, row in lora.items():
        assert row["coefs"] == scales and row["knob"] == "lora_scale"
        assert row["effects"][0] == res.baseline and row["kl"][0] == 0.0  # scale 0 = base
        # the best effect is the largest within the KL budget
        ok = [e - res.baseline for e, k in zip(row["effects"], row["kl"]) if k <= 0.1]
        assert row["best_effect"] == max(ok)
        assert row["trained_kl"] == row["kl"][2]
        assert row["trained_effect"] == row["effects"][2] - res.baseline
        # retrain the same cell by hand (deterministic): its KL and p(match) at scales 1 and 3
        examples = training_examples(AB_PAIRS, row["pairs"])
        assert [(e.instruction, e.response) for e in examples] == [
            (AB_PAIRS[i].prompt, AB_PAIRS[i].positive) for i in row["pairs"]]
        tuned = finetune(tiny_llama, examples, lora_config(settings, n, 0), progress=False)
        assert len(tuned.losses) == 6 == row["finetune"]["steps"]
        assert row["kl"][2] == pytest.approx(kl_by_hand(tiny_llama, tuned.model, KL_PROMPTS),
                                             rel=1e-4, abs=1e-7)
        p_match = float(ab_variants(tuned.model, ITEMS, [(None, 1)], [0.0]).mean())
        assert row["effects"][2] == pytest.approx(p_match, abs=1e-6)
        with torch.no_grad():  # scale 3: W0 + 3 (W1 - W0), extrapolated by hand
            base = dict(tiny_llama.hf.named_parameters())
            for name, p in tuned.model.hf.named_parameters():
                p.copy_(base[name] + 3.0 * (p - base[name]))
        assert row["kl"][3] == pytest.approx(kl_by_hand(tiny_llama, tuned.model, KL_PROMPTS),
                                             rel=1e-3, abs=1e-6)
        assert row["kl"][3] > row["kl"][2] > row["kl"][1] > 0

        # the combination: scale x coefficient, KL against the base
        combo = both[n]
        assert combo["pairs"] == row["pairs"] and combo["knob"] == "lora_scale x coef"
        grid = [tuple(g) for g in combo["grid"]]
        kept = [sc for sc, k in zip(scales, row["kl"]) if k <= 0.1]  # alone within budget
        assert 0.25 in kept and 1.0 not in kept  # the test exercises both branches
        assert combo["pruned_scales"] == [sc for sc in scales if sc not in kept]
        assert grid == [(sc, c) for sc in kept for c in (0.0, 1.0, 4.0)]
        for sc in kept:  # coefficient 0: the lora row's model at that scale
            i = scales.index(sc)
            at = grid.index((sc, 0.0))
            assert combo["effects"][at] == pytest.approx(row["effects"][i], abs=1e-6)
            assert combo["kl"][at] == pytest.approx(row["kl"][i], rel=1e-4, abs=1e-6)
        md = next(r for r in res.rows if r["method"] == "mean_diff" and r["n_pairs"] == n)
        for j, c in enumerate((0.0, 1.0, 4.0)):  # scale 0: steering alone on the base model
            at = grid.index((0.0, c))
            assert combo["effects"][at] == pytest.approx(md["effects"][j], abs=1e-4)
            assert combo["kl"][at] == pytest.approx(md["kl"][j], rel=1e-3, abs=1e-5)
        ok = [(e - res.baseline, g) for e, k, g in zip(combo["effects"], combo["kl"], grid)
              if k <= 0.1 or g == (0.0, 0.0)]
        top = max(ok, key=lambda x: x[0])
        assert combo["best_effect"] == top[0]
        assert (combo["best_scale"], combo["best_coef"]) == top[1]
        assert combo["best_effect"] >= max(row["best_effect"], md["best_effect"]) - 1e-4

        assert combo["cost"]["train_seconds"] == row["cost"]["seconds"] > 0
        assert combo["cost"]["seconds"] == pytest.approx(
            row["cost"]["seconds"] + combo["cost"]["extract_seconds"])
        assert combo["cost"]["cpu_seconds"] >= row["cost"]["cpu_seconds"] > 0
    steer = [r for r in res.rows if r["method"] == "mean_diff"]
    assert all(r["cost"]["seconds"] == pytest.approx(r["cost"]["read_seconds"]
                                                     + r["cost"]["fit_seconds"]) for r in steer)
    # a later comparison on the same model sees the base model, not a fine-tuned copy
    again = compare(tiny_llama, AB_PAIRS, Task(items=ITEMS),
                    CompareSettings(layer=1, methods=("mean_diff",), n_pairs=(2, 4), seeds=1,
                                    coefs=(1.0, 4.0), kl_budget=0.1, chat=True,
                                    position="ab_letter"), KL_PROMPTS)
    assert again.baseline == res.baseline
    assert [(r["effects"], r["kl"]) for r in again.rows] == [(r["effects"], r["kl"])
                                                            for r in steer]
    summary = {(s["method"], s["n_pairs"]): s for s in res.summary()}
    assert summary["lora", 2]["trained_kl_mean"] == lora[2]["trained_kl"]
    assert summary["lora", 2]["trained_within_budget"] == 0  # as trained: over the budget
    assert summary["lora+mean_diff", 4]["seconds_mean"] == both[4]["cost"]["seconds"]


def test_the_combination_steers_the_fine_tuned_model(tiny_llama):
    """lora+mean_diff at a scale s > 0: the model W0 + s (W1 - W0), steered by the mean
    difference of the same pairs read on *that* model at the common norm; rebuilt by hand."""
    from avec.data.templates import pair_texts
    from avec.directions.activations import read_activations
    from avec.evaluate.side_effects import kl_divergence, reference_logprobs
    from avec.vector import SteeringVector

    settings = CompareSettings(layer=1, methods=("lora+mean_diff",), n_pairs=(4,), seeds=1,
                               coefs=(2.0,), kl_budget=1e9, chat=True, position="ab_letter",
                               lora_steps=4, lora_lr=5e-3, lora_scales=(0.5,))
    res = compare(tiny_llama, AB_PAIRS, Task(items=ITEMS), settings, KL_PROMPTS)
    (combo,) = res.rows  # lora was not asked for: only the combination is reported
    assert combo["method"] == "lora+mean_diff" and combo["pruned_scales"] == []
    assert [tuple(g) for g in combo["grid"]] == [(s, c) for s in (0.0, 0.5, 1.0)
                                                 for c in (0.0, 2.0)]
    tuned = finetune(tiny_llama, training_examples(AB_PAIRS, combo["pairs"]),
                     lora_config(settings, 4, 0), progress=False).model
    base = dict(tiny_llama.hf.named_parameters())
    w1 = {k: v.detach().clone() for k, v in tuned.hf.named_parameters()}
    reference = reference_logprobs(tiny_llama, KL_PROMPTS)
    pos, neg = pair_texts([AB_PAIRS[i] for i in combo["pairs"]], tiny_llama, chat=True)
    for s in (0.0, 0.5, 1.0):
        with torch.no_grad():
            for name, p in tuned.hf.named_parameters():
                p.copy_(base[name] + s * (w1[name] - base[name]))
        acts = read_activations(tuned, pos + neg, [1], position="ab_letter")[1]
        direction = acts[:4].mean(0) - acts[4:].mean(0)
        vec = SteeringVector({1: direction * (res.common_norm / direction.norm())})
        p_match = ab_variants(tuned, ITEMS, [(vec, 1)], [0.0, 2.0]).mean(-1)[0]
        kls = kl_divergence(tuned, KL_PROMPTS, vec, 1, [0.0, 2.0], reference=reference)
        for j, c in enumerate((0.0, 2.0)):
            at = [tuple(g) for g in combo["grid"]].index((s, c))
            assert combo["effects"][at] == pytest.approx(float(p_match[j]), abs=1e-5)
            assert combo["kl"][at] == pytest.approx(kls[j], rel=1e-3, abs=1e-6)
    grid = [tuple(g) for g in combo["grid"]]
    assert combo["kl"][grid.index((1.0, 0.0))] > 0  # the fine-tune moved away from the base
    assert combo["effects"][0] == res.baseline and combo["kl"][0] == 0.0  # (0, 0): the base


def test_lora_rows_on_a_concept_task(tiny_llama, tmp_path):
    settings = CompareSettings(layer=1, methods=("mean_diff", "lora", "lora+mean_diff"),
                               n_pairs=(3,), seeds=2, coefs=(2.0,), lora_steps=3,
                               lora_scales=(1.0,), max_new_tokens=4)
    task = Task(prompts=["hi <b>", "yo"], keywords=["love"])
    res = compare(tiny_llama, SENTENCES, task, settings, KL_PROMPTS)
    lora = [r for r in res.rows if r["method"] == "lora"]
    assert len(lora) == 2 and all(r["coefs"] == [0.0, 1.0] for r in lora)
    for r in res.rows:
        assert len(r["best_completions"]) == 2 and r["cost"]["peak_mb"] >= 0
        assert r["cost"]["cpu_seconds"] >= 0
        assert r["cost"]["seconds"] > 0
    assert res.machine["torch_threads"] >= 1
    files = write_outputs(res, tmp_path)
    page = open(files["html"]).read()
    assert "lora+mean_diff" in page and "What obtaining it cost" in page
    data = json.loads(open(files["json"]).read())
    assert {s["method"] for s in data["summary"]} == {"mean_diff", "lora", "lora+mean_diff"}


def test_training_examples_and_steps():
    assert not set(TRAIN_PROMPTS) & (set(CONCEPT_PROMPTS) | set(NEUTRAL_PROMPTS))
    examples = training_examples(SENTENCES, [4, 0, 2])
    assert [e.response for e in examples] == ["I love thing 4!", "I love thing 0!",
                                              "I love thing 2!"]
    assert [e.instruction for e in examples] == TRAIN_PROMPTS[:3]
    skip = training_examples(SENTENCES, [1, 2], avoid=TRAIN_PROMPTS[:1])
    assert [e.instruction for e in skip] == TRAIN_PROMPTS[1:3]
    with pytest.raises(ValueError, match="training prompt"):
        training_examples(SENTENCES, [1], avoid=TRAIN_PROMPTS)
    settings = CompareSettings(layer=1)
    for n in (1, 3, 8, 32, 128, 256):
        c = lora_config(settings, n, seed=2)
        assert c.batch_size == min(8, n) and c.seed == 2
        steps = math.ceil(n / c.batch_size) * c.epochs
        assert steps == (16 if n <= 128 else 32)  # the same at every n, but at least one epoch
    assert lora_scales(CompareSettings(layer=1, lora_scales=(2.0, 0.5))) == [0.0, 0.5, 1.0, 2.0]


def test_scaled_update_interpolates_exactly(tiny_llama):
    from avec.studies.refusal.finetune import Example, FinetuneConfig

    tuned = finetune(tiny_llama, [Example("hi", "love")], FinetuneConfig(epochs=2, batch_size=1),
                     progress=False).model
    base = {k: v.clone() for k, v in tiny_llama.hf.state_dict().items()}
    w1 = {k: v.clone() for k, v in tuned.hf.state_dict().items()}
    update = ScaledUpdate(tiny_llama, tuned)
    assert update.changed and len(update.changed) < len(base)  # LoRA: block linears only
    update.set(1.0)
    assert update.trained is None  # as trained: nothing kept aside
    update.set(0.0)
    assert all(torch.equal(v, base[k]) for k, v in tuned.hf.state_dict().items())
    update.set(0.5)
    for k, v in tuned.hf.state_dict().items():
        assert torch.allclose(v, (base[k] + w1[k]) / 2, atol=1e-6)
    update.set(1.0)
    assert all(torch.equal(v, w1[k]) for k, v in tuned.hf.state_dict().items())
    assert all(torch.equal(v, base[k]) for k, v in tiny_llama.hf.state_dict().items())


def test_meter_sees_memory_that_is_made_resident():
    with Meter() as m:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MB, written so the pages are resident
        x += 1
    assert m.seconds > 0 and m.cpu_seconds > 0
    if m.method == "rss_sampled":
        assert 60 <= m.peak_mb < 200
    del x


def test_cli_accepts_the_fine_tuning_methods(capsys, tmp_path, model_dir):
    from avec.cli.compare import FINETUNE_METHODS as CLI_METHODS
    from avec.cli.main import main
    from avec.data import save_jsonl_pairs
    from avec.studies.compare import FINETUNE_METHODS

    assert CLI_METHODS == FINETUNE_METHODS
    pairs = tmp_path / "pairs.jsonl"
    save_jsonl_pairs(SENTENCES, pairs)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nhow are you\n")
    out_dir = tmp_path / "cmp"
    code = main(["compare", "--model", str(model_dir), "--pairs", str(pairs), "--keywords",
                 "love", "--layer", "1", "--n-pairs", "2", "--seeds", "1", "--coefs", "1",
                 "--methods", "mean_diff,lora,lora+mean_diff", "--lora-steps", "2",
                 "--lora-rank", "4", "--lora-lr", "0.01", "--lora-scales", "0.5",
                 "--max-new-tokens", "3", "--prompts", str(prompts), "-o", str(out_dir)])
    text = capsys.readouterr().out
    assert code == 0
    assert "lora+mean_diff" in text and "cost to obtain the intervention" in text
    data = json.loads((out_dir / "results.json").read_text())
    lora = next(r for r in data["rows"] if r["method"] == "lora")
    assert lora["coefs"] == [0.0, 0.5, 1.0] and lora["finetune"]["steps"] == 2
    assert lora["finetune"]["config"]["lora_rank"] == 4
    assert lora["finetune"]["config"]["learning_rate"] == 0.01
    for bad, says in [("mean_diff,lora2", "unknown method 'lora2'; choose from mean_diff"),
                      ("lora,lora", "names a method twice"),
                      (",", "no method given; choose from mean_diff")]:
        code = main(["compare", "--model", str(model_dir), "--pairs", str(pairs), "--keywords",
                     "love", "--methods", bad, "-o", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and says in err
        assert "lora+mean_diff" in err or "twice" in err  # the valid names are listed
        assert not (tmp_path / "bad").exists()  # refused before any work
    code = main(["compare", "--model", str(model_dir), "--pairs", str(pairs), "--keywords",
                 "love", "--methods", "lora", "--lora-scales", "1,-2", "-o", str(tmp_path)])
    assert code == 2 and "--lora-scales must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    helptext = capsys.readouterr().out
    assert "lora+mean_diff" in helptext and "--lora-steps" in helptext
