"""Conditional steering (CAST) on a tiny random model: thresholds placed between two prompts'
values, so one row is steered and the other stays bit-identical; all/any/not; per-token
re-checks; the JSON form and bad specs."""

from __future__ import annotations

import pytest
import torch

from avec.errors import SteeringError
from avec.generation.hf import format_prompt, generate_ids
from avec.intervene.conditions import (AllOf, AnyOf, ConditionTracker, Leaf, Not,
                                       condition_vector, parse, to_spec)
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

PROMPTS = ["the cat sat on the mat", "zq xv 17 !!"]
LAYER = 1


@torch.no_grad()
def prompt_means(model, prompts, layer):
    """Each prompt's mean block-``layer`` output over its tokens after the first."""
    out = []
    for p in prompts:
        ids = torch.tensor([format_prompt(model, p)[0]])
        h = model.hf(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0]
        out.append(h[1:].float().mean(0))
    return torch.stack(out)


@pytest.fixture()
def setup(tiny_llama):
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(tiny_llama.d_model, generator=g)
    values = torch.nn.functional.cosine_similarity(
        prompt_means(tiny_llama, PROMPTS, LAYER), direction.expand(2, -1), dim=-1)
    assert abs(float(values[0] - values[1])) > 1e-3
    middle = float(values.mean())
    above = 0 if values[0] > values[1] else 1  # the prompt whose value is above the middle
    steering = SteeringVector({2: torch.randn(tiny_llama.d_model, generator=g) * 8})
    return direction, middle, above, steering


def generate(model, interventions, prompts=PROMPTS, n=6):
    ids = [format_prompt(model, p)[0] for p in prompts]
    with steer(model, interventions) if interventions else torch.no_grad():
        return generate_ids(model, ids, n)


def test_rows_on_each_side_of_the_threshold(tiny_llama, setup):
    direction, middle, above, steering = setup
    plain = generate(tiny_llama, [])
    always = generate(tiny_llama, [Intervention(steering, 1.0, positions="generated")])
    cond = Leaf(direction, LAYER, middle, ">")
    out = generate(tiny_llama, [Intervention(steering, 1.0, when=cond)])
    below = 1 - above
    assert out[below] == plain[below]  # the condition fails: exactly the plain model
    assert out[above] == always[above] != plain[above]  # met: steered like unconditional
    flipped = generate(tiny_llama, [Intervention(steering, 1.0, when=Not(cond))])
    assert flipped[above] == plain[above] and flipped[below] == always[below]
    lower = Leaf(direction, LAYER, middle, "<")
    assert generate(tiny_llama, [Intervention(steering, 1.0, when=lower)]) == flipped


def test_unsteered_rows_keep_bit_identical_logits(tiny_llama, setup):
    """One left-padded batch, a prefill and a decode step: the row whose condition fails has
    exactly the plain model's logits; the other row's decode step is steered."""
    import contextlib

    from avec.directions.activations import pad_batch

    direction, middle, above, steering = setup
    ids, mask, pos = pad_batch([format_prompt(tiny_llama, p)[0] for p in PROMPTS],
                               tiny_llama.tokenizer.pad_token_id, "left")

    @torch.no_grad()
    def two_steps(ctx):
        with ctx:
            out = tiny_llama.hf(input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            step = tiny_llama.hf(input_ids=nxt, attention_mask=torch.cat(
                [mask, torch.ones_like(nxt)], 1), position_ids=pos[:, -1:] + 1,
                past_key_values=out.past_key_values, use_cache=True)
        return out.logits[:, -1], step.logits[:, -1]

    plain = two_steps(contextlib.nullcontext())
    cond = two_steps(steer(tiny_llama, Intervention(steering, 1.0,
                                                    when=Leaf(direction, LAYER, middle, ">"))))
    below = 1 - above
    assert torch.equal(cond[0], plain[0])  # the prompt pass is never steered
    assert torch.equal(cond[1][below], plain[1][below])
    assert not torch.allclose(cond[1][above], plain[1][above])


def test_all_any_not(tiny_llama, setup):
    direction, middle, above, steering = setup
    below = 1 - above
    met, never, always_met = (Leaf(direction, LAYER, middle, ">"),
                              Leaf(direction, LAYER, 2.0, ">"), Leaf(direction, LAYER, -2.0, ">"))
    plain = generate(tiny_llama, [])
    steered = generate(tiny_llama, [Intervention(steering, 1.0, positions="generated")])
    cases = {AllOf((met, always_met)): {above}, AllOf((met, never)): set(),
             AnyOf((met, never)): {above}, AnyOf((never, Not(met))): {below},
             Not(AnyOf((met, never))): {below}, AllOf((always_met, Not(never))): {0, 1}}
    for cond, rows in cases.items():
        out = generate(tiny_llama, [Intervention(steering, 1.0, when=cond)])
        assert [r for r in (0, 1) if out[r] != plain[r]] == sorted(rows), to_spec(cond)
        for r in rows:
            assert out[r] == steered[r]


def test_per_token_rechecks_on_the_running_mean():
    """The tracker alone, on synthetic states: a prompt-decided condition keeps its decision,
    a per-token one follows the running mean over all tokens so far (first tokens left out)."""
    d = torch.tensor([1.0, 0.0])
    leaf = Leaf(d, 0, 0.0, ">", metric="projection")
    tracker = ConditionTracker([(leaf, False), (leaf, True)])
    h = torch.tensor([[[9.0, 0], [1.0, 0], [1.0, 0]]])  # first token ignored: mean +1
    tracker.start_forward(True, 1)
    tracker.observe(0, h, torch.tensor([[0, 1, 2]]))
    tracker.start_forward(False, 1)
    assert float(tracker.gate(0, h)) == 1.0 and float(tracker.gate(1, h)) == 1.0
    tracker.observe(0, torch.tensor([[[-5.0, 0]]]), torch.tensor([[3]]))  # running mean -1
    tracker.start_forward(False, 1)
    assert float(tracker.gate(0, h)) == 1.0  # decided on the prompt: unchanged
    assert float(tracker.gate(1, h)) == 0.0  # re-checked: (1 + 1 - 5) / 3 < 0
    tracker.start_forward(True, 1)  # a new sequence: no decision yet
    assert float(tracker.gate(0, h)) == 0.0


def test_per_token_on_a_model_matches_prompt_only_when_the_condition_is_stable(tiny_llama,
                                                                                setup):
    direction, _middle, _above, steering = setup
    for threshold, expect_steered in ((-2.0, True), (2.0, False)):
        cond = Leaf(direction, LAYER, threshold, ">")
        a = generate(tiny_llama, [Intervention(steering, 1.0, when=cond)])
        b = generate(tiny_llama, [Intervention(steering, 1.0, when=cond, per_token=True)])
        assert a == b
        assert (a != generate(tiny_llama, [])) == expect_steered


def test_the_json_form_round_trips_and_uses_the_fitted_fields(tiny_llama, setup):
    direction, middle, _above, _ = setup
    files = {"food": condition_vector(direction, LAYER, middle, op="<", metric="projection"),
             "bare": SteeringVector({LAYER: direction})}
    resolve = files.__getitem__
    leaf = parse({"vector": "food"}, resolve)
    assert (leaf.layer, leaf.op, leaf.metric, leaf.threshold) == (LAYER, "<", "projection",
                                                                  middle)
    spec = {"any": [{"not": {"vector": "food", "threshold": 0.5}},
                    {"vector": "bare", "op": ">", "threshold": 0.1}]}
    cond = parse(spec, resolve, n_layers=4, d_model=tiny_llama.d_model)
    again = parse(to_spec(cond), resolve)
    assert to_spec(again) == to_spec(cond)
    assert to_spec(cond)["any"][1] == {"vector": "bare", "layer": LAYER, "metric": "cosine",
                                       "op": ">", "threshold": 0.1}


@pytest.mark.parametrize("spec, message", [
    ("food", "a condition is an object"),
    ({"vector": "bare"}, r"when\.op: the condition vector 'bare' has no fitted op"),
    ({"vector": "bare", "op": ">"}, r"when\.threshold: .* no fitted threshold"),
    ({"vector": "food", "op": ">="}, r"when\.op: '>='"),
    ({"vector": "food", "metric": "dot"}, r"when\.metric"),
    ({"vector": "food", "threshold": float("nan")}, r"when\.threshold: a finite number"),
    ({"vector": "food", "threshold": True}, r"when\.threshold"),
    ({"vector": "food", "layer": 3}, r"when\.layer: the condition vector 'food' has no layer 3"),
    ({"vector": "food", "colour": 1}, r"when\.colour: unknown field"),
    ({"all": [{"vector": "food"}]}, r"when\.all: give a list of 2 to 8"),
    ({"all": [{"vector": "food"}, {"vector": "food"}], "not": {}}, r"'all' takes no other"),
    ({"not": {"not": {"not": {"not": {"not": {"vector": "food"}}}}}}, "nest more than 4"),
    ({"any": [{"vector": "food"}, {"vector": "nope"}]}, "unknown condition vector 'nope'"),
])
def test_bad_specs_are_refused_naming_the_field(tiny_llama, setup, spec, message):
    direction, middle, _above, _ = setup
    files = {"food": condition_vector(direction, LAYER, middle),
             "bare": SteeringVector({LAYER: direction})}

    def resolve(name):
        if name not in files:
            raise SteeringError(f"unknown condition vector {name!r}")
        return files[name]

    with pytest.raises(SteeringError, match=message):
        parse(spec, resolve)


def test_a_conditional_intervention_steers_generated_tokens_only(tiny_llama, setup):
    direction, middle, _above, steering = setup
    with pytest.raises(SteeringError, match="steers the generated tokens"):
        Intervention(steering, 1.0, positions="prompt", when=Leaf(direction, LAYER, middle))
    with pytest.raises(SteeringError, match="per_token re-checks a condition"):
        Intervention(steering, 1.0, per_token=True)
    iv = Intervention(steering, 1.0, when=Leaf(direction, LAYER, middle))
    assert iv.positions == "generated"
