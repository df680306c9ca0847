"""Parsing and resolving a request's steering (no engine needed)."""

from __future__ import annotations

import json

import pytest
import torch

from avec.vector import SteeringVector
from avec.vllm.requests import (SteeringRequestError, cache_salt, default_entries, effective,
                                from_wire, parse, wire)
from avec.vllm.store import VectorStore


@pytest.fixture()
def store(tmp_path):
    SteeringVector({3: torch.ones(8), 5: torch.ones(8)}).save(tmp_path / "v.safetensors")
    SteeringVector({1: torch.ones(4, 8)}).save(tmp_path / "block.safetensors")
    return tmp_path


def test_entries_resolve_with_defaults(store):
    st = VectorStore(store)
    (e,) = parse({"avec_steering": json.dumps([{"vector": "v", "coef": 2}])}, st, 10)
    assert (e.layers, e.op, e.positions, e.coef) == ((3, 5), "add", "all", 2.0)
    (e,) = parse({"avec_steering": [{"vector": "v", "coef": 1.5, "layers": [5],
                                     "positions": "from:4", "op": "clamp", "value": 3}]}, st, 10)
    assert (e.layers, e.positions, e.value) == ((5,), 4, 3.0)
    assert parse(None, st, 10) == () and parse({"other": 1}, st, 10) == ()


def test_a_per_position_block_is_refused_naming_the_entry(store):
    with pytest.raises(SteeringRequestError, match=r"avec_steering\[0\]\.vector: 'block' is "
                                                  r"not usable .*\[T, d\] blocks"):
        parse({"avec_steering": [{"vector": "block", "coef": 1}]}, VectorStore(store), 10)


def test_a_vector_of_another_width_is_refused(store):
    with pytest.raises(SteeringRequestError, match=r"has width 8; this model's is 16"):
        parse({"avec_steering": [{"vector": "v", "coef": 1}]}, VectorStore(store), 10,
              d_model=16)


@pytest.mark.parametrize("entries, message", [
    ([{"vector": "v"}], r"avec_steering\[0\]\.coef: vector 'v' has no recommended setting"),
    ([{"vector": "v", "coef": "1"}], r"avec_steering\[0\]\.coef"),
    ([{"vector": "v", "coef": True}], r"avec_steering\[0\]\.coef"),
    ([{"vector": "v", "coef": float("nan")}], r"avec_steering\[0\]\.coef"),
    ([{"vector": "v", "coef": 1, "layers": []}], r"layers must not be empty"),
    ([{"vector": "v", "coef": 1, "layers": [4]}], r"has no layer 4"),
    ([{"vector": "v", "coef": 1, "positions": "from:x"}], r"from:K"),
    ([{"vector": "../etc", "coef": 1}], r"invalid vector name"),
    ([{"vector": "v", "coef": 1, "value": 1e30}],
     r"avec_steering\[0\]\.value: \|value\| 1e\+30 exceeds the limit"),
])
def test_bad_entries_name_the_field(store, entries, message):
    with pytest.raises(SteeringRequestError, match=message):
        parse({"avec_steering": entries}, VectorStore(store), 10)


def test_layers_outside_the_model_are_refused(store):
    with pytest.raises(SteeringRequestError, match=r"outside this model's 0..3"):
        parse({"avec_steering": [{"vector": "v", "coef": 1}]}, VectorStore(store), 4)


def test_cache_salt_follows_the_steering_and_the_file(store):
    st = VectorStore(store)
    a = parse({"avec_steering": [{"vector": "v", "coef": 1}]}, st, 10)
    b = parse({"avec_steering": [{"vector": "v", "coef": 2}]}, st, 10)
    assert cache_salt(()) is None
    assert cache_salt(a) == cache_salt(parse({"avec_steering": [{"vector": "v", "coef": 1}]},
                                             st, 10))
    assert cache_salt(a) != cache_salt(b)
    SteeringVector({3: torch.full((8,), 2.0), 5: torch.ones(8)}).save(store / "v.safetensors")
    # a changed file: another digest, another salt (the store sees the change at once)
    assert cache_salt(parse({"avec_steering": [{"vector": "v", "coef": 1}]}, st, 10)) \
        != cache_salt(a)


def test_unknown_avec_keys_are_refused(store):
    st = VectorStore(store)
    with pytest.raises(SteeringRequestError, match=r"avec_steer: unknown avec key"):
        parse({"avec_steer": "[]"}, st, 10)
    with pytest.raises(SteeringRequestError, match=r"avec_resolved: .*set by the server"):
        parse({"avec_resolved": "[]"}, st, 10)
    assert parse({"other_plugin": 1}, st, 10) == ()  # other plugins' keys are theirs


def test_the_default_comes_first_and_a_request_can_switch_it_off(store):
    st = VectorStore(store)
    default = default_entries(st, 10, text=json.dumps([{"vector": "v", "coef": 3,
                                                        "layers": [3]}]))
    own = {"avec_steering": json.dumps([{"vector": "v", "coef": 1, "layers": [5]}])}
    assert [e.coef for e in effective(own, st, 10, default)] == [3.0, 1.0]
    assert [e.coef for e in effective(None, st, 10, default)] == [3.0]
    for off in (False, "off", "false"):
        assert [e.coef for e in effective({**own, "avec_default": off}, st, 10, default)] \
            == [1.0]
    with pytest.raises(SteeringRequestError, match=r"avec_default='maybe'"):
        effective({"avec_default": "maybe"}, st, 10, default)
    with pytest.raises(SteeringRequestError, match=r"\$AVEC_VLLM_DEFAULT\[0\]\.layers"):
        default_entries(st, 10, text=json.dumps([{"vector": "v", "coef": 1, "layers": [4]}]))
    assert default_entries(st, 10, text="") == ()


def test_the_wire_format_round_trips_and_is_checked(store):
    st = VectorStore(store)
    entries = parse({"avec_steering": [{"vector": "v", "coef": 2, "positions": "from:7"},
                                       {"vector": "v", "coef": 1, "op": "clamp",
                                        "value": 4, "layers": [5]}]}, st, 10)
    back = from_wire({"avec_resolved": wire(entries)}, 10)
    assert back == entries  # the loaded vector is not compared: the worker finds it by digest
    with pytest.raises(SteeringRequestError, match=r"outside 0..3"):
        from_wire({"avec_resolved": wire(entries)}, 4)
    bad = json.loads(wire(entries))
    bad[0]["digest"] = "x"
    with pytest.raises(SteeringRequestError, match="avec_resolved"):
        from_wire({"avec_resolved": json.dumps(bad)}, 10)


def test_the_store_follows_the_directory_and_its_cache_is_bounded(tmp_path):
    from avec.vllm.store import VectorStore as Store

    st = Store(tmp_path, cache_size=4)
    for i in range(20):  # 20 distinct files used once each: the cache keeps the last 4
        SteeringVector({0: torch.full((8,), float(i + 1))}).save(tmp_path / f"v{i}.safetensors")
        assert st.get(f"v{i}").vector[0][0] == i + 1
    assert st.cached() == 4
    (tmp_path / "v19.safetensors").unlink()
    assert st.get("v19") is None  # removed: gone at once
    SteeringVector({0: torch.full((8,), 9.0)}).save(tmp_path / "v3.safetensors")
    assert st.get("v3").vector[0][0] == 9.0  # replaced: the new file


def test_an_entry_without_coef_takes_the_recommended_setting(store):
    from avec.vector import Recommendation, load_vector

    vec = load_vector(store / "v.safetensors")
    vec.with_recommendation(Recommendation((5,), 2.5, positions="generated")).save(
        store / "tuned.safetensors")
    st = VectorStore(store)
    (e,) = parse({"avec_steering": [{"vector": "tuned"}]}, st, 10)
    assert (e.coef, e.layers, e.op, e.positions) == (2.5, (5,), "add", "generated")
    (e,) = parse({"avec_steering": [{"vector": "tuned", "coef": "recommended",
                                     "coef_scale": 0.5, "positions": "all"}]}, st, 10)
    assert (e.coef, e.layers, e.positions) == (1.25, (5,), "all")
    (e,) = parse({"avec_steering": [{"vector": "tuned", "coef": 4, "coef_scale": 0.5}]}, st, 10)
    assert (e.coef, e.layers) == (2.0, (3, 5))  # an explicit coef: the entry's own layers
    with pytest.raises(SteeringRequestError, match=r"\.coef: \|coef\| 3000 exceeds"):
        parse({"avec_steering": [{"vector": "tuned", "coef_scale": 1200}]}, st, 10)
