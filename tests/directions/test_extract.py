"""Extraction (mean difference) and steered generation on tiny models."""

from __future__ import annotations

import pytest
import torch

from avec.directions.activations import read_activations
from avec.data import ContrastPair
from avec.errors import SteeringError
from avec.directions.extract import extract
from avec.generation.hf import generate_ids, steered_completions, variant_completions
from avec.directions.methods import MeanDiff, get_method
from avec.intervene.steer import steer

PAIRS = [ContrastPair("I love this day", "I hate this day"),
         ContrastPair("What a lovely gift", "What an awful gift"),
         ContrastPair("Great", "Terrible")]


def test_mean_diff_on_synthetic_data():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    neg = torch.randn(200, 16, generator=g)
    pos = neg + direction + 0.01 * torch.randn(200, 16, generator=g)
    got = MeanDiff().fit(pos, neg)
    assert torch.nn.functional.cosine_similarity(got, direction, dim=0) > 0.999
    torch.testing.assert_close(got, (pos - neg).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        MeanDiff().fit(pos, neg[:10])
    with pytest.raises(ValueError, match="unknown method"):
        get_method("magic")


def test_extract_is_mean_of_differences(tiny_llama):
    vec = extract(tiny_llama, PAIRS, [1, 3])
    acts = read_activations(tiny_llama, [p.positive for p in PAIRS] + [p.negative for p in PAIRS],
                            [1, 3])
    for L in (1, 3):
        expected = (acts[L][:3] - acts[L][3:]).mean(0)
        torch.testing.assert_close(vec[L], expected, rtol=1e-5, atol=1e-6)
    meta = vec.metadata
    assert meta["method"] == "mean_diff" and meta["n_pairs"] == 3 and meta["positions"] == "last"
    assert meta["model"]["name"] == "tiny-llama" and vec.layers == [1, 3]


def test_extract_is_deterministic_and_order_free(tiny_llama):
    a = extract(tiny_llama, PAIRS, [2])
    b = extract(tiny_llama, list(reversed(PAIRS)), [2], batch_size=1)
    torch.testing.assert_close(a[2], b[2], rtol=1e-5, atol=1e-5)


def test_generation_coef_zero_is_unsteered(tiny_any):
    vec = extract(tiny_any, PAIRS, [1])
    prompts = ["Tell me a story", "hi", "What is two plus two?"]
    plain = steered_completions(tiny_any, prompts, None, [0.0], max_new_tokens=12)
    mixed = steered_completions(tiny_any, prompts, vec * 50, [0.0, 1.0], max_new_tokens=12)
    assert [r.text for r in plain] == [r.text for r in mixed if r.coef == 0.0]
    assert [(r.prompt, r.coef) for r in mixed] == [(p, c) for p in prompts for c in (0.0, 1.0)]
    assert any(a.text != b.text for a, b in zip(plain, [r for r in mixed if r.coef == 1.0]))


def test_variant_completions_mix_vectors_in_one_batch(tiny_llama):
    """Rows steered by different vectors share a batch; each equals that vector run alone."""
    a = extract(tiny_llama, PAIRS, [1]) * 30
    b = extract(tiny_llama, list(reversed(PAIRS)), [2], method="random", seed=3) * 30
    block = extract(tiny_llama, PAIRS[:1], [1], method="actadd") * 30  # [T, d], positional
    prompts = ["Tell me a story", "hi there"]
    variants = [(a, 1.0), (None, 0.0), (b, -1.0), (a, 0.0), (b, 2.0), (block, 1.0)]
    mixed = variant_completions(tiny_llama, prompts, variants, max_new_tokens=8)
    alone = [[c.text for c in steered_completions(tiny_llama, prompts, v, [c],
                                                  max_new_tokens=8)] for v, c in variants]
    assert mixed == alone
    assert mixed[1] == mixed[3] and mixed[0] != mixed[1]  # coef 0 is the shared unsteered row


def test_batched_generation_equals_unbatched(tiny_llama):
    """Left-padded batches of different prompt lengths give the same tokens as one by one."""
    vec = extract(tiny_llama, PAIRS, [1]) * 20
    prompts = [tiny_llama.encode([t])[0] for t in ["a long prompt here", "hi", "mid size"]]
    for coef in (0.0, 1.0):
        with steer(tiny_llama, vec, coef=coef):
            batched = generate_ids(tiny_llama, prompts, 10)
            singles = [generate_ids(tiny_llama, [p], 10)[0] for p in prompts]
        assert batched == singles


def test_generated_positions_leave_prompt_untouched(tiny_llama):
    """positions='generated' steers only new tokens: the first generated token is unchanged."""
    vec = extract(tiny_llama, PAIRS, [1]) * 100
    prompt = [tiny_llama.encode(["Once upon a time"])[0]]
    plain = generate_ids(tiny_llama, prompt, 8)[0]
    with steer(tiny_llama, vec, positions="generated"):
        gen = generate_ids(tiny_llama, prompt, 8)[0]
    with steer(tiny_llama, vec, positions="prompt"):
        prm = generate_ids(tiny_llama, prompt, 8)[0]
    assert gen[0] == plain[0] and gen != plain
    assert prm != plain


@pytest.mark.parametrize("positions", ["all", "generated", "prompt"])
def test_greedy_loop_matches_model_generate(tiny_any, positions):
    """avec's greedy loop makes the forward calls model.generate makes: same tokens, also
    left-padded, steered per row and by position."""
    from avec.directions.activations import pad_batch
    from avec.generation.hf import _hf_generate

    model = tiny_any
    prompts = [model.encode([t])[0] for t in ["a long prompt here", "hi", "mid size"]]
    ids, mask, _ = pad_batch(prompts, model.tokenizer.pad_token_id, "left")
    eos = model.hf.generation_config.eos_token_id or model.tokenizer.eos_token_id
    vec = extract(model, PAIRS, [1]) * 10
    with steer(model, vec, coef=[1.0, 0.0, 2.0], positions=positions):
        ours = generate_ids(model, prompts, 12, min_new_tokens=4)
        ref = _hf_generate(model, ids, mask, 12, 4, eos, 0.0, 0, ()).tolist()
    ref = [row[:next((i for i, t in enumerate(row) if t == eos), len(row))] for row in ref]
    assert ours == ref


def test_min_new_tokens_gives_exact_lengths(tiny_llama):
    """Benchmarks need the same number of tokens from every library: with min_new_tokens equal
    to max_new_tokens, end-of-sequence is suppressed and every row has exactly that many."""
    eos = tiny_llama.hf.generation_config.eos_token_id or tiny_llama.tokenizer.eos_token_id
    prompts = [tiny_llama.encode([t])[0] for t in ["a long prompt here", "hi"]]
    got = generate_ids(tiny_llama, prompts, 12, min_new_tokens=12)
    assert [len(r) for r in got] == [12, 12]
    assert all(t != eos for r in got for t in r)
    assert generate_ids(tiny_llama, prompts, 0) == [[], []]


def test_per_row_coefficient_count_is_checked(tiny_llama):
    vec = extract(tiny_llama, PAIRS, [1])
    prompts = [tiny_llama.encode([t])[0] for t in ["abc", "def"]]
    with steer(tiny_llama, vec, coef=[1.0, 2.0, 3.0]):
        with pytest.raises(SteeringError, match="3 per-row coefficients"):
            generate_ids(tiny_llama, prompts, 2)


def test_nonzero_coef_needs_vector(tiny_llama):
    with pytest.raises(ValueError, match="needs a vector"):
        steered_completions(tiny_llama, ["hi"], None, [1.0])
