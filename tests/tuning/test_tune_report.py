"""What avec tune writes: the recommended block in the vector file (round trip), tune.json, the
heatmaps and the HTML report; and the objectives' batching."""

from __future__ import annotations

import json

import pytest
import torch

from avec.tuning import FunctionBudget, FunctionScore, KLBudget, KeywordScore, TuneConfig, tune
from avec.tuning.objectives import per_vector
from avec.tuning.report import recommendation, write
from avec.vector import Recommendation, SteeringVector, load_vector


@pytest.fixture()
def tuned(tiny_llama):
    g = torch.Generator().manual_seed(1)
    vec = SteeringVector({L: torch.randn(tiny_llama.d_model, generator=g) for L in range(4)},
                         {"method": "mean_diff"})
    result = tune(tiny_llama, vec, FunctionScore(fn=lambda layers, c: c, items=6),
                  FunctionBudget(fn=lambda layers, c: c / 4, limit=1.0),
                  TuneConfig(layers=[1, 2], doses=tuple(2.0 ** k for k in range(-4, 8)),
                             progress=False))
    return vec, result


def test_the_recommended_block_round_trips(tmp_path, tiny_llama, tuned):
    vec, result = tuned
    files = write(result, vec, tiny_llama, tmp_path)
    back = load_vector(files["vector"], tiny_llama)
    rec = back.recommended
    assert rec is not None
    assert (rec.layers, rec.op, rec.positions) == (result.layers, "add", "all")
    assert rec.coef == pytest.approx(result.coef, rel=1e-6)
    assert rec.details["budget"]["metric"] == "function" and rec.details["budget"]["max"] == 1.0
    assert rec.details["score"]["held_in"] == pytest.approx(result.score_held_in, rel=1e-6)
    assert rec.details["model"]["name"] == tiny_llama.name
    assert rec.details["measured"]["by"] == "avec tune"
    assert back.metadata["method"] == "mean_diff"  # the rest of the metadata is kept
    assert torch.equal(back[1], vec[1])  # the directions are unchanged
    doc = json.loads((tmp_path / "tune.json").read_text())
    assert len(doc["points"]) == len(result.points) and doc["recommended"]["coef"] == rec.coef
    assert (tmp_path / "tune_budget.png").stat().st_size > 1000
    html = (tmp_path / "report.html").read_text()
    assert "held-out score" in html and "Recommended block" in html
    assert rec == recommendation(result, tiny_llama)


def test_a_recommendation_is_checked_when_the_file_loads(tmp_path):
    from avec.errors import VectorFileError

    vec = SteeringVector({1: torch.ones(8)})
    with pytest.raises(ValueError, match=r"layers \[3\] are not in this vector"):
        vec.with_recommendation(Recommendation((3,), 1.0))
    for block, message in (({"layers": [3], "coef": 1.0}, "does not hold"),
                           ({"layers": [1], "coef": "big"}, "recommended.coef"),
                           ({"layers": [1], "coef": 1.0, "op": "scale"}, "recommended.op"),
                           ({"layers": [], "coef": 1.0}, "recommended.layers"),
                           ({"coef": 1.0}, "an object with layers and coef")):
        SteeringVector({1: torch.ones(8)}, {"recommended": block}).save(tmp_path / "v.safetensors")
        with pytest.raises(VectorFileError, match=message):
            load_vector(tmp_path / "v.safetensors")
    with pytest.raises(ValueError, match="no recommended setting: give a coefficient"):
        vec.require_recommended()
    tuned = vec.with_recommendation(Recommendation((1,), 2.0))
    assert tuned.select([1]).recommended is not None
    assert SteeringVector({1: torch.ones(8), 2: torch.ones(8)}, dict(
        tuned.metadata)).select([2]).recommended is None  # its layers are gone


def test_objectives_batch_by_vector_and_keep_order(tiny_llama):
    a, b = SteeringVector({1: torch.ones(32)}), SteeringVector({2: torch.ones(32)})
    calls = []

    def measure(vec, coefs):
        calls.append((vec, list(coefs)))
        return [f"{id(vec)}:{c}" for c in coefs]

    out = per_vector([(a, 1.0), (b, 2.0), (a, 3.0), (None, 0.0)], measure)
    assert out == [f"{id(a)}:1.0", f"{id(b)}:2.0", f"{id(a)}:3.0", f"{id(None)}:0.0"]
    assert len(calls) == 3  # one call per distinct vector
    kl = KLBudget(prompts=["hello there", "a b c"], limit=1.0)
    values = kl.measure(tiny_llama, [(None, 0.0), (a, 0.0), (a, 30.0)])
    assert values[0] == 0.0 and values[1] == pytest.approx(0.0, abs=1e-6) and values[2] > 0
    words = KeywordScore(prompts=["say x", "say y"], keywords=["zzzz"], max_new_tokens=4)
    rows = words.per_item(tiny_llama, [(None, 0.0), (a, 5.0)], [0, 1])
    assert rows.shape == (2, 2) and float(rows.sum()) == 0.0
    assert len(words.samples) == 2


def test_a_band_is_recommended_per_layer(tmp_path, tiny_llama):
    """A band's coefficient is split across it: the file's own directions times the
    recommended coefficient are exactly the setting the search measured."""
    from avec.tuning.search import setting_vector

    g = torch.Generator().manual_seed(2)
    vec = SteeringVector({L: torch.randn(tiny_llama.d_model, generator=g) for L in range(4)})
    result = tune(tiny_llama, vec, FunctionScore(fn=lambda layers, c: c * len(layers), items=6),
                  FunctionBudget(fn=lambda layers, c: c, limit=1.0),
                  TuneConfig(layers=[1, 2], doses=tuple(2.0 ** k for k in range(-4, 8)),
                             bands=(3,), progress=False))
    assert len(result.layers) == 3
    rec = load_vector(write(result, vec, tiny_llama, tmp_path)["vector"]).recommended
    measured = setting_vector(vec, result.layers)
    for L in result.layers:
        assert torch.allclose(vec[L] * rec.coef, measured[L] * result.coef, atol=1e-5)
