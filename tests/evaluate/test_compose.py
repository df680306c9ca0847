"""The composition arithmetic on synthetic scores whose answers are known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avec.evaluate.compose import (ScoreGrid, analyse, check_axis, default_at, direction_cosines,
                                   grid_cells, measure, plot_composition)
from avec.vector import SteeringVector

C1 = (-1.0, 0.0, 1.0, 2.0)
C2 = (0.0, 0.5, 3.0)


def test_an_additive_score_has_zero_additivity_error_everywhere():
    # s = 5 + 2 c1 + sin(c2) + c1^2: additive in (c1, c2), though not linear
    grid = measure(["a", "b"], [C1, C2], ["s", "s"],
                   lambda c: {"s": 5 + 2 * c[0] + math.sin(c[1]) + c[0] ** 2})
    comp = analyse(grid)
    assert np.abs(comp.interaction["s"]).max() < 1e-12
    assert comp.base["s"] == 5
    assert comp.effect(0, "s", 2.0) == pytest.approx(2 * 2 + 4)
    assert comp.effect(1, "s", 3.0) == pytest.approx(math.sin(3.0))
    add = comp.additivity()["s"]  # default operating point: (2, 3)
    assert comp.at == (2.0, 3.0)
    assert add["joint"] == pytest.approx(8 + math.sin(3.0))
    assert add["sum_of_single"] == pytest.approx(add["joint"])
    assert add["additivity_error"] < 1e-12 and add["relative_error"] < 1e-12


def test_an_interaction_term_is_exactly_the_additivity_error():
    grid = measure(["a", "b"], [C1, C2], ["s", "s"],
                   lambda c: {"s": 1 + c[0] + c[1] + 0.7 * c[0] * c[1]})
    comp = analyse(grid)
    for cell in grid_cells(grid.coefs):
        assert comp.interaction["s"][grid.index(cell)] == pytest.approx(0.7 * cell[0] * cell[1])
    add = comp.additivity((2.0, 3.0))["s"]
    assert add["interaction"] == pytest.approx(0.7 * 6)
    assert add["joint"] == pytest.approx(2 + 3 + 4.2)
    assert add["sum_of_single"] == pytest.approx(5)
    assert add["relative_error"] == pytest.approx(4.2 / 5)
    summary = comp.grid_summary()["s"]
    assert summary["max_additivity_error"] == pytest.approx(4.2)
    assert summary["at"] == [2.0, 3.0]
    # cells with both vectors on: (-1|1|2) x (0.5|3)
    expected = np.mean([abs(0.7 * a * b) for a in (-1, 1, 2) for b in (0.5, 3)])
    assert summary["mean_additivity_error"] == pytest.approx(expected)


def test_independent_scores_have_zero_cross_talk():
    grid = measure(["a", "b"], [C1, C2], ["s1", "s2"],
                   lambda c: {"s1": 3 * c[0], "s2": c[1] ** 2 - 1})
    comp = analyse(grid, at=(1.0, 3.0))
    talk = comp.cross_talk()
    assert talk == {"s1": {"a": 3.0, "b": 0.0}, "s2": {"a": 0.0, "b": 9.0}}
    rel = comp.relative_cross_talk()
    assert rel == {"s1": {"a": 1.0, "b": 0.0}, "s2": {"a": 0.0, "b": 1.0}}
    assert all(np.abs(comp.interaction[s]).max() == 0 for s in ("s1", "s2"))


def test_cross_talk_relative_to_the_own_effect():
    grid = measure(["a", "b"], [C1, C2], ["s1", "s2"],
                   lambda c: {"s1": 2 * c[0] + 0.5 * c[1], "s2": 4 * c[1] - c[0]})
    comp = analyse(grid, at=(2.0, 0.5))
    assert comp.cross_talk()["s2"]["a"] == pytest.approx(-2.0)  # a moves s2 by -1 per unit
    assert comp.relative_cross_talk()["s2"]["a"] == pytest.approx(-2.0 / 4.0)
    assert comp.relative_cross_talk()["s1"]["b"] == pytest.approx(0.25 / 2.0)


def test_per_item_values_give_paired_standard_errors():
    # item k: s = c1 + c2 + k * c1 * c2 with k in 0..3: mean interaction 1.5 c1 c2
    items = np.arange(4.0)
    grid = measure(["a", "b"], [(0, 1), (0, 2)], ["s", "s"],
                   lambda c: {"s": list(c[0] + c[1] + items * c[0] * c[1])})
    comp = analyse(grid)
    add = comp.additivity()["s"]
    assert add["interaction"] == pytest.approx(1.5 * 2)
    per_item = items * 2
    assert add["interaction_se"] == pytest.approx(per_item.std(ddof=1) / 2)
    assert comp.effect_se(0, "s") == 0.0  # every item moves by exactly 1: no spread
    one = analyse(measure(["a", "b"], [(0, 1), (0, 1)], ["s", "s"], lambda c: {"s": c[0]}))
    assert one.additivity()["s"]["interaction_se"] is None


def test_three_vectors_and_the_json():
    grid = measure(["a", "b", "c"], [(0, 1), (0, 1), (-1, 0)], ["x", "x", "y"],
                   lambda c: {"x": c[0] + c[1] + c[0] * c[1] * c[2], "y": c[2]})
    comp = analyse(grid)
    assert comp.at == (1.0, 1.0, -1.0)
    assert comp.additivity()["x"]["interaction"] == pytest.approx(-1.0)
    assert comp.interaction["x"][grid.index((1, 1, 0))] == 0
    doc = comp.to_dict()
    assert doc["targets"] == {"a": "x", "b": "x", "c": "y"}
    assert doc["scores"]["y"]["effects"]["c"]["-1"]["effect"] == -1.0
    assert doc["scores"]["x"]["interaction"][1][1][0] == pytest.approx(-1.0)


def test_cells_given_in_unsorted_order_are_sorted_with_their_values():
    coefs = [(2.0, 0.0), (0.0, -1.0)]
    per_cell = [{"s": [10 * a + b]} for a, b in grid_cells(coefs)]
    grid = ScoreGrid.from_cells(["a", "b"], coefs, ["s", "s"], per_cell)
    assert grid.coefs == ((0.0, 2.0), (-1.0, 0.0))
    assert grid.mean("s")[grid.index((2.0, -1.0))] == 19.0
    assert grid.mean("s")[grid.index((0.0, -1.0))] == -1.0


def test_bad_grids_are_refused_with_reasons():
    with pytest.raises(ValueError, match="must include 0"):
        check_axis([1, 2], "--coefs")
    with pytest.raises(ValueError, match="repeat"):
        check_axis([0, 1, 1])
    with pytest.raises(ValueError, match="nonzero"):
        check_axis([0])
    with pytest.raises(ValueError, match="finite"):
        check_axis([0, float("nan")])
    with pytest.raises(ValueError, match="at least two vectors"):
        measure(["a"], [(0, 1)], ["s"], lambda c: {"s": 0})
    grid = measure(["a", "b"], [(0, 1), (0, 1)], ["s", "s"], lambda c: {"s": 0})
    with pytest.raises(ValueError, match="not on its grid"):
        analyse(grid, at=(1.0, 2.0))
    with pytest.raises(ValueError, match="coefficient 0"):
        analyse(grid, at=(1.0, 0.0))
    with pytest.raises(ValueError, match="target score"):
        measure(["a", "b"], [(0, 1), (0, 1)], ["s", "t"], lambda c: {"s": 0})
    assert default_at([(-2, 0, 1), (-1, 0, 1)]) == (-2, 1)


def test_cosines_at_shared_layers_and_across_layers():
    x = torch.tensor([1.0, 0.0, 0.0])
    y = torch.tensor([1.0, 1.0, 0.0])
    a = SteeringVector({3: x, 5: x})
    b = SteeringVector({3: y})
    c = SteeringVector({7: -x})
    rows = direction_cosines({"a": a, "b": b, "c": c})
    ab = [r for r in rows if (r["a"], r["b"]) == ("a", "b")]
    assert len(ab) == 1 and ab[0]["shared"] and ab[0]["layer_a"] == 3
    assert ab[0]["cosine"] == pytest.approx(1 / math.sqrt(2))
    ac = [r for r in rows if (r["a"], r["b"]) == ("a", "c")]
    assert {(r["layer_a"], r["layer_b"]) for r in ac} == {(3, 7), (5, 7)}
    assert all(not r["shared"] and r["cosine"] == pytest.approx(-1.0) for r in ac)
    cnn = direction_cosines({"p": SteeringVector({0: torch.ones(2, 2)}),
                             "q": SteeringVector({1: torch.ones(3)})})
    assert cnn[0]["cosine"] is None


def test_the_grid_picture(tmp_path):
    grid = measure(["a", "b"], [C1, C2], ["s1", "s2"],
                   lambda c: {"s1": c[0] * c[1], "s2": c[1]})
    path = plot_composition(analyse(grid), tmp_path / "g.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
