"""The cheese vector, the top-right vector and channel retargeting (Mini, Turner et al. 2023),
done with avec's own engine: the policy is wrapped in :class:`avec.models.modules.ModuleModel`, the
vectors are ordinary :class:`SteeringVector` objects of shape ``[C, H, W]``, and
:func:`avec.steer` installs them as hooks on the named residual block.

Each study runs on held-out mazes with the cheese anywhere (the test distribution) and keeps
the mazes that have a decision square. Every vector is computed with the mouse at its start.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from avec.studies.maze.env import (MOVES, Cell, Maze, decision_square, distances, generate_maze,
                           open_corner_path, path)
from avec.studies.maze.field import DecisionProbs, decision_probs, greedy_rollout, vector_field
from avec.studies.maze.policy import MazePolicy
from avec.models.modules import ModuleModel, difference_vector, read_sites
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

CHEESE_SITE = "embedder.block2.res1.resadd"
RETARGET_SITE = "embedder.block1.res2.resadd"


def obs_batch(*mazes: Maze) -> torch.Tensor:
    return torch.from_numpy(np.stack([m.observation() for m in mazes]))


def policy_model(policy: MazePolicy, site: str) -> ModuleModel:
    """The policy as an avec model with one layer: the output of ``site``."""
    return ModuleModel(policy, [site], name="maze-policy")


def cheese_vector(model: ModuleModel, maze: Maze) -> SteeringVector:
    """Activations on the maze minus activations on the same maze with the cheese removed."""
    if maze.cheese is None:
        raise ValueError("the cheese vector needs a maze with cheese")
    return difference_vector(model, obs_batch(maze), obs_batch(maze.with_cheese(None)), [0],
                             method="cheese-vector")


def top_right_vector(model: ModuleModel, maze: Maze) -> SteeringVector:
    """Activations on the maze with a corridor opened from its top-right room to the world's
    top-right corner minus activations on the maze (the maze must be smaller than the world)."""
    return difference_vector(model, obs_batch(open_corner_path(maze)), obs_batch(maze), [0],
                             method="top-right-vector")


def random_like(vector: SteeringVector, seed: int) -> SteeringVector:
    """A Gaussian direction with the same norm and shape (the control)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for layer, direction in vector.directions.items():
        noise = torch.randn(direction.shape, generator=gen)
        out[layer] = noise * (direction.norm() / noise.norm())
    return SteeringVector(out, {**vector.metadata, "method": "random-same-norm", "seed": seed})


def average(vectors: Sequence[SteeringVector]) -> SteeringVector:
    total = vectors[0]
    for vec in vectors[1:]:
        total = total + vec
    return SteeringVector((total / len(vectors)).directions,
                          {**vectors[0].metadata, "method": f"average of {len(vectors)}"})


def held_out_mazes(seed: int, count: int, world: int, min_size: int = 3,
               max_size: int | None = None) -> list[Maze]:
    """``count`` mazes of random size in ``[min_size, world]`` with the cheese anywhere, each
    with a decision square and no larger than ``max_size`` (others skipped)."""
    rng = np.random.default_rng(seed)
    out: list[Maze] = []
    while len(out) < count:
        maze = generate_maze(rng, world=world, min_size=min_size)
        if maze.size <= (max_size or world) and decision_square(maze) is not None:
            out.append(maze)
    return out


@contextlib.contextmanager
def steering(model: ModuleModel, vector: SteeringVector | None, coef: float) -> Iterator[None]:
    """``avec.steer`` when there is a vector, nothing otherwise."""
    if vector is None:
        yield
    else:
        with steer(model, vector, coef=coef):
            yield


def _summary(rows: list[dict[str, Any]], key: str, base: str) -> dict[str, Any]:
    values = np.array([r[key] for r in rows])
    out: dict[str, Any] = {"median": round(float(np.median(values)), 4),
                           "mean": round(float(values.mean()), 4)}
    if key != base:
        ref = np.array([r[base] for r in rows])
        out["median_change"] = round(float(np.median(values) - np.median(ref)), 4)
        out["median_abs_change_per_maze"] = round(float(np.median(np.abs(values - ref))), 4)
        out["fraction_lower"] = round(float((values < ref).mean()), 4)
        out["fraction_higher"] = round(float((values > ref).mean()), 4)
    return out


@dataclass(frozen=True)
class StudySettings:
    site: str = CHEESE_SITE
    mazes: int = 200
    average_over: int = 100
    coef: float = 1.0
    seed: int = 20230303  # the test mazes' seed (training uses other seeds)


# (maze index, maze, its own vector) -> (vector to apply or None, coefficient)
Condition = Callable[[int, Maze, SteeringVector], tuple[SteeringVector | None, float]]


def _run_conditions(policy: MazePolicy, model: ModuleModel, mazes: list[Maze],
                    own: Callable[[Maze], SteeringVector], conditions: dict[str, Condition]
                    ) -> list[dict[str, Any]]:
    """Decision-square probabilities for every maze under every condition."""
    rows = []
    for i, maze in enumerate(mazes):
        square = decision_square(maze)
        assert square is not None
        vec = own(maze)
        row: dict[str, Any] = {"maze": i, "decision_square": list(square.cell),
                               "vector_norm": round(float(vec[0].norm()), 4)}
        for name, make in conditions.items():
            vector, coef = make(i, maze, vec)
            with steering(model, vector, coef):
                probs: DecisionProbs = decision_probs(policy, maze, square)
            row[f"{name}_cheese"] = probs.cheese
            row[f"{name}_corner"] = probs.corner
        rows.append(row)
    return rows


def cheese_study(policy: MazePolicy, settings: StudySettings = StudySettings()
                 ) -> dict[str, Any]:
    """P(cheese | decision square) and P(top-right | decision square): unsteered; each maze's
    own cheese vector subtracted; a random vector of the same norm subtracted; the cheese
    vector averaged over other mazes subtracted; the own vector added instead."""
    world = policy.config.world
    model = policy_model(policy, settings.site)
    mazes = held_out_mazes(settings.seed, settings.mazes, world)
    avg = average([cheese_vector(model, m) for m in
                   held_out_mazes(settings.seed + 1, settings.average_over, world)])
    c = settings.coef
    conditions: dict[str, Condition] = {
        "unsteered": lambda i, m, v: (None, 0.0),
        "cheese_vector": lambda i, m, v: (v, -c),
        "random_vector": lambda i, m, v: (random_like(v, settings.seed + i), -c),
        "average_vector": lambda i, m, v: (avg, -c),
        "added_instead": lambda i, m, v: (v, c),
    }
    rows = _run_conditions(policy, model, mazes, lambda m: cheese_vector(model, m), conditions)
    summary = {f"P(cheese) {name}": _summary(rows, f"{name}_cheese", "unsteered_cheese")
               for name in conditions}
    summary.update({f"P(top-right) {name}": _summary(rows, f"{name}_corner", "unsteered_corner")
                    for name in conditions})
    return {"settings": asdict(settings), "mazes": len(rows), "summary": summary, "rows": rows,
            "average_vector_norm": round(float(avg[0].norm()), 4)}


def top_right_study(policy: MazePolicy, settings: StudySettings = StudySettings()
                    ) -> dict[str, Any]:
    """On test mazes smaller than the world (so a path to the world's corner can be opened),
    P(top-right | decision square): unsteered; each maze's own top-right vector added; a
    random vector of the same norm added; the top-right vector averaged over other mazes
    added; the own top-right vector added together with the cheese vector subtracted."""
    world = policy.config.world
    model = policy_model(policy, settings.site)
    # the path to the world's corner needs a maze smaller than the world
    mazes = held_out_mazes(settings.seed, settings.mazes, world, max_size=world - 2)
    avg = average([top_right_vector(model, m) for m in
                   held_out_mazes(settings.seed + 1, settings.average_over, world,
                              max_size=world - 2)])
    c = settings.coef
    conditions: dict[str, Condition] = {
        "unsteered": lambda i, m, v: (None, 0.0),
        "top_right_vector": lambda i, m, v: (v, c),
        "random_vector": lambda i, m, v: (random_like(v, settings.seed + i), c),
        "average_vector": lambda i, m, v: (avg, c),
        "with_cheese_vector": lambda i, m, v: (v * c - cheese_vector(model, m) * c, 1.0),
    }
    rows = _run_conditions(policy, model, mazes, lambda m: top_right_vector(model, m),
                           conditions)
    summary = {f"P(top-right) {name}": _summary(rows, f"{name}_corner", "unsteered_corner")
               for name in conditions}
    summary.update({f"P(cheese) {name}": _summary(rows, f"{name}_cheese", "unsteered_cheese")
                    for name in conditions})
    return {"settings": asdict(settings), "mazes": len(rows), "summary": summary, "rows": rows,
            "average_vector_norm": round(float(avg[0].norm()), 4)}


# ---- retargeting --------------------------------------------------------------------------

def feature_cell(cell: Cell, world: int, side: int) -> tuple[int, int]:
    """The cell of an ``side x side`` feature map that sits over world ``cell``."""
    scale = (side - 1) / (world - 1)
    return (int(round(cell[0] * scale)), int(round(cell[1] * scale)))


@dataclass(frozen=True)
class CheeseChannel:
    channel: int
    hit_rate: float  # how often the channel's largest response to the cheese is at its cell
    present: float  # mean activation at the cheese's cell with the cheese there
    response: float  # mean (with cheese - without) at the cheese's cell

    def clamp_value(self, scale: float) -> float:
        """The activation retargeting writes: the typical cheese-present value, with the
        cheese's part of it scaled (``scale`` 1 = as if a real cheese were there)."""
        return self.present + (scale - 1.0) * self.response


def cheese_channels(policy: MazePolicy, site: str, mazes: Sequence[Maze],
                    top: int = 8) -> list[CheeseChannel]:
    """Channels whose response to the cheese (activation with minus without it) peaks at the
    cheese's position, best first."""
    model = policy_model(policy, site)
    with_cheese = read_sites(model, obs_batch(*mazes), [0])[0]
    without = read_sites(model, obs_batch(*[m.with_cheese(None) for m in mazes]), [0])[0]
    diff = with_cheese - without  # [N, C, H, W]
    n, _, side, _ = diff.shape
    cells = [feature_cell(m.cheese, m.world, side) for m in mazes if m.cheese is not None]
    flat_idx = torch.tensor([r * side + c for r, c in cells])
    rows = torch.arange(n)
    hits = (diff.flatten(2).argmax(-1) == flat_idx.view(-1, 1)).float().mean(0)
    present = with_cheese.flatten(2)[rows, :, flat_idx].mean(0)
    response = diff.flatten(2)[rows, :, flat_idx].mean(0)
    order = torch.argsort(hits, descending=True)[:top]
    return [CheeseChannel(int(ch), round(float(hits[ch]), 4), round(float(present[ch]), 4),
                          round(float(response[ch]), 4)) for ch in order]


def site_shape(policy: MazePolicy, site: str) -> tuple[int, ...]:
    """The per-example shape of ``site``'s output (one forward pass on a maze)."""
    model = policy_model(policy, site)
    maze = generate_maze(np.random.default_rng(0), world=policy.config.world)
    return tuple(read_sites(model, obs_batch(maze), [0])[0].shape[1:])


def retarget_interventions(policy: MazePolicy, site: str, channels: Sequence[CheeseChannel],
                           target: Cell, scale: float,
                           shape: tuple[int, ...] | None = None) -> list[Intervention]:
    """Clamp each channel at the target's feature cell to its cheese value
    (:meth:`CheeseChannel.clamp_value`): a one-hot direction per (channel, cell), clamped
    with ``op="clamp"``. ``shape`` is the site's :func:`site_shape` (computed if not given)."""
    shape = shape or site_shape(policy, site)
    r, c = feature_cell(target, policy.config.world, shape[-1])
    out = []
    for ch in channels:
        onehot = torch.zeros(shape)
        onehot[ch.channel, r, c] = 1.0
        vec = SteeringVector({0: onehot}, {"method": "retarget", "channel": ch.channel,
                                           "cell": [r, c], "sites": {"0": site}})
        out.append(Intervention(vec, op="clamp", value=ch.clamp_value(scale)))
    return out


def path_log_prob(policy: MazePolicy, maze: Maze, target: Cell) -> float:
    """Sum over the path from the start to ``target`` of log P(the path's move)."""
    cells = path(maze, maze.start, target)
    field = vector_field(policy, maze, cells[:-1])
    total = 0.0
    for i, (a, b) in enumerate(zip(cells[:-1], cells[1:])):
        move = MOVES.index((b[0] - a[0], b[1] - a[1]))
        total += float(np.log(max(field.probs[i][move], 1e-12)))
    return total


def random_target(maze: Maze, rng: np.random.Generator, min_distance: int = 6) -> Cell:
    """A random room (both maze coordinates even) at least ``min_distance`` moves from the
    start, away from the top-right region."""
    dist = distances(maze, maze.start)
    rooms = [cell for cell in maze.free_cells()
             if (cell[0] - maze.offset) % 2 == 0 and (cell[1] - maze.offset) % 2 == 0
             and dist[cell] >= min_distance and cell != maze.corner]
    if not rooms:
        raise ValueError(f"no room is {min_distance}+ moves from the start in this "
                         f"{maze.size}x{maze.size} maze; use larger mazes")
    return rooms[int(rng.integers(len(rooms)))]


@dataclass(frozen=True)
class RetargetSettings:
    site: str = RETARGET_SITE
    mazes: int = 200
    channel_mazes: int = 200
    channels: int = 4
    scale: float = 3.0
    min_size: int = 9  # mazes big enough for a target away from the start
    seed: int = 20230303


def retarget_study(policy: MazePolicy, settings: RetargetSettings = RetargetSettings()
                   ) -> dict[str, Any]:
    """For each test maze (side >= ``min_size``), remove the cheese, pick a random target room,
    and compare the
    log-probability of the path from the start to the target: unsteered (no cheese), with the
    cheese channels clamped at the target, and with real cheese placed at the target; and
    whether a greedy rollout of ``2 x path length`` steps reaches the target."""
    world = policy.config.world
    found = cheese_channels(policy, settings.site,
                            held_out_mazes(settings.seed + 2, settings.channel_mazes, world),
                            settings.channels)
    model = policy_model(policy, settings.site)
    shape = site_shape(policy, settings.site)
    rng = np.random.default_rng(settings.seed)
    rows = []
    for i, maze in enumerate(held_out_mazes(settings.seed, settings.mazes, world,
                                            settings.min_size)):
        empty = maze.with_cheese(None)
        target = random_target(maze, rng)
        steps = 2 * (len(path(maze, maze.start, target)) - 1)

        def measure(seen: Maze) -> tuple[float, bool]:
            return (path_log_prob(policy, seen, target),
                    target in greedy_rollout(policy, seen, steps))

        base, base_reach = measure(empty)
        with steer(model, retarget_interventions(policy, settings.site, found, target,
                                                 settings.scale, shape)):
            steered, steered_reach = measure(empty)
        real, real_reach = measure(maze.with_cheese(target))
        rows.append({"maze": i, "size": maze.size, "target": list(target),
                     "path_length": steps // 2, "unsteered": round(base, 4),
                     "retargeted": round(steered, 4), "cheese_at_target": round(real, 4),
                     "reached_unsteered": base_reach, "reached_retargeted": steered_reach,
                     "reached_cheese_at_target": real_reach})
    base_lp = np.array([r["unsteered"] for r in rows])
    steer_lp = np.array([r["retargeted"] for r in rows])
    real_lp = np.array([r["cheese_at_target"] for r in rows])
    summary = {
        "fraction_raised": round(float((steer_lp > base_lp).mean()), 4),
        "median_path_prob_unsteered": float(np.exp(np.median(base_lp))),
        "median_path_prob_retargeted": float(np.exp(np.median(steer_lp))),
        "median_path_prob_cheese_at_target": float(np.exp(np.median(real_lp))),
        "median_log_prob_gain": round(float(np.median(steer_lp - base_lp)), 4),
        **{f"reach_rate_{k}": round(float(np.mean([r[f"reached_{k}"] for r in rows])), 4)
           for k in ("unsteered", "retargeted", "cheese_at_target")},
    }
    return {"settings": asdict(settings), "channels": [asdict(ch) for ch in found],
            "summary": summary, "rows": rows}
