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
