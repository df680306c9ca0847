"""Vector fields: the policy's move probabilities with the mouse on every free cell."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from avec.studies.maze.env import Cell, DecisionSquare, Maze, decision_square
from avec.studies.maze.policy import MazePolicy


@dataclass(frozen=True)
class VectorField:
    """``probs[i]`` are the move probabilities (up, down, left, right) at ``cells[i]``."""

    maze: Maze
    cells: list[Cell]
    probs: np.ndarray  # [n_cells, 4]

    def at(self, cell: Cell) -> np.ndarray:
        return self.probs[self.cells.index(cell)]


@torch.no_grad()
def vector_field(policy: MazePolicy, maze: Maze, cells: list[Cell] | None = None) -> VectorField:
    """One batched forward pass with the mouse on each of ``cells`` (default: every free cell).

    Steering hooks installed on the policy (``avec.steer``) act on every one of these passes.
    """
    cells = maze.free_cells() if cells is None else list(cells)
    obs = torch.from_numpy(np.stack([maze.with_mouse(cell).observation() for cell in cells]))
    device = next(policy.parameters()).device
    probs = torch.softmax(policy(obs.to(device)).float(), dim=-1).cpu().numpy()
    return VectorField(maze, cells, probs)


@dataclass(frozen=True)
class DecisionProbs:
    """P(move toward the cheese) and P(move toward the top-right corner) at the decision square."""

    cheese: float
    corner: float


def decision_probs(policy: MazePolicy, maze: Maze,
                   square: DecisionSquare | None = None) -> DecisionProbs:
    """The policy's probabilities at ``maze``'s decision square (computed if not given).

    The observation is ``maze`` as given: pass a maze with its cheese removed to ask where the
    mouse goes without it (the decision square itself always comes from the cheese's maze)."""
    square = square or decision_square(maze)
    if square is None:
        raise ValueError("this maze has no decision square (one path contains the other)")
    probs = vector_field(policy, maze, [square.cell]).probs[0]
    return DecisionProbs(float(probs[square.cheese_move]), float(probs[square.corner_move]))


@torch.no_grad()
def greedy_rollout(policy: MazePolicy, maze: Maze, steps: int) -> list[Cell]:
    """The cells the mouse visits taking the most likely move at each step (walls stop it),
    starting where ``maze.mouse`` stands; steering hooks in force act on every step."""
    device = next(policy.parameters()).device
    visited = [maze.mouse]
    for _ in range(steps):
        obs = torch.from_numpy(maze.observation()).unsqueeze(0).to(device)
        maze = maze.step(int(policy(obs).argmax(-1)))
        visited.append(maze.mouse)
    return visited
