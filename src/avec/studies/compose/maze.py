"""A composition grid on the maze policy: each test maze's own cheese vector and top-right
vector (:mod:`avec.studies.maze.steering`) applied together at every combination of their
coefficients, scored by P(cheese) and P(top-right) at the maze's decision square (and the
log-odds between those two moves).

The mazes are those of ``avec maze top-right`` (held out, smaller than the world, so a corridor
to the world's corner can be opened). Per maze, one batched forward pass holds every cell: the
mouse stands on the decision square in each row, and each vector is one intervention with a
per-row coefficient, so the row of cell ``(0, 0)`` is the unsteered policy (the
probabilities are those of :func:`avec.studies.maze.field.decision_probs`). A cell ``(a, b)``
adds ``a * cheese + b * top_right``: subtracting the cheese vector is a negative ``a``.

At the decision square the two moves are different moves of one softmax, so
P(cheese) + P(top-right) <= 1: the scores are coupled by construction, and a vector that lowers
one may raise the other without any shared circuit."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from avec.evaluate.compose import ScoreGrid, check_axis, grid_cells
from avec.intervene.steer import Intervention, steer
from avec.studies.maze.env import decision_square
from avec.studies.maze.policy import MazePolicy
from avec.studies.maze.steering import (CHEESE_SITE, cheese_vector, held_out_mazes,
                                        policy_model, top_right_vector)

VECTORS = ("cheese", "top-right")
SCORES = ("P(cheese)", "P(top-right)")  # the vectors' own scores, in order
LOG_ODDS = "log-odds cheese:top-right"  # logit(cheese move) - logit(top-right move)


@dataclass(frozen=True)
class MazeComposeSettings:
    site: str = CHEESE_SITE
    mazes: int = 200
    seed: int = 20230303  # the test mazes of `avec maze top-right`
    cheese_coefs: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)
    top_right_coefs: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0)


@dataclass
class MazeGrid:
    """The grid, the cosine of the two vectors in each maze, the wall time and the process's
    CPU time."""

    grid: ScoreGrid
    cosines: list[float]
    settings: MazeComposeSettings
    seconds: float
    cpu_seconds: float

    def cosine_summary(self) -> dict[str, float]:
        x = np.asarray(self.cosines)
        return {"mazes": int(x.size), "median": float(np.median(x)), "mean": float(x.mean()),
                "min": float(x.min()), "max": float(x.max())}

    def describe(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "cosine_per_maze": self.cosine_summary(),
                "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2)}


@torch.no_grad()
def maze_grid(policy: MazePolicy, settings: MazeComposeSettings = MazeComposeSettings()
              ) -> MazeGrid:
    """P(cheese) and P(top-right) at the decision square of every test maze in every cell,
    and the log-odds of the two moves (the difference of their logits: free of the floor and
    ceiling of probabilities, so additivity there is not broken by saturation alone)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    axes = [check_axis(settings.cheese_coefs, "cheese coefficients"),
            check_axis(settings.top_right_coefs, "top-right coefficients")]
    cells = grid_cells(axes)
    coef_cheese = torch.tensor([c[0] for c in cells])
    coef_corner = torch.tensor([c[1] for c in cells])
    world = policy.config.world
    model = policy_model(policy, settings.site)
    mazes = held_out_mazes(settings.seed, settings.mazes, world, max_size=world - 2)
    cheese = np.zeros((len(cells), len(mazes)))
    corner = np.zeros((len(cells), len(mazes)))
    log_odds = np.zeros((len(cells), len(mazes)))
    cosines = []
    for k, maze in enumerate(mazes):
        square = decision_square(maze)
        assert square is not None  # held_out_mazes keeps mazes with one
        vc, vt = cheese_vector(model, maze), top_right_vector(model, maze)
        cosines.append(float(torch.nn.functional.cosine_similarity(
            vc[0].flatten().double(), vt[0].flatten().double(), dim=0)))
        obs = torch.from_numpy(maze.with_mouse(square.cell).observation())
        with steer(model, [Intervention(vc, coef=coef_cheese),
                           Intervention(vt, coef=coef_corner)]):
            logits = policy(obs.expand(len(cells), *obs.shape)).float()
        probs = torch.softmax(logits, dim=-1).numpy()
        cheese[:, k] = probs[:, square.cheese_move]
        corner[:, k] = probs[:, square.corner_move]
        log_odds[:, k] = (logits[:, square.cheese_move] - logits[:, square.corner_move]).numpy()
    per_cell = [{SCORES[0]: cheese[i], SCORES[1]: corner[i], LOG_ODDS: log_odds[i]}
                for i in range(len(cells))]
    grid = ScoreGrid.from_cells(list(VECTORS), axes, list(SCORES), per_cell)
    return MazeGrid(grid, cosines, settings, time.perf_counter() - t0,
                    time.process_time() - cpu0)
