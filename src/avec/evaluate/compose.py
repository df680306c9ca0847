"""Do steering vectors compose? Effects, cross-talk and additivity on a grid of coefficients.

Numbers in, numbers out: a :class:`ScoreGrid` holds, for every cell ``c = (c_1, ..., c_n)``
of a grid of coefficients (one axis per vector, each axis containing 0) and every score, the
score of each item (prompt, maze, ...) with all n vectors applied at once at their
coefficients. :func:`analyse` turns it into a :class:`Composition`:

- ``s(c)`` is the mean over items of score ``s`` at cell ``c``; ``0`` is the unsteered cell.
- **effect** of vector j at coefficient ``a`` on score s: ``s(a e_j) - s(0)`` (vector j
  alone).
- **joint effect** at cell c: ``s(c) - s(0)`` (all vectors together).
- **interaction** at c (the signed additivity error):
  ``s(c) - s(0) - sum_j [s(c_j e_j) - s(0)]``. It is 0 at every cell exactly when s is
  additive in the coefficients (``s(c) = s(0) + sum_j g_j(c_j)`` for some ``g_j``), and the
  ``c_1 * c_2`` coefficient of a score with such a term; ``|interaction|`` is the additivity
  error.
- **cross-talk** of vector j on score s: j's effect on s at its operating coefficient; the
  relative cross-talk divides it by j's effect on its own (target) score.

Every item is measured in every cell, so effects and interactions are paired differences: each
comes with a standard error, the items' standard deviation of the per-item difference over
sqrt(items) (``None`` with one item). Directions are compared by :func:`direction_cosines`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from avec.vector import SteeringVector

Cell = tuple[float, ...]


def check_axis(values: Sequence[float], what: str = "coefficients") -> tuple[float, ...]:
    """One vector's coefficients, sorted, finite, distinct and containing 0 (the unsteered
    baseline every effect is measured from); ``ValueError`` naming ``what`` otherwise."""
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{what}: no coefficients given")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{what}: coefficients must be finite, got {out}")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: coefficients repeat ({out}); give each once")
    if 0.0 not in out:
        raise ValueError(f"{what}: coefficients {out} must include 0, the unsteered baseline "
                         f"every effect is measured from")
    if len(out) < 2:
        raise ValueError(f"{what}: give a nonzero coefficient besides 0")
    return tuple(sorted(out))


def grid_cells(coefs: Sequence[Sequence[float]]) -> list[Cell]:
    """Every cell of the grid, in row-major order (the last vector's coefficient varies
    fastest): the order :meth:`ScoreGrid.from_cells` expects."""
    return [tuple(float(c) for c in cell) for cell in itertools.product(*coefs)]


@dataclass(frozen=True)
class ScoreGrid:
    """Per-item scores on a grid of coefficients.

    ``values[score]`` has shape ``[len(coefs[0]), ..., len(coefs[n-1]), items]``; items may
    differ between scores but are the same in every cell of one score. ``targets[j]`` is the
    score vector j is meant to move (its own score)."""

    vectors: tuple[str, ...]
    coefs: tuple[tuple[float, ...], ...]
    targets: tuple[str, ...]
    values: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        n = len(self.vectors)
        if n < 2:
            raise ValueError(f"composition needs at least two vectors, got {n}")
        if len(set(self.vectors)) != n:
            raise ValueError(f"vector names repeat: {list(self.vectors)}")
        if len(self.coefs) != n or len(self.targets) != n:
            raise ValueError(f"{n} vectors need {n} coefficient axes and {n} targets, got "
                             f"{len(self.coefs)} and {len(self.targets)}")
        for name, axis in zip(self.vectors, self.coefs):
            if tuple(check_axis(axis, f"vector {name!r}")) != tuple(axis):
                raise ValueError(f"vector {name!r}: coefficients {list(axis)} must be sorted")
        missing = [t for t in self.targets if t not in self.values]
        if missing:
            raise ValueError(f"target score(s) {missing} not among the scores "
                             f"{list(self.values)}")
        shape = tuple(len(a) for a in self.coefs)
        for score, arr in self.values.items():
            if arr.ndim != n + 1 or arr.shape[:n] != shape or arr.shape[n] < 1:
                raise ValueError(f"score {score!r}: values of shape {arr.shape}; expected "
                                 f"{shape} + (items,)")
            if not np.isfinite(arr).all():
                raise ValueError(f"score {score!r} has non-finite values")

    @classmethod
    def from_cells(cls, vectors: Sequence[str], coefs: Sequence[Sequence[float]],
                   targets: Sequence[str], per_cell: Sequence[Mapping[str, Sequence[float]]]
                   ) -> "ScoreGrid":
        """A grid from one ``{score: per-item values}`` mapping per cell of
        ``grid_cells(coefs)`` (same order, ``coefs`` as given; the axes are then sorted)."""
        given = [[float(c) for c in a] for a in coefs]
        axes = tuple(check_axis(a, f"vector {v!r}") for v, a in zip(vectors, given))
        cells = grid_cells(given)
        if len(per_cell) != len(cells):
            raise ValueError(f"{len(per_cell)} cells of values for a grid of {len(cells)}")
        names = list(per_cell[0]) if per_cell else []
        shape = tuple(len(a) for a in axes)
        order = np.ix_(*[np.argsort(a, kind="stable") for a in given])
        values = {}
        for score in names:
            if any(set(cell) != set(names) for cell in per_cell):
                raise ValueError("every cell must give the same scores")
            rows = [np.atleast_1d(np.asarray(cell[score], dtype=np.float64))
                    for cell in per_cell]
            if len({r.shape for r in rows}) != 1 or rows[0].ndim != 1:
                raise ValueError(f"score {score!r}: cells have different numbers of items")
            values[score] = np.stack(rows).reshape(*shape, -1)[order]
        return cls(tuple(vectors), axes, tuple(targets), values)

    @property
    def scores(self) -> list[str]:
        return list(self.values)

    def items(self, score: str) -> int:
        return int(self.values[score].shape[-1])

    def mean(self, score: str) -> np.ndarray:
        """``s(c)`` over the grid: the mean over items, shape ``[len(coefs[0]), ...]``."""
        return self.values[score].mean(-1)

    def index(self, cell: Sequence[float]) -> tuple[int, ...]:
        """Grid indices of ``cell``; ``ValueError`` for a coefficient not on its axis."""
        if len(cell) != len(self.vectors):
            raise ValueError(f"a cell has {len(self.vectors)} coefficients, got {list(cell)}")
        out = []
        for name, axis, c in zip(self.vectors, self.coefs, cell):
            if float(c) not in axis:
                raise ValueError(f"coefficient {c:g} of vector {name!r} is not on its grid "
                                 f"{list(axis)}")
            out.append(axis.index(float(c)))
        return tuple(out)

    @property
    def origin(self) -> tuple[int, ...]:
        return self.index([0.0] * len(self.vectors))


def measure(vectors: Sequence[str], coefs: Sequence[Sequence[float]], targets: Sequence[str],
            score: Callable[[Cell], Mapping[str, float | Sequence[float]]]) -> ScoreGrid:
    """A grid from a function of one cell: ``score(cell) -> {name: value or per-item
    values}`` (the synthetic-score entry point; runners batch their cells instead)."""
    axes = [check_axis(a, f"vector {v!r}") for v, a in zip(vectors, coefs)]
    return ScoreGrid.from_cells(vectors, axes, targets,
                                [dict(score(cell)) for cell in grid_cells(axes)])


def _se(per_item: np.ndarray) -> np.ndarray | None:
    """Standard error of the mean over the last axis (``None`` with one item)."""
    n = per_item.shape[-1]
    if n < 2:
        return None
    return per_item.std(-1, ddof=1) / math.sqrt(n)


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Composition:
    """What a :class:`ScoreGrid` says about composing its vectors (see the module docstring).

    ``at`` is the operating point the headline numbers are read at: one nonzero coefficient
    per vector on its grid (default: the coefficient of largest magnitude, the positive one on
    a tie)."""

    grid: ScoreGrid
    at: Cell
    base: dict[str, float] = field(default_factory=dict)
    joint: dict[str, np.ndarray] = field(default_factory=dict)
    interaction: dict[str, np.ndarray] = field(default_factory=dict)
    interaction_se: dict[str, np.ndarray | None] = field(default_factory=dict)
    joint_se: dict[str, np.ndarray | None] = field(default_factory=dict)

    @property
    def vectors(self) -> tuple[str, ...]:
        return self.grid.vectors

    def _alone(self, j: int, coef: float) -> tuple[int, ...]:
        cell = [0.0] * len(self.vectors)
        cell[j] = float(coef)
        return self.grid.index(cell)

    def effect(self, vector: int, score: str, coef: float | None = None) -> float:
        """``s(coef e_j) - s(0)``: vector j alone (at its operating coefficient by default)."""
        coef = self.at[vector] if coef is None else coef
        return float(self.joint[score][self._alone(vector, coef)])

    def effect_se(self, vector: int, score: str, coef: float | None = None) -> float | None:
        se = self.joint_se[score]
        coef = self.at[vector] if coef is None else coef
        return None if se is None else float(se[self._alone(vector, coef)])

    def cross_talk(self) -> dict[str, dict[str, float]]:
        """``{score: {vector: effect at its operating coefficient}}`` for every score."""
        return {s: {v: self.effect(j, s) for j, v in enumerate(self.vectors)}
                for s in self.grid.scores}

    def relative_cross_talk(self) -> dict[str, dict[str, float | None]]:
        """Each vector's effect on every score over its effect on its own target score
        (1 on the target itself; ``None`` where the own effect is 0). A ratio of two scores'
        units: read it between scores on one scale (the vectors' own scores)."""
        out: dict[str, dict[str, float | None]] = {}
        for s in self.grid.scores:
            row: dict[str, float | None] = {}
            for j, v in enumerate(self.vectors):
                own = self.effect(j, self.grid.targets[j])
                row[v] = None if own == 0 else self.effect(j, s) / own
            out[s] = row
        return out

    def additivity(self, cell: Sequence[float] | None = None) -> dict[str, dict[str, Any]]:
        """Per score at ``cell`` (default: the operating point): the joint effect, the sum of
        the single effects, their difference (the interaction) with its standard error, and
        the additivity error relative to the sum of the single effects' magnitudes."""
        cell = tuple(self.at if cell is None else cell)
        idx = self.grid.index(cell)
        out = {}
        for s in self.grid.scores:
            singles = [self.effect(j, s, c) for j, c in enumerate(cell)]
            err = float(self.interaction[s][idx])
            scale = sum(abs(e) for e in singles)
            se = self.interaction_se[s]
            out[s] = {"joint": float(self.joint[s][idx]), "sum_of_single": float(sum(singles)),
                      "single": dict(zip(self.vectors, singles)), "interaction": err,
                      "additivity_error": abs(err),
                      "interaction_se": None if se is None else float(se[idx]),
                      "relative_error": None if scale == 0 else abs(err) / scale}
        return out

    def grid_summary(self) -> dict[str, dict[str, Any]]:
        """Per score over the cells where two or more vectors act: the largest additivity
        error and its cell, the mean additivity error, and the range of the mean score over
        the whole grid (to judge the errors against)."""
        out = {}
        cells = grid_cells(self.grid.coefs)
        mixed = [c for c in cells if sum(x != 0 for x in c) >= 2]
        for s in self.grid.scores:
            errs = [abs(float(self.interaction[s][self.grid.index(c)])) for c in mixed]
            worst = int(np.argmax(errs))
            means = self.grid.mean(s)
            out[s] = {"max_additivity_error": errs[worst], "at": list(mixed[worst]),
                      "mean_additivity_error": float(np.mean(errs)),
                      "score_range": float(means.max() - means.min())}
        return out

    def to_dict(self, per_item: bool = True) -> dict[str, Any]:
        """Everything as JSON-ready values; grids as nested lists indexed like the grid; with
        ``per_item`` every item's score too (rounded to 6 decimals)."""
        g = self.grid
        scores: dict[str, Any] = {}
        for s in g.scores:
            se = self.interaction_se[s]
            scores[s] = {
                "items": g.items(s), "unsteered": self.base[s],
                "mean": g.mean(s).tolist(), "joint_effect": self.joint[s].tolist(),
                "interaction": self.interaction[s].tolist(),
                "interaction_se": None if se is None else se.tolist(),
                "effects": {v: {f"{c:g}": {"effect": self.effect(j, s, c),
                                           "se": _num(self.effect_se(j, s, c))}
                                for c in g.coefs[j] if c != 0}
                            for j, v in enumerate(g.vectors)},
            }
            if per_item:  # 6 decimals: the file stays small, the means agree to 1e-6
                scores[s]["per_item"] = np.round(g.values[s], 6).tolist()
        return {"vectors": list(g.vectors), "coefs": [list(a) for a in g.coefs],
                "targets": dict(zip(g.vectors, g.targets)), "at": list(self.at),
                "cross_talk": self.cross_talk(),
                "relative_cross_talk": self.relative_cross_talk(),
                "additivity": self.additivity(), "grid_summary": self.grid_summary(),
                "scores": scores}


def default_at(coefs: Sequence[Sequence[float]]) -> Cell:
    """Per axis the coefficient of largest magnitude (the positive one on a tie)."""
    return tuple(max(axis, key=lambda c: (abs(c), c)) for axis in coefs)


def analyse(grid: ScoreGrid, at: Sequence[float] | None = None) -> Composition:
    """Effects, interactions and their standard errors for every cell and score;
    ``at``: the operating point (see :class:`Composition`)."""
    at = tuple(float(c) for c in (default_at(grid.coefs) if at is None else at))
    grid.index(at)  # on the grid
    zero = [v for v, c in zip(grid.vectors, at) if c == 0]
    if zero:
        raise ValueError(f"the operating point gives vector(s) {zero} coefficient 0; give "
                         f"each vector a nonzero coefficient of its grid")
    comp = Composition(grid, at)
    n = len(grid.vectors)
    origin = grid.origin
    for s in grid.scores:
        vals = grid.values[s]  # [*grid, items]
        joint = vals - vals[origin]  # per item, broadcast over the grid
        additive = np.zeros_like(joint)
        for j in range(n):
            # vector j alone at each of its coefficients, the other axes at 0
            index: list[Any] = [o for o in origin]
            index[j] = slice(None)
            single = joint[tuple(index)]  # [len(coefs[j]), items]
            shape = [1] * n + [single.shape[-1]]
            shape[j] = single.shape[0]
            additive = additive + single.reshape(shape)
        inter = joint - additive
        comp.base[s] = float(vals[origin].mean())
        comp.joint[s] = joint.mean(-1)
        comp.joint_se[s] = _se(joint)
        comp.interaction[s] = inter.mean(-1)
        comp.interaction_se[s] = _se(inter)
    return comp


# ---- directions ------------------------------------------------------------------------------

def direction_cosines(vectors: Mapping[str, SteeringVector],
                      layers: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, Any]]:
    """Cosine of every pair of vectors at the layers each steers (``layers``, default all of
    its layers).

    At a layer both steer (``shared``: True) the cosine compares two directions added at the
    same place. When two vectors share no layer, each pair of their layers is compared
    instead (``shared``: False): in a transformer every block adds into one residual stream,
    so these directions live in the same space, but they are added at different depths and
    the cosine only says whether they point alike, not whether they act alike. Directions of
    different shapes (different sites of a CNN) get ``cosine`` None. A zero direction also
    gives None."""
    names = list(vectors)
    use = {n: list(layers[n]) if layers and n in layers else vectors[n].layers for n in names}
    out = []
    for a, b in itertools.combinations(names, 2):
        shared = sorted(set(use[a]) & set(use[b]))
        pairs = [(L, L) for L in shared] or [(La, Lb) for La in use[a] for Lb in use[b]]
        for La, Lb in pairs:
            x, y = vectors[a][La].double().flatten(), vectors[b][Lb].double().flatten()
            cos = None
            if x.shape == y.shape and float(x.norm()) > 0 and float(y.norm()) > 0:
                cos = float(x @ y / (x.norm() * y.norm()))
            out.append({"a": a, "b": b, "layer_a": La, "layer_b": Lb, "shared": bool(shared),
                        "cosine": cos, "norm_a": float(x.norm()), "norm_b": float(y.norm())})
    return out


# ---- the picture -----------------------------------------------------------------------------

def plot_composition(comp: Composition, path: str | Path, *, pair: tuple[int, int] = (0, 1),
                     title: str = "", fmt: str = "{:.2f}") -> Path:
    """One row per score over the plane of vectors ``pair`` (the other vectors at 0): the
    measured mean score, the additive prediction ``s(0) + effect_i + effect_j`` and the
    interaction (measured minus predicted) on a diverging scale centred at 0. The operating
    point's cell is outlined in red."""
    from matplotlib.patches import Rectangle

    from avec.report import pyplot, save_figure

    g = comp.grid
    i, j = pair
    if i == j or not (0 <= i < len(g.vectors) and 0 <= j < len(g.vectors)):
        raise ValueError(f"pair {pair}: two different vector indices in 0..{len(g.vectors) - 1}")
    index: list[Any] = list(g.origin)
    index[i], index[j] = slice(None), slice(None)
    swap = i > j  # numpy keeps axis order: rows are the lower index

    def plane(arr: np.ndarray) -> np.ndarray:
        out = arr[tuple(index)]
        return out.T if swap else out

    plt = pyplot()
    scores = g.scores
    fig, axes = plt.subplots(len(scores), 3, figsize=(15, 4.3 * len(scores)), squeeze=False)
    rows, cols = g.coefs[i], g.coefs[j]
    star = (rows.index(comp.at[i]), cols.index(comp.at[j]))
    for r, s in enumerate(scores):
        measured = plane(g.mean(s))
        inter = plane(comp.interaction[s])
        predicted = measured - inter
        lo, hi = float(min(measured.min(), predicted.min())), float(max(measured.max(),
                                                                        predicted.max()))
        bound = float(np.abs(inter).max()) or 1.0
        panels = [(measured, f"{s}: measured", "viridis", lo, hi),
                  (predicted, f"{s}: additive prediction", "viridis", lo, hi),
                  (inter, f"{s}: interaction (measured - prediction)", "RdBu_r", -bound, bound)]
        for ax, (data, label, cmap, vmin, vmax) in zip(axes[r], panels):
            im = ax.imshow(data, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
            ax.set_yticks(range(len(rows)), [f"{c:g}" for c in rows])
            ax.set_xlabel(f"coefficient of {g.vectors[j]}")
            ax.set_ylabel(f"coefficient of {g.vectors[i]}")
            ax.set_title(label, fontsize=10)
            mid = (vmin + vmax) / 2
            for a in range(data.shape[0]):
                for b in range(data.shape[1]):
                    v = float(data[a, b])
                    dark = v < mid if cmap == "viridis" else abs(v) > 0.6 * bound
                    ax.text(b, a, fmt.format(v), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
            ax.add_patch(Rectangle((star[1] - 0.5, star[0] - 0.5), 1, 1, fill=False,
                                   edgecolor="red", linewidth=2))
            fig.colorbar(im, ax=ax)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
