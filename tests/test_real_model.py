"""Behaviour on the real packaged default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import pytest
import torch

from avec.directions.activations import pad_batch, read_activations
from avec.data.demo import DEMO_PAIRS, DEMO_TARGET_WORDS, NEUTRAL_PROMPTS
from avec.directions.extract import extract
from avec.generation.hf import steered_completions
from avec.intervene.steer import steer

pytestmark = pytest.mark.real_model



@pytest.fixture(scope="module")
def ocean(real_model):
    return extract(real_model, DEMO_PAIRS, [10, 14])


def mentions(text: str) -> bool:
    return any(w in text.lower() for w in DEMO_TARGET_WORDS)


def test_default_model_shape(real_model):
    assert (real_model.family, real_model.n_layers, real_model.d_model) == ("llama", 30, 576)
    assert real_model.has_chat_template


def test_vector_steers_generations_toward_topic(real_model, ocean):
    results = steered_completions(real_model, NEUTRAL_PROMPTS, ocean, [0.0, 8.0], layers=[14],
                                  max_new_tokens=32)
    base = sum(mentions(r.text) for r in results if r.coef == 0.0)
    steered = sum(mentions(r.text) for r in results if r.coef == 8.0)
    assert base <= 1, [r.text for r in results if r.coef == 0.0]
    assert steered >= 6, [r.text for r in results if r.coef == 8.0]
    negative = steered_completions(real_model, NEUTRAL_PROMPTS[:4], ocean, [-8.0], layers=[14],
                                   max_new_tokens=32)
    assert sum(mentions(r.text) for r in negative) <= 1


def test_coef_zero_is_bit_identical_real(real_model, ocean):
    ids, mask, pos = pad_batch(real_model.encode(NEUTRAL_PROMPTS[:3]),
                               real_model.tokenizer.pad_token_id, "left")
    with torch.no_grad():
        base = real_model.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with steer(real_model, ocean, coef=0.0):
            zero = real_model.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        with steer(real_model, ocean, coef=torch.zeros(3)):
            zero_rows = real_model.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert torch.equal(base, zero) and torch.equal(base, zero_rows)


def test_coef_zero_text_equals_unsteered_text(real_model, ocean):
    plain = steered_completions(real_model, NEUTRAL_PROMPTS[:4], None, [0.0], max_new_tokens=24)
    mixed = steered_completions(real_model, NEUTRAL_PROMPTS[:4], ocean, [0.0, 4.0, 8.0],
                                layers=[14], max_new_tokens=24)
    assert [r.text for r in plain] == [r.text for r in mixed if r.coef == 0.0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_unbatched_real(real_model, ocean, side):
    texts = NEUTRAL_PROMPTS[:4]
    acts = read_activations(real_model, texts, [5, 14])
    for i, t in enumerate(texts):
        single = read_activations(real_model, [t], [5, 14])
        for L in (5, 14):
            torch.testing.assert_close(acts[L][i], single[L][0], rtol=1e-4, atol=1e-4)
    ids, mask, pos = pad_batch(real_model.encode(texts), real_model.tokenizer.pad_token_id, side)
    with torch.no_grad(), steer(real_model, ocean, coef=4.0, layers=[14]):
        batch = real_model.hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for i, t in enumerate(texts):
            single = real_model.hf(input_ids=torch.tensor(real_model.encode([t]))).logits[0]
            torch.testing.assert_close(batch[i][mask[i].bool()], single, rtol=1e-3, atol=1e-3)


def test_read_site_equals_write_site_real(real_model, ocean):
    ids = torch.tensor(real_model.encode(["The weather today is"]))
    with torch.no_grad():
        base = real_model.hf(ids, output_hidden_states=True).hidden_states
        with steer(real_model, ocean, coef=3.0, layers=[10]):
            steered = real_model.hf(ids, output_hidden_states=True).hidden_states
    assert torch.equal(steered[10], base[10])
    torch.testing.assert_close(steered[11] - base[11], (3.0 * ocean[10]).expand_as(base[11]),
                               rtol=1e-4, atol=1e-4)


def test_pairs_generate_cli(tmp_path, capsys):
    import json

    from avec.cli.main import main
    from avec.data import load_pairs

    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "generate", "--concept", "the ocean", "-n", "3", "-o", str(out),
                 "--max-attempts", "12", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    pairs = load_pairs(out)
    assert 1 <= len(pairs) == info["pairs"] <= 3
    assert len({p.positive for p in pairs}) == len(pairs)
    line = json.loads(out.read_text().splitlines()[0])
    assert line["generator"]["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert line["concept"] == "the ocean" and line["generator"]["seed"] == 0


def test_compare_concept_mean_diff_beats_random(real_model):
    """The embedding-judged comparison separates a real direction from the random control."""
    from avec.studies.compare import CompareSettings, Task, compare

    settings = CompareSettings(layer=14, methods=("mean_diff", "random"), n_pairs=(32,),
                               seeds=1, coefs=(2.0, 4.0), kl_budget=10.0, max_new_tokens=24)
    task = Task(prompts=NEUTRAL_PROMPTS[:4], concept="the ocean, the sea, waves and beaches")
    res = compare(real_model, DEMO_PAIRS, task, settings, NEUTRAL_PROMPTS[:4])
    effect = {r["method"]: r["best_effect"] for r in res.rows}
    assert effect["mean_diff"] > effect["random"] + 0.1, effect
