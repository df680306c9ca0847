"""The worker's op on fake steps (no engine): rows to requests, positions, stacking, padding,
slot references, and a request whose vector is gone."""

from __future__ import annotations

import json
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from avec.vector import SteeringVector
from avec.vllm import VECTORS_ENV
from avec.vllm.requests import effective, wire
from avec.vllm.steering import WorkerState, apply
from avec.vllm.store import VectorStore

N_LAYERS = 10


@pytest.fixture()
def store(tmp_path, monkeypatch):
    SteeringVector({3: torch.ones(8), 5: torch.ones(8)}).save(tmp_path / "v.safetensors")
    SteeringVector({3: torch.arange(8.0)}).save(tmp_path / "w.safetensors")
    monkeypatch.setenv(VECTORS_ENV, str(tmp_path))
    return tmp_path


def admitted(store, entries: list[dict] | None) -> dict | None:
    """What the front end hands the worker for a request with these entries."""
    if not entries:
        return None
    resolved = effective({"avec_steering": json.dumps(entries)}, VectorStore(store), N_LAYERS)
    return {"avec_resolved": wire(resolved)}


def fake_runner(store, entries: list, spans: list[tuple[int, int]], n_prompt: list[int]):
    ids = [f"r{i}" for i in range(len(entries))]
    qsl = np.array([spans[0][0], *[e for _, e in spans]])
    requests = {rid: NS(req_id=rid, num_prompt_tokens=n,
                        sampling_params=NS(extra_args=admitted(store, e)))
                for rid, e, n in zip(ids, entries, n_prompt)}
    return NS(input_batch=NS(num_reqs=len(ids), req_ids=ids), query_start_loc=NS(np=qsl),
              requests=requests)


def worker() -> WorkerState:
    state = WorkerState()
    state.n_layers = N_LAYERS
    return state


def test_each_request_gets_its_own_rows_and_positions(store):
    """Three requests in one flattened step (a 3-token prefill chunk starting at position 2, a
    decode token, a 2-token prefill), each with its own entries."""
    runner = fake_runner(store, [
        [{"vector": "v", "coef": 2, "layers": [3], "positions": "generated"}],
        None,
        [{"vector": "v", "coef": 1, "layers": [3], "positions": "prompt"},
         {"vector": "v", "coef": 1, "layers": [3], "op": "clamp", "value": 0.0}]],
        [(0, 3), (3, 4), (4, 6)], [3, 5, 1])
    state = worker()
    state.begin_step(runner)
    hidden, residual = torch.zeros(6, 8), torch.zeros(6, 8)
    positions = torch.tensor([2, 3, 4, 9, 0, 1])  # absolute, per request
    out = apply(state, hidden, residual, positions, 3)
    assert torch.equal(out[0], torch.zeros(8))  # position 2 < 3 prompt tokens: not generated
    assert torch.equal(out[1:3], torch.full((2, 8), 2.0))  # generated rows of request 0
    assert torch.equal(out[3], torch.zeros(8))  # the plain request
    # request 2: +v on its prompt row (position 0), then the clamp sets every row's projection
    # on v to 0 again: the stacked entries apply in order
    assert torch.allclose(out[4:6], torch.zeros(2, 8), atol=1e-6)
    assert torch.equal(apply(state, hidden, residual, positions, 5), hidden)  # other layer
    state.end_step()
    assert torch.equal(apply(state, hidden, residual, positions, 3), hidden)  # outside a step
    assert hidden.abs().sum() == 0  # the input is never modified


def test_unsteered_rows_are_bit_identical_and_padding_rows_untouched(store):
    runner = fake_runner(store, [None, [{"vector": "w", "coef": -3.5}], None],
                         [(0, 2), (2, 3), (3, 5)], [2, 4, 2])
    state = worker()
    state.begin_step(runner)
    g = torch.Generator().manual_seed(0)
    hidden, residual = torch.randn(7, 8, generator=g), torch.randn(7, 8, generator=g)
    out = apply(state, hidden, residual, torch.tensor([0, 1, 4, 0, 1, 0, 0]), 3)  # 2 padding
    plain = [0, 1, 3, 4, 5, 6]
    assert torch.equal(out[plain], hidden[plain])
    assert torch.equal(out[2], hidden[2] - 3.5 * torch.arange(8.0))


def test_ablate_matches_the_formula(store):
    runner = fake_runner(store, [[{"vector": "w", "coef": 1, "op": "ablate"}]], [(0, 2)], [2])
    state = worker()
    state.begin_step(runner)
    g = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    out = apply(state, hidden, residual, torch.tensor([0, 1]), 3)
    u = torch.arange(8.0) / torch.arange(8.0).norm()
    assert torch.allclose((out + residual) @ u, torch.zeros(2), atol=1e-5)
    assert torch.allclose(out, hidden - ((hidden + residual) @ u)[:, None] * u, atol=1e-6)


def test_slots_are_shared_released_and_recycled(store):
    """Two requests on one vector hold one slot; it is released when both finish, and 1,000
    distinct vectors used one after the other never grow the bank past what runs at once."""
    runner = fake_runner(store, [[{"vector": "v", "coef": 1}], [{"vector": "v", "coef": 2}]],
                         [(0, 1), (1, 2)], [4, 4])
    state = worker()
    state.begin_step(runner)
    apply(state, torch.zeros(2, 8), torch.zeros(2, 8), torch.tensor([5, 5]), 3)
    assert state.bank.in_use() == 1 and state.bank.loads == 1
    state.end_step()
    for i in range(1000):
        SteeringVector({3: torch.full((8,), float(i + 1))}).save(store / f"u{i}.safetensors")
        step = fake_runner(store, [[{"vector": f"u{i}", "coef": 1}]], [(0, 1)], [1])
        state.begin_step(step)  # the two first requests are gone: their slot is released
        out = apply(state, torch.zeros(1, 8), torch.zeros(1, 8), torch.tensor([3]), 3)
        assert torch.equal(out[0], torch.full((8,), float(i + 1)))
        state.end_step()
        (store / f"u{i}.safetensors").unlink()
    assert state.bank.capacity == 16  # never grew
    assert state.bank.in_use() == 1 and len(state.programs) == 1
    assert state.bank.loads == 1001


def test_a_resubmitted_request_id_is_compiled_anew(store):
    state = worker()
    first = fake_runner(store, [[{"vector": "v", "coef": 1}]], [(0, 1)], [1])
    state.begin_step(first)
    apply(state, torch.zeros(1, 8), torch.zeros(1, 8), torch.tensor([0]), 3)
    state.end_step()
    again = fake_runner(store, [[{"vector": "v", "coef": 5}]], [(0, 1)], [1])  # same id "r0"
    state.begin_step(again)
    out = apply(state, torch.zeros(1, 8), torch.zeros(1, 8), torch.tensor([0]), 3)
    assert torch.equal(out[0], torch.full((8,), 5.0))
    assert state.bank.in_use() == 1 and state.bank.refs(1) == 1


def test_a_vector_gone_since_admission_leaves_its_request_unsteered_alone(store, caplog):
    runner = fake_runner(store, [[{"vector": "w", "coef": 1}], [{"vector": "v", "coef": 1,
                                                                   "layers": [3]}]],
                         [(0, 1), (1, 2)], [4, 4])
    (store / "w.safetensors").unlink()
    state = worker()
    state.begin_step(runner)
    out = apply(state, torch.zeros(2, 8), torch.zeros(2, 8), torch.tensor([5, 5]), 3)
    assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[1], torch.ones(8))
    assert "r0 runs UNSTEERED" in caplog.text and "'w' is gone" in caplog.text


def test_a_vector_changed_since_admission_is_not_used(store, caplog):
    runner = fake_runner(store, [[{"vector": "w", "coef": 1}]], [(0, 1)], [4])
    SteeringVector({3: torch.ones(8) * 7}).save(store / "w.safetensors")
    state = worker()
    state.begin_step(runner)
    out = apply(state, torch.zeros(1, 8), torch.zeros(1, 8), torch.tensor([5]), 3)
    assert torch.equal(out[0], torch.zeros(8))
    assert "changed since the request was admitted" in caplog.text


def test_a_condition_is_decided_on_the_whole_prompt_once_then_gates_generated_rows(store):
    """Two conditional requests (CAST): prompt rows along the condition direction (met) and
    across it (not met). The prompt arrives in chunks; a preemption recomputes positions
    already counted (with different values here, which must not count again). Rows are steered
    only at generated positions of the request whose condition holds."""
    from avec.intervene.conditions import condition_vector

    e0, e1 = torch.eye(8)[0], torch.eye(8)[1]
    condition_vector(e0, 2, 0.5).save(store / "c.safetensors")
    entry = [{"vector": "v", "coef": 2, "layers": [3], "when": {"vector": "c"}}]
    runner = fake_runner(store, [entry, entry], [(0, 3), (3, 9)], [6, 6])
    state = worker()

    def step(spans, positions, rows):
        runner.query_start_loc = NS(np=np.array([0, *np.cumsum(spans)]))
        state.begin_step(runner)
        hidden = torch.stack(rows)
        outs = {L: apply(state, hidden, torch.zeros_like(hidden), torch.tensor(positions), L)
                for L in range(5)}
        state.end_step()
        return hidden, outs[3]

    # step 1: r0's first 3 prompt tokens, r1's whole prompt (6)
    hidden, out = step([3, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5], [e0 * 9] * 3 + [e1] * 6)
    assert torch.equal(out, hidden)  # prompt rows are never steered by a conditional entry
    assert state.decisions == {"met": 0, "not_met": 1} and set(state.pending) == {"r0"}
    # step 2: r0 recomputed from position 0 (rows 1-2 now point the other way: not recounted),
    # r1's first generated token (its condition failed: untouched)
    hidden, out = step([6, 1], [0, 1, 2, 3, 4, 5, 6],
                       [e0, -e0 * 100, -e0 * 100, e0, e0, e0, e0])
    assert torch.equal(out, hidden)
    assert state.decisions == {"met": 1, "not_met": 1} and not state.pending
    # step 3: both decode; only r0's generated row is steered
    hidden, out = step([1, 1], [6, 7], [e1, e1])
    assert torch.equal(out[0], hidden[0] + 2 * torch.ones(8))
    assert torch.equal(out[1], hidden[1])


def test_a_conditional_entry_on_the_wire(store):
    """The front end writes the condition with every field and its files' digests; the worker
    refuses a wire condition whose digests do not match its vectors; per_token is refused."""
    from avec.intervene.conditions import condition_vector
    from avec.vllm.requests import SteeringRequestError, cache_salt, from_wire

    condition_vector(torch.eye(8)[0], 2, 0.25, op="<").save(store / "c.safetensors")
    entries = [{"vector": "v", "coef": 1, "when": {"not": {"vector": "c"}}}]
    resolved = effective({"avec_steering": json.dumps(entries)}, VectorStore(store), N_LAYERS)
    assert resolved[0].positions == "generated"
    wired = json.loads(wire(resolved))[0]
    assert wired["when"] == {"not": {"vector": "c", "layer": 2, "metric": "cosine", "op": "<",
                                     "threshold": 0.25}}
    assert set(wired["when_digests"]) == {"c"}
    back = from_wire({"avec_resolved": wire(resolved)}, N_LAYERS)
    assert back[0].when == resolved[0].when
    a, b = cache_salt(resolved), cache_salt(resolved)
    assert a != b and a.startswith("avec:conditional:")  # never shared
    bad = dict(wired, when_digests={"x": "0" * 64})
    with pytest.raises(SteeringRequestError, match="positions|digests"):
        from_wire({"avec_resolved": json.dumps([dict(bad, positions="all")])}, N_LAYERS)
    with pytest.raises(SteeringRequestError, match="per_token"):
        effective({"avec_steering": json.dumps([{**entries[0], "per_token": True}])},
                  VectorStore(store), N_LAYERS)
    with pytest.raises(SteeringRequestError, match=r"avec_steering\[0\]\.when\.not"):
        effective({"avec_steering": json.dumps([{"vector": "v", "coef": 1,
                                                 "when": {"not": {"vector": "nope"}}}])},
                  VectorStore(store), N_LAYERS)
