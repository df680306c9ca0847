"""Reading activations: read site, positions, padding independence, early stopping."""

from __future__ import annotations

import pytest
import torch

from avec.directions.activations import ab_letter_index, read_activations

TEXTS = ["The quick brown fox", "hi", "A somewhat longer sentence about nothing much.", "ok then"]


def hidden_states(model, text):
    ids = model.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model.hf(**ids, output_hidden_states=True).hidden_states


def test_read_site_is_block_output(tiny_any):
    """Layer L is the output of block L, i.e. hidden_states[L + 1] of a plain HF call."""
    layers = list(range(tiny_any.n_layers - 1))  # the last entry of hidden_states may be normed
    acts = read_activations(tiny_any, TEXTS, layers)
    for i, text in enumerate(TEXTS):
        hs = hidden_states(tiny_any, text)
        for L in layers:
            torch.testing.assert_close(acts[L][i], hs[L + 1][0, -1], rtol=1e-4, atol=1e-5)
            assert not torch.allclose(acts[L][i], hs[L][0, -1], atol=1e-4)  # not off by one


@pytest.mark.parametrize("position", ["last", "mean", 0, -2])
def test_batched_equals_unbatched(tiny_any, position):
    layers = [0, tiny_any.n_layers - 1]
    batched = read_activations(tiny_any, TEXTS, layers, position=position, batch_size=4)
    for i, text in enumerate(TEXTS):
        single = read_activations(tiny_any, [text], layers, position=position, batch_size=1)
        for L in layers:
            torch.testing.assert_close(batched[L][i], single[L][0], rtol=1e-4, atol=1e-5)


def test_mean_of_a_one_token_text_is_that_token(tiny_llama):
    ids = tiny_llama.encode(["a"])[0]
    assert len(ids) == 1
    got = read_activations(tiny_llama, ["a"], [1], position="mean")[1][0]
    torch.testing.assert_close(got, hidden_states(tiny_llama, "a")[2][0, 0], rtol=1e-4,
                               atol=1e-5)


def test_positions_match_hidden_states(tiny_llama):
    text = TEXTS[2]
    hs = hidden_states(tiny_llama, text)[2][0]  # output of block 1
    got = {p: read_activations(tiny_llama, [text], [1], position=p)[1][0]
           for p in ("mean", 0, 3, -3)}
    torch.testing.assert_close(got["mean"], hs[1:].mean(0), rtol=1e-4, atol=1e-5)  # no sink
    torch.testing.assert_close(got[0], hs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[3], hs[3], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[-3], hs[-3], rtol=1e-4, atol=1e-5)


def test_out_of_range_position_and_layer(tiny_llama):
    with pytest.raises(ValueError, match="outside"):
        read_activations(tiny_llama, ["hi"], [0], position=10)
    with pytest.raises(ValueError, match="layers are 0..3"):
        read_activations(tiny_llama, ["hi"], [4])
    with pytest.raises(ValueError, match="unknown read position"):
        read_activations(tiny_llama, ["hi"], [0], position="first")


def test_stops_after_deepest_layer(tiny_llama):
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, b in enumerate(tiny_llama.blocks)]
    head = tiny_llama.hf.get_output_embeddings()
    handles.append(head.register_forward_hook(lambda m, a, o: calls.append("head")))
    try:
        read_activations(tiny_llama, TEXTS, [1, 0], batch_size=2)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 0, 1]  # two batches, blocks 2-3 and the LM head never ran


def test_ab_letter_index(tiny_llama):
    text = "Question?\n\nChoices:\n(A) yes\n(B) no\nAnswer: (B)"
    ids = tiny_llama.encode([text])[0]
    idx = ab_letter_index(tiny_llama, text, ids)
    assert tiny_llama.tokenizer.decode(ids[idx]) == "B"
    assert tiny_llama.tokenizer.decode(ids[: idx + 1]).endswith("Answer: (B")
    acts = read_activations(tiny_llama, [text], [2], position="ab_letter")[2][0]
    torch.testing.assert_close(acts, hidden_states(tiny_llama, text)[3][0, idx], rtol=1e-4,
                               atol=1e-5)
