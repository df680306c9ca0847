"""SteeringVector: algebra, safetensors round trip, and refusal of bad files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from avec.errors import VectorFileError
from avec.vector import SteeringVector, load_vector


def vec(layers=(3, 5), d=8, seed=0, **meta) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({L: torch.randn(d, generator=g) for L in layers},
                          {"method": "mean_diff", **meta})


def test_algebra():
    a, b = vec(seed=1), vec(seed=2)
    torch.testing.assert_close((a + b)[3], a[3] + b[3])
    torch.testing.assert_close((a - b)[5], a[5] - b[5])
    torch.testing.assert_close((2 * a)[3], 2 * a[3])
    torch.testing.assert_close((a * -0.5)[5], -0.5 * a[5])
    torch.testing.assert_close((-a)[5], -a[5])
    torch.testing.assert_close((a / 4)[3], a[3] / 4)
    assert (a + b).metadata["method"] == "(mean_diff + mean_diff)"
    n = a.normalize()
    assert all(abs(v - 1) < 1e-6 for v in n.norms().values())
    assert all(abs(v - 3) < 1e-5 for v in a.normalize(3.0).norms().values())
    cos = a.cosine(a * 2)
    assert all(abs(c - 1) < 1e-9 for c in cos.values())
    assert abs(a.cosine(-a)[3] + 1) < 1e-9
    union = vec(layers=(3,)) + vec(layers=(4,))
    assert union.layers == [3, 4]
    with pytest.raises(ValueError, match="shapes"):
        a + vec(d=9)
    with pytest.raises(ValueError, match="zero vector"):
        SteeringVector({0: torch.zeros(4)}).normalize()
    assert a.select([5]).layers == [5]
    with pytest.raises(ValueError, match="no layer"):
        a.select([7])


def test_round_trip(tmp_path):
    a = vec(model={"name": "m", "d_model": 8}, n_pairs=12)
    path = a.save(tmp_path / "v.safetensors")
    b = SteeringVector.load(path)
    assert b.layers == a.layers
    for L in a.layers:
        assert torch.equal(a[L], b[L])
    assert b.metadata["n_pairs"] == 12 and b.metadata["model"]["name"] == "m"
    assert b.metadata["avec_version"] and b.metadata["format_version"] == 1
    assert b.describe()["finite"] is True


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = vec().save(tmp_path / "v.safetensors")

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert SteeringVector.load(path).layers == [3, 5]


def test_pickle_file_refused(tmp_path):
    bad = tmp_path / "v.pt"
    bad.write_bytes(pickle.dumps({"layer.3": [1.0, 2.0]}))
    with pytest.raises(VectorFileError, match="never loads pickled"):
        SteeringVector.load(bad)


def test_bad_files_refused(tmp_path):
    def write(name, tensors, meta):
        p = tmp_path / name
        save_file(tensors, str(p), metadata=meta)
        return p

    ok_meta = {"avec": json.dumps({"method": "x"})}
    cases = {
        "nan": ({"layer.1": torch.tensor([1.0, float("nan")])}, ok_meta, "NaN/inf"),
        "inf": ({"layer.1": torch.tensor([1.0, float("inf")])}, ok_meta, "NaN/inf"),
        "nometa": ({"layer.1": torch.ones(2)}, {"other": "1"}, "not an avec vector"),
        "badjson": ({"layer.1": torch.ones(2)}, {"avec": "{not json"}, "malformed JSON"),
        "notobj": ({"layer.1": torch.ones(2)}, {"avec": "[1, 2]"}, "JSON object"),
        "badname": ({"weights": torch.ones(2)}, ok_meta, "unexpected tensor"),
        "int": ({"layer.1": torch.ones(2, dtype=torch.int32)}, ok_meta, "floating point"),
        "shapes": ({"layer.1": torch.ones(2), "layer.2": torch.ones(3)}, ok_meta,
                   "different shapes"),
        "layers": ({"layer.1": torch.ones(2)}, {"avec": json.dumps({"layers": [1, 2]})},
                   "metadata lists layers"),
    }
    for name, (tensors, meta, msg) in cases.items():
        with pytest.raises(VectorFileError, match=msg):
            SteeringVector.load(write(f"{name}.safetensors", tensors, meta))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(VectorFileError, match="not a valid safetensors"):
        SteeringVector.load(garbage)
    with pytest.raises(VectorFileError, match="not found"):
        SteeringVector.load(tmp_path / "missing.safetensors")


def test_wrong_width_refused(tmp_path, tiny_llama):
    path = vec(d=tiny_llama.d_model + 4, model={"name": "big", "d_model": 36}).save(
        tmp_path / "v.safetensors")
    with pytest.raises(VectorFileError, match=r"width 36 \(made on big, d_model 36\)"):
        load_vector(path, tiny_llama)
    ok = vec(layers=(1,), d=tiny_llama.d_model).save(tmp_path / "ok.safetensors")
    assert load_vector(ok, tiny_llama).width == tiny_llama.d_model
    far = vec(layers=(40,), d=tiny_llama.d_model).save(tmp_path / "far.safetensors")
    with pytest.raises(VectorFileError, match="has layers 0..3"):
        load_vector(far, tiny_llama)
