"""Metrics and sweeps: A/B with shared prefix caches, KL, perplexity, logit diff, concepts."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from avec.errors import DataError
from avec.evaluate.ab import (ABItem, ab_sweep, answer_tokens, letter_token, load_ab_items,
                              split_prompt)
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.evaluate.side_effects import (kl_divergence, logit_difference, perplexity,
                                        reference_logprobs)
from avec.evaluate.sweep import parse_layers, run_sweep
from avec.generation.hf import format_prompt
from avec.intervene.steer import steer
from avec.vector import SteeringVector

ITEMS = [ABItem("Is the sky blue?\n(A) yes\n(B) no", "A", "B"),
         ABItem("Pick one.\n(A) left\n(B) right", "B", "A"),
         ABItem("A much longer question about many things?\n(A) maybe\n(B) never", "A", "B")]


def rand_vec(model, layers, scale=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({L: torch.randn(model.d_model, generator=g) * scale for L in layers})


def direct_ab(model, item, vec=None, layer=None, coef=0.0):
    prefix, suffix = split_prompt(model, item.question, True)
    ids = torch.tensor([prefix + suffix])
    with torch.no_grad():
        if vec is None:
            logits = model.hf(ids).logits[0, -1]
        else:
            with steer(model, vec, coef=coef, layers=[layer], positions=f"from:{len(prefix)}"):
                logits = model.hf(ids).logits[0, -1]
    p = logits.softmax(-1)
    t, o = letter_token(model, item.target), letter_token(model, item.other)
    return float(p[t] / (p[t] + p[o]))


def test_ab_sweep_matches_direct_computation(tiny_llama):
    vec = rand_vec(tiny_llama, [1, 2])
    coefs = [-2.0, 0.0, 3.0]
    got = ab_sweep(tiny_llama, ITEMS, vec, [1, 2], coefs, batch_size=2)
    assert got.shape == (2, 3, 3)
    for li, L in enumerate([1, 2]):
        for ci, c in enumerate(coefs):
            for i, item in enumerate(ITEMS):
                want = direct_ab(tiny_llama, item, vec, L, c)
                assert abs(float(got[li, ci, i]) - want) < 1e-4
    base = ab_sweep(tiny_llama, ITEMS)
    torch.testing.assert_close(base[0, 0], got[0, 1])  # coef 0 == unsteered
    assert all(abs(float(base[0, 0, i]) - direct_ab(tiny_llama, it)) < 1e-5
               for i, it in enumerate(ITEMS))


def test_split_prompt_steers_after_user_turn(tiny_llama):
    prefix, suffix = split_prompt(tiny_llama, "Q?", True)
    assert tiny_llama.tokenizer.decode(prefix) == "<|user|>Q?\n"
    assert tiny_llama.tokenizer.decode(suffix) == "<|assistant|>("


def test_joint_answer_tokens_when_the_tokenizer_has_them():
    """A tokenizer with "(A" and "(B" as single tokens (Qwen's) is scored on those tokens right
    after the assistant header; one without them on the letter after a lone "("."""
    from conftest import make_tiny

    model = make_tiny("llama", merges=(("(", "A"), ("(", "B")))
    assert model.tokenizer("(A", add_special_tokens=False)["input_ids"] == [258]
    ids, start = answer_tokens(model, ["A", "B"])
    assert (ids, start) == ({"A": 258, "B": 259}, "")
    prefix, suffix = split_prompt(model, "Q?", True, start)
    assert model.tokenizer.decode(suffix) == "<|assistant|>"
    vec = rand_vec(model, [1])
    got = ab_sweep(model, ITEMS, vec, [1], [0.0, 2.0], batch_size=2)
    for ci, coef in enumerate([0.0, 2.0]):
        for i, item in enumerate(ITEMS):
            pre, suf = split_prompt(model, item.question, True, "")
            with torch.no_grad(), steer(model, vec, coef=coef, layers=[1],
                                        positions=f"from:{len(pre)}"):
                p = model.hf(torch.tensor([pre + suf])).logits[0, -1].softmax(-1)
            t, o = ids[item.target], ids[item.other]
            assert abs(float(got[0, ci, i]) - float(p[t] / (p[t] + p[o]))) < 1e-4
    plain = make_tiny("llama")
    assert answer_tokens(plain, ["A", "B"]) == ({"A": letter_token(plain, "A"),
                                                 "B": letter_token(plain, "B")}, "(")
    assert answer_tokens(model, ["A", "B"], chat=False)[1] == "("


def test_load_ab_items(tmp_path, shared_data):
    caa = load_ab_items(shared_data / "caa" / "sycophancy" / "test_dataset_ab.json")
    assert len(caa) == 50 and {caa[0].target, caa[0].other} == {"A", "B"}
    mmlu = load_ab_items(shared_data / "capability" / "mmlu.json")
    assert len(mmlu) == 570 and mmlu[0].target == "A"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "q", "correct": "(A)", "incorrect": "(A)"}]))
    with pytest.raises(DataError, match="item 0: answers must be different letters"):
        load_ab_items(bad)
    bad.write_text(json.dumps([{"q": 1}]))
    with pytest.raises(DataError, match="expected CAA keys"):
        load_ab_items(bad)


def test_kl_zero_at_coef_zero_and_matches_direct(tiny_llama):
    vec = rand_vec(tiny_llama, [1])
    prompts = ["hello there", "what now?"]
    kl = kl_divergence(tiny_llama, prompts, vec, 1, [0.0, 2.0])
    assert kl[0] == 0.0 and kl[1] > 0
    total = 0.0
    for p in prompts:
        ids = torch.tensor([format_prompt(tiny_llama, p)[0]])
        with torch.no_grad():
            lp = tiny_llama.hf(ids).logits[0, -1].log_softmax(-1)
            with steer(tiny_llama, vec, coef=2.0):
                lq = tiny_llama.hf(ids).logits[0, -1].log_softmax(-1)
        total += float((lp.exp() * (lp - lq)).sum())
    assert abs(kl[1] - total / 2) < 1e-4
    assert kl_divergence(tiny_llama, prompts, vec, 1, [2.0], positions="all")[0] > 0
    ref = reference_logprobs(tiny_llama, prompts)
    assert kl_divergence(tiny_llama, prompts, vec, 1, [0.0, 2.0], reference=ref) == kl
    with pytest.raises(ValueError, match="do not match these prompts"):
        kl_divergence(tiny_llama, prompts[:1], vec, 1, [2.0], reference=ref)


def test_perplexity_matches_manual(tiny_llama):
    texts = ["The cat sat on the mat.", "Short one"]
    vec = rand_vec(tiny_llama, [2])
    ppl = perplexity(tiny_llama, texts, vec, 2, [0.0, 3.0])
    nll, n = 0.0, 0
    for t in texts:
        ids = tiny_llama.encode([t])[0]
        with torch.no_grad():
            lp = tiny_llama.hf(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        nll -= float(lp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).sum())
        n += len(ids) - 1
    assert abs(ppl[0] - float(torch.exp(torch.tensor(nll / n)))) < 1e-3
    assert ppl[1] != ppl[0]
    skipped = perplexity(tiny_llama, texts, None, None, [0.0], skip_positions=3)
    assert skipped[0] != ppl[0]
    with pytest.raises(ValueError, match="no tokens left"):
        perplexity(tiny_llama, ["ab"], None, None, [0.0], skip_positions=5)


def test_logit_difference(tiny_llama):
    vec = rand_vec(tiny_llama, [1])
    got = logit_difference(tiny_llama, ["hi"], [("a", "b")], vec, 1, [0.0, 1.0])
    ids = torch.tensor([format_prompt(tiny_llama, "hi")[0]])
    a, b = (tiny_llama.tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "ab")
    with torch.no_grad():
        last = tiny_llama.hf(ids).logits[0, -1]
    assert abs(got[0] - float(last[a] - last[b])) < 1e-4
    with pytest.raises(ValueError, match="one token"):
        logit_difference(tiny_llama, ["hi"], [("ab", "b")], vec, 1, [1.0])


def test_keyword_rate():
    assert keyword_rate(["The waves!", "nothing", "OCEANS wide"], ["wave", "ocean"]) == 2 / 3
    assert keyword_rate(["a seal"], ["eal"]) == 0.0  # keywords match at word starts
    with pytest.raises(ValueError):
        keyword_rate([], ["x"])


def test_embedding_judge_is_offline_and_meaningful():
    judge = EmbeddingJudge()
    scores = judge.scores(["Waves crash on the sandy beach by the sea.",
                           "I filed the quarterly tax report."], "the ocean and the sea")
    assert scores[0] > scores[1] + 0.2
    emb = judge.embed(["one", "two"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_sweep_outputs(tmp_path, tiny_llama):
    vec = rand_vec(tiny_llama, [0, 1, 2])
    res = run_sweep(tiny_llama, "kl", vec, [0, 2], [0.0, 1.0, 2.0], prompts=["hi", "yo"])
    assert len(res.values) == 2 and len(res.values[0]) == 3 and res.values[0][0] == 0.0
    files = res.write(tmp_path)
    data = json.loads(open(files["json"]).read())
    assert data["values"] == res.values and data["coefs"] == [0.0, 1.0, 2.0]
    rows = list(csv.reader(open(files["csv"])))
    assert rows[0] == ["layer", "coef=0", "coef=1", "coef=2"] and len(rows) == 3
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert res.best(higher=True)[1] == 2.0
    ab = run_sweep(tiny_llama, "ab", vec, [1], [0.0, 1.0], items=ITEMS)
    assert ab.extra["n_items"] == 3 and 0 < ab.values[0][0] < 1
    with pytest.raises(ValueError, match="needs --prompts"):
        run_sweep(tiny_llama, "kl", vec, [0], [1.0])
    assert parse_layers("4-10:3,14") == [4, 7, 10, 14] and parse_layers("5") == [5]


def test_ppl_sweep_masks_actadd_positions(tiny_llama):
    from avec.data import ContrastPair
    from avec.directions.extract import extract

    vec = extract(tiny_llama, [ContrastPair("Love", "Hate")], [1], method="actadd")
    texts = ["A reference text long enough to score."]
    res = run_sweep(tiny_llama, "ppl", vec, [1], [0.0, 1.0], texts=texts)
    assert res.extra["skip_positions"] == vec.shape[0]
    want = perplexity(tiny_llama, texts, vec, 1, [0.0, 1.0], skip_positions=vec.shape[0])
    assert res.values[0] == want
