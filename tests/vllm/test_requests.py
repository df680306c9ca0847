"""Parsing and resolving a request's steering (no engine needed)."""

from __future__ import annotations

import json

import pytest
import torch

from avec.vector import SteeringVector
from avec.vllm.requests import SteeringRequestError, cache_salt, parse
from avec.vllm.store import VectorStore


@pytest.fixture()
def store(tmp_path):
    SteeringVector({3: torch.ones(8), 5: torch.ones(8)}).save(tmp_path / "v.safetensors")
    SteeringVector({1: torch.ones(4, 8)}).save(tmp_path / "block.safetensors")
    return tmp_path


def test_entries_resolve_with_defaults(store):
    (store / "block.safetensors").unlink()
    st = VectorStore(store)
    (e,) = parse({"avec_steering": json.dumps([{"vector": "v", "coef": 2}])}, st, 10)
    assert (e.layers, e.op, e.positions, e.coef) == ((3, 5), "add", "all", 2.0)
    (e,) = parse({"avec_steering": [{"vector": "v", "coef": 1.5, "layers": [5],
                                     "positions": "from:4", "op": "clamp", "value": 3}]}, st, 10)
    assert (e.layers, e.positions, e.value) == ((5,), 4, 3.0)
    assert parse(None, st, 10) == () and parse({"other": 1}, st, 10) == ()


def test_a_per_position_block_is_refused_at_load(store):
    from avec.errors import AvecError

    with pytest.raises(AvecError, match=r"\[T, d\] blocks"):
        VectorStore(store)


@pytest.mark.parametrize("entries, message", [
    ([{"vector": "v"}], r"avec_steering\[0\]\.coef: Field required"),
    ([{"vector": "v", "coef": True}], r"avec_steering\[0\]\.coef"),
    ([{"vector": "v", "coef": float("nan")}], r"avec_steering\[0\]\.coef"),
    ([{"vector": "v", "coef": 1, "layers": []}], r"layers must not be empty"),
    ([{"vector": "v", "coef": 1, "layers": [4]}], r"has no layer 4"),
    ([{"vector": "v", "coef": 1, "positions": "from:x"}], r"from:K"),
    ([{"vector": "../etc", "coef": 1}], r"invalid vector name"),
    ([{"vector": "v", "coef": 1, "value": 1e30}], r"\|value\| must be"),
])
def test_bad_entries_name_the_field(store, entries, message):
    (store / "block.safetensors").unlink()
    with pytest.raises(SteeringRequestError, match=message):
        parse({"avec_steering": entries}, VectorStore(store), 10)


def test_layers_outside_the_model_are_refused(store):
    (store / "block.safetensors").unlink()
    with pytest.raises(SteeringRequestError, match=r"outside this model's 0..3"):
        parse({"avec_steering": [{"vector": "v", "coef": 1}]}, VectorStore(store), 4)


def test_cache_salt_follows_the_steering_and_the_file(store):
    (store / "block.safetensors").unlink()
    st = VectorStore(store)
    a = parse({"avec_steering": [{"vector": "v", "coef": 1}]}, st, 10)
    b = parse({"avec_steering": [{"vector": "v", "coef": 2}]}, st, 10)
    assert cache_salt(()) is None
    assert cache_salt(a) == cache_salt(parse({"avec_steering": [{"vector": "v", "coef": 1}]},
                                             st, 10))
    assert cache_salt(a) != cache_salt(b)
    SteeringVector({3: torch.full((8,), 2.0), 5: torch.ones(8)}).save(store / "v.safetensors")
    fresh = VectorStore(store)  # a changed file: another digest, another salt
    assert cache_salt(parse({"avec_steering": [{"vector": "v", "coef": 1}]}, fresh, 10)) \
        != cache_salt(a)


def _fake_runner(extra: list, spans: list[tuple[int, int]], n_prompt: list[int]):
    from types import SimpleNamespace as NS

    import numpy as np

    ids = [f"r{i}" for i in range(len(extra))]
    qsl = np.array([spans[0][0], *[e for _, e in spans]])
    return NS(input_batch=NS(num_reqs=len(ids), req_ids=ids, num_prompt_tokens=np.array(n_prompt)),
              query_start_loc=NS(np=qsl),
              requests={rid: NS(req_id=rid, sampling_params=NS(extra_args=x))
                        for rid, x in zip(ids, extra)})


def test_the_op_steers_each_requests_own_rows_and_positions(store, monkeypatch):
    """Engine-free: three requests in one flattened step (a 3-token prefill chunk starting at
    position 2, a decode token, a 2-token prefill), each with its own entry."""
    from avec.vllm import VECTORS_ENV
    from avec.vllm.steering import WorkerState, apply

    (store / "block.safetensors").unlink()
    monkeypatch.setenv(VECTORS_ENV, str(store))
    runner = _fake_runner([{"avec_steering": [{"vector": "v", "coef": 2, "layers": [3],
                                               "positions": "generated"}]},
                           None,
                           {"avec_steering": [{"vector": "v", "coef": 1, "layers": [3],
                                               "positions": "prompt"},
                                              {"vector": "v", "coef": 1, "layers": [3],
                                               "op": "clamp", "value": 0.0}]}],
                          [(0, 3), (3, 4), (4, 6)], [3, 5, 1])
    state = WorkerState()
    state.n_layers = 10
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


def test_a_vector_gone_since_admission_fails_only_its_request(store, monkeypatch, caplog):
    from avec.vllm import VECTORS_ENV
    from avec.vllm.steering import WorkerState, apply

    (store / "block.safetensors").unlink()
    monkeypatch.setenv(VECTORS_ENV, str(store))
    runner = _fake_runner([{"avec_steering": [{"vector": "gone", "coef": 1}]},
                           {"avec_steering": [{"vector": "v", "coef": 1, "layers": [3]}]}],
                          [(0, 1), (1, 2)], [4, 4])
    state = WorkerState()
    state.n_layers = 10
    state.begin_step(runner)
    out = apply(state, torch.zeros(2, 8), torch.zeros(2, 8), torch.tensor([5, 5]), 3)
    assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[1], torch.ones(8))
    assert "r0 runs UNSTEERED" in caplog.text
