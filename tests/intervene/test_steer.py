"""Interventions: read site == write site, exactness, padding, per-row settings, cleanup."""

from __future__ import annotations

import pytest
import torch

from avec.directions.activations import pad_batch, read_activations
from avec.errors import SteeringError, VectorFileError
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

PROMPTS = ["Once upon a time", "The capital of France is", "hi"]


def random_vector(model, layers, scale=3.0, seed=1) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({L: torch.randn(model.d_model, generator=g) * scale for L in layers},
                          {"model": model.identity(), "method": "random"})


def logits(model, texts, side="right"):
    ids, mask, pos = pad_batch(model.encode(texts), model.tokenizer.pad_token_id, side)
    with torch.no_grad():
        out = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos)
    return out.logits, mask


def all_hidden(model, text):
    ids = model.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model.hf(**ids, output_hidden_states=True).hidden_states


def test_read_site_equals_write_site(tiny_any):
    """Adding coef * v at layer L changes the output of block L by exactly coef * v."""
    L = 1
    read = read_activations(tiny_any, PROMPTS[:2], [L])[L]
    vec = SteeringVector({L: read[0] - read[1]}, {"method": "mean_diff"})
    coef = 2.5
    base = all_hidden(tiny_any, PROMPTS[2])
    with steer(tiny_any, vec, coef=coef):
        steered = all_hidden(tiny_any, PROMPTS[2])
    torch.testing.assert_close(steered[L], base[L], rtol=0, atol=0)  # block L-1 untouched
    torch.testing.assert_close(steered[L + 1] - base[L + 1],
                               (coef * vec[L]).expand_as(base[L + 1]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered[L + 2], base[L + 2])  # and it propagates


def test_coef_zero_is_bit_identical(tiny_any):
    vec = random_vector(tiny_any, range(tiny_any.n_layers))
    base, _ = logits(tiny_any, PROMPTS)
    with steer(tiny_any, vec, coef=0.0):
        zero, _ = logits(tiny_any, PROMPTS)
    with steer(tiny_any, vec, coef=torch.zeros(len(PROMPTS))):
        zero_rows, _ = logits(tiny_any, PROMPTS)
    with steer(tiny_any, vec, coef=1.0):
        moved, _ = logits(tiny_any, PROMPTS)
    assert torch.equal(base, zero)
    assert torch.equal(base, zero_rows)
    assert not torch.allclose(base, moved)


@pytest.mark.parametrize("side", ["left", "right"])
def test_steered_batched_equals_unbatched(tiny_any, side):
    vec = random_vector(tiny_any, [1, 2])
    with steer(tiny_any, vec, coef=1.5):
        batch, mask = logits(tiny_any, PROMPTS, side)
        for i, text in enumerate(PROMPTS):
            single, _ = logits(tiny_any, [text])
            real = batch[i][mask[i].bool()]
            torch.testing.assert_close(real, single[0], rtol=1e-4, atol=1e-4)


def test_hooks_removed_after_exception(tiny_llama):
    vec = random_vector(tiny_llama, [0, 2])
    before = [len(b._forward_hooks) for b in tiny_llama.blocks]
    pre_before = len(tiny_llama.hf._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(tiny_llama, vec, coef=1.0, positions="generated"):
            assert sum(len(b._forward_hooks) for b in tiny_llama.blocks) == sum(before) + 2
            raise RuntimeError("boom")
    assert [len(b._forward_hooks) for b in tiny_llama.blocks] == before
    assert len(tiny_llama.hf._forward_pre_hooks) == pre_before
    base, _ = logits(tiny_llama, PROMPTS)
    assert torch.equal(base, logits(tiny_llama, PROMPTS)[0])


def test_per_row_coefficients_match_separate_runs(tiny_llama):
    vec = random_vector(tiny_llama, [1])
    text = PROMPTS[0]
    coefs = [0.0, 2.0, -3.0]
    with steer(tiny_llama, vec, coef=torch.tensor(coefs)):
        rows, _ = logits(tiny_llama, [text] * 3)
    for i, c in enumerate(coefs):
        with steer(tiny_llama, vec, coef=c):
            single, _ = logits(tiny_llama, [text])
        torch.testing.assert_close(rows[i], single[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(SteeringError, match="3 per-row coefficients"):
        with steer(tiny_llama, vec, coef=torch.tensor(coefs)):
            logits(tiny_llama, [text] * 2)


def test_per_row_vectors_compose(tiny_llama):
    v1, v2 = random_vector(tiny_llama, [1], seed=1), random_vector(tiny_llama, [1], seed=2)
    text = PROMPTS[1]
    ivs = [Intervention(v1, coef=[2.0, 0.0]), Intervention(v2, coef=[0.0, -1.0])]
    with steer(tiny_llama, ivs):
        rows, _ = logits(tiny_llama, [text, text])
    with steer(tiny_llama, v1, coef=2.0):
        r0, _ = logits(tiny_llama, [text])
    with steer(tiny_llama, v2, coef=-1.0):
        r1, _ = logits(tiny_llama, [text])
    torch.testing.assert_close(rows[0], r0[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rows[1], r1[0], rtol=1e-4, atol=1e-4)


def test_composition_adds_up(tiny_llama):
    v1, v2 = random_vector(tiny_llama, [2], seed=3), random_vector(tiny_llama, [2], seed=4)
    with steer(tiny_llama, [v1, v2], coef=1.5):
        both = all_hidden(tiny_llama, PROMPTS[0])[3]
    with steer(tiny_llama, (v1 + v2) * 1.5):
        summed = all_hidden(tiny_llama, PROMPTS[0])[3]
    torch.testing.assert_close(both, summed, rtol=1e-5, atol=1e-5)


def test_ablate_and_clamp(tiny_llama):
    vec = random_vector(tiny_llama, [1])
    unit = vec[1] / vec[1].norm()
    with steer(tiny_llama, vec, op="ablate"):
        h = all_hidden(tiny_llama, PROMPTS[0])[2][0]
    assert (h @ unit).abs().max() < 1e-5
    with steer(tiny_llama, vec, op="clamp", value=7.0):
        h = all_hidden(tiny_llama, PROMPTS[0])[2][0]
    torch.testing.assert_close(h @ unit, torch.full((h.shape[0],), 7.0), rtol=1e-5, atol=1e-4)
    base = all_hidden(tiny_llama, PROMPTS[0])[2][0]
    with steer(tiny_llama, vec, op="ablate"):  # nothing but the projection changes
        h = all_hidden(tiny_llama, PROMPTS[0])[2][0]
    torch.testing.assert_close(h, base - (base @ unit)[:, None] * unit, rtol=1e-5, atol=1e-5)


def test_positions(tiny_llama):
    """'prompt', 'generated' and 'from:k' select tokens by index among real tokens."""
    vec = random_vector(tiny_llama, [0])
    prompt_ids = tiny_llama.encode([PROMPTS[0]])
    n = len(prompt_ids[0])
    ids = torch.tensor(prompt_ids)
    captured = {}
    hook = tiny_llama.blocks[0].register_forward_hook(
        lambda m, a, o: captured.setdefault("h", []).append(o[0] if isinstance(o, tuple) else o))

    def run(positions):
        captured.clear()
        with steer(tiny_llama, vec, coef=1.0, positions=positions):
            with torch.no_grad():
                out = tiny_llama.hf(input_ids=ids, use_cache=True)
                tiny_llama.hf(input_ids=torch.tensor([[5]]), past_key_values=out.past_key_values,
                              use_cache=True)
        return captured["h"]

    captured.clear()
    with torch.no_grad():
        out = tiny_llama.hf(input_ids=ids, use_cache=True)
        tiny_llama.hf(input_ids=torch.tensor([[5]]), past_key_values=out.past_key_values,
                      use_cache=True)
    plain = captured["h"]
    try:
        for spec, expect_prompt, expect_gen in [
            ("all", range(n), True), ("prompt", range(n), False), ("generated", [], True),
            ("from:3", range(3, n), True), (n + 5, [], False),
        ]:
            got = run(spec)
            diff_prompt = (got[0] - plain[0]).abs().sum(-1)[0] > 1e-6
            assert diff_prompt.nonzero().flatten().tolist() == list(expect_prompt), spec
            assert bool((got[1] - plain[1]).abs().sum() > 1e-6) == expect_gen, spec
    finally:
        hook.remove()


def test_left_padding_positions_count_real_tokens(tiny_llama):
    """With left padding, from:k and prompt/generated see the same tokens as unpadded."""
    vec = random_vector(tiny_llama, [1])
    for spec in ("from:2", "prompt"):
        with steer(tiny_llama, vec, coef=1.0, positions=spec):
            batch, mask = logits(tiny_llama, PROMPTS, "left")
            for i, text in enumerate(PROMPTS):
                single, _ = logits(tiny_llama, [text])
                torch.testing.assert_close(batch[i][mask[i].bool()], single[0], rtol=1e-4,
                                           atol=1e-4)


def test_wrong_width_and_layer_refused(tiny_llama):
    bad = SteeringVector({1: torch.ones(tiny_llama.d_model + 1)})
    with pytest.raises(VectorFileError, match="does not match the model width"):
        with steer(tiny_llama, bad):
            pass
    far = SteeringVector({9: torch.ones(tiny_llama.d_model)})
    with pytest.raises(VectorFileError, match="layers 0..3"):
        with steer(tiny_llama, far):
            pass
    vec = random_vector(tiny_llama, [1])
    with pytest.raises(SteeringError, match="not in the vector"):
        with steer(tiny_llama, vec, layers=[2]):
            pass
    with pytest.raises(SteeringError, match="unknown op"):
        with steer(tiny_llama, vec, op="multiply"):  # type: ignore[arg-type]
            pass
    with pytest.raises(SteeringError, match="invalid positions"):
        with steer(tiny_llama, vec, positions="middle"):
            pass
