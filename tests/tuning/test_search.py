"""The search on a tiny random model with synthetic scores and budgets (known optima)."""

from __future__ import annotations

import math

import pytest
import torch

from avec.tuning import FunctionBudget, FunctionScore, TuneConfig, tune
from avec.tuning.search import _next_guess, band, pick_layers, split_items
from avec.vector import SteeringVector

WIDE = tuple(2 ** (k / 2) for k in range(-8, 16))  # doses 1/16 .. 181: any boundary is inside

GAIN = {0: 1.0, 1: 3.0, 2: 2.0, 3: 1.0}  # score per unit coefficient
COST = {0: 1.0, 1: 2.0, 2: 0.5, 3: 1.0}  # side effect per unit coefficient


def mean(table, layers):
    return sum(table[L] for L in layers) / len(layers)


@pytest.fixture()
def vector(tiny_llama):
    g = torch.Generator().manual_seed(0)
    return SteeringVector({L: torch.randn(tiny_llama.d_model, generator=g)
                           for L in range(tiny_llama.n_layers)})


def test_the_search_finds_the_known_optimum_within_the_budget(tiny_llama, vector):
    """Score = gain x coef, side effect = cost x coef: the best setting is the layer with the
    highest gain / cost (layer 2: 4) at its boundary coef = 1 / cost = 2."""
    score = FunctionScore(fn=lambda layers, c: mean(GAIN, layers) * c, items=9)
    budget = FunctionBudget(fn=lambda layers, c: mean(COST, layers) * c, limit=1.0)
    result = tune(tiny_llama, vector, score, budget,
                  TuneConfig(layers=[0, 1, 2, 3], doses=WIDE, bands=(3,), progress=False))
    assert result.layers == (2,)
    assert 0.9 * 2.0 <= result.coef <= 2.0  # stops once the side effect is >= 0.9 x budget
    assert result.budget_value <= 1.0
    for L, boundary in ((0, 1.0), (1, 0.5), (2, 2.0), (3, 1.0)):
        assert 0.9 * boundary <= result.frontier[str(L)] <= boundary
    # every scored point, the one chosen included, is within the budget
    scored = [p for p in result.points if p.score is not None]
    assert scored and all(p.budget <= budget.limit for p in scored)
    assert {p.stage for p in scored} == {"frontier", "fraction", "band"}
    assert 0.9 <= result.frontier["1-3"] * mean(COST, (1, 2, 3)) <= 1.0
    assert result.held_out is not None and result.held_out.items == 3
    assert result.held_out.kept == pytest.approx(1.0)


def test_a_band_wins_when_it_scores_best(tiny_llama, vector):
    """A score that rewards spreading the coefficient (e.g. coherence) picks a band."""
    score = FunctionScore(fn=lambda layers, c: c * len(layers), items=6)
    budget = FunctionBudget(fn=lambda layers, c: c, limit=1.0)
    result = tune(tiny_llama, vector, score, budget,
                  TuneConfig(layers=[1, 2], doses=WIDE, bands=(3,), progress=False))
    assert result.layers in ((0, 1, 2), (1, 2, 3))
    assert result.coef <= 1.0


def test_the_budget_walk_stops_at_the_first_crossing(tiny_llama, vector):
    """Per layer the grid walk measures no grid dose beyond the first one that blew the
    budget (walking up), and bisection stays between the bracket."""
    budget = FunctionBudget(fn=lambda layers, c: mean(COST, layers) * c, limit=1.0)
    result = tune(tiny_llama, vector, FunctionScore(fn=lambda layers, c: c, items=4), budget,
                  TuneConfig(layers=[0, 2], doses=WIDE, bands=(), progress=False))
    for L in (0, 2):
        grid = [p for p in result.points if p.layers == (L,) and p.stage == "grid"]
        blown = [p for p in grid if p.budget > 1.0]
        assert len(blown) <= 1
        if blown:
            assert all(p.coef < blown[0].coef for p in grid if p is not blown[0])
    assert len(budget.calls) < 2 * len(WIDE)  # far fewer than the whole grid per layer


def test_nothing_within_the_budget_is_an_error_that_says_what_to_do(tiny_llama, vector):
    budget = FunctionBudget(fn=lambda layers, c: 10.0 + c, limit=1.0)
    with pytest.raises(ValueError, match="raise the budget or give smaller doses"):
        tune(tiny_llama, vector, FunctionScore(items=4), budget,
             TuneConfig(layers=[1], bands=(), progress=False))


def test_bad_inputs_are_refused(tiny_llama, vector):
    with pytest.raises(ValueError, match="no layer"):
        tune(tiny_llama, vector.select([1]), FunctionScore(items=4), FunctionBudget(),
             TuneConfig(layers=[2], progress=False))
    with pytest.raises(ValueError, match="at least 2"):
        tune(tiny_llama, vector, FunctionScore(items=1), FunctionBudget(),
             TuneConfig(progress=False))
    block = SteeringVector({1: torch.ones(3, tiny_llama.d_model)})
    with pytest.raises(ValueError, match=r"\[d\] directions"):
        tune(tiny_llama, block, FunctionScore(items=4), FunctionBudget(),
             TuneConfig(progress=False))
    for bad in ({"doses": (0.0,)}, {"held_out": 1.0}, {"stride": 0}, {"start_dose": -1.0}):
        with pytest.raises(ValueError):
            TuneConfig(**bad)


def test_the_split_is_seeded_disjoint_and_complete():
    a, b = split_items(16, 1 / 3, seed=3)
    assert (a, b) == split_items(16, 1 / 3, seed=3)
    assert sorted(a + b) == list(range(16)) and len(b) == 5
    assert split_items(16, 1 / 3, seed=4) != (a, b)
    assert split_items(2, 0.5, 0) in (([0], [1]), ([1], [0]))


def test_layer_choices_and_bands():
    cfg = TuneConfig(max_layers=4)
    assert pick_layers(list(range(30)), 30, cfg) == [6, 12, 18, 24]
    assert pick_layers([3, 9], 30, cfg) == [9]  # 3 is below 20% of the depth
    assert pick_layers([2, 3], 30, cfg) == [2, 3]  # none in the middle: all of them
    assert band(5, 3, 30) == (4, 5, 6) and band(0, 3, 30) == () and band(29, 3, 30) == ()


def test_the_boundary_guess_stays_inside_its_bracket():
    for lo, vlo, hi, vhi in ((1.0, 0.3, 2.0, 1.5), (1.0, 0.99, 2.0, 50.0), (0.0, 0.0, 4.0, 9.0),
                             (1.0, 0.5, 2.0, 0.4)):
        g = _next_guess(lo, vlo, hi, vhi, 1.0, 0.9)
        assert lo < g < hi and math.isfinite(g)
    # a quadratic side effect: one guess lands in [0.9, 1] x the budget
    g = _next_guess(1.0, 0.25, 4.0, 4.0, 1.0, 0.9)
    assert 0.9 <= 0.25 * g ** 2 <= 1.0
