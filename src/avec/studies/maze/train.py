"""Behaviour cloning: teach the policy the shortest-path move to the cheese.

Training mazes put the cheese in the top-right ``region x region`` square (the goal
misgeneralization setting of Langosco et al. 2022, which the cheese-vector paper studies), so the
network can learn "go to the cheese", "go to the top-right" or a mixture. States are every
cell on the expert route from the start to the cheese, plus a seeded fraction ``off_route`` of
the other free cells (1.0 = every cell).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from avec.studies.maze.env import Maze, best_move, distances, generate_maze, path
from avec.studies.maze.policy import MazePolicy, PolicyConfig


@dataclass(frozen=True)
class TrainConfig:
    world: int = 15
    min_size: int = 3
    region: int = 3
    mazes: int = 1500
    val_mazes: int = 100
    off_route: float = 1.0
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    seed: int = 0
    channels: tuple[int, ...] = (16, 32, 32)
    hidden: int = 256
    strides: tuple[int, ...] = (1, 2, 2)


def expert_states(maze: Maze, off_route: float,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Observations ``[N, 3, W, W]`` and expert moves ``[N]`` for one maze."""
    if maze.cheese is None:
        raise ValueError("expert states need a maze with cheese")
    dist = distances(maze, maze.cheese)
    route = set(path(maze, maze.start, maze.cheese)[:-1])
    cells = [cell for cell in maze.free_cells() if cell != maze.cheese
             and (cell in route or rng.random() < off_route)]
    obs = np.stack([maze.with_mouse(cell).observation() for cell in cells])
    moves = np.array([best_move(dist, cell) for cell in cells], dtype=np.int64)
    return obs, moves


def build_dataset(config: TrainConfig, seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    obs, moves = [], []
    for _ in range(count):
        maze = generate_maze(rng, world=config.world, min_size=config.min_size,
                             cheese_region=config.region)
        o, m = expert_states(maze, config.off_route, rng)
        obs.append(o)
        moves.append(m)
    return torch.from_numpy(np.concatenate(obs)), torch.from_numpy(np.concatenate(moves))


@torch.no_grad()
def accuracy(policy: MazePolicy, obs: torch.Tensor, moves: torch.Tensor,
             batch_size: int = 1024) -> float:
    policy.eval()
    hits = 0
    for i in range(0, len(obs), batch_size):
        hits += int((policy(obs[i:i + batch_size]).argmax(-1) == moves[i:i + batch_size]).sum())
    return hits / max(len(obs), 1)


def train_policy(config: TrainConfig,
                 progress: Callable[[dict[str, Any]], None] | None = None
                 ) -> tuple[MazePolicy, dict[str, Any]]:
    """Train a policy from scratch; returns it (eval mode) and a JSON-able training record."""
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    train_obs, train_moves = build_dataset(config, config.seed, config.mazes)
    val_obs, val_moves = build_dataset(config, config.seed + 1_000_003, config.val_mazes)
    policy = MazePolicy(PolicyConfig(config.world, tuple(config.channels), config.hidden,
                                     tuple(config.strides)))
    opt = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * ((len(train_obs) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    gen = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(config.epochs):
        policy.train()
        order = torch.randperm(len(train_obs), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            loss = loss_fn(policy(train_obs[idx]), train_moves[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        row = {"epoch": epoch + 1, "loss": round(total / seen, 4),
               "val_accuracy": round(accuracy(policy, val_obs, val_moves), 4),
               "seconds": round(time.perf_counter() - start, 1)}
        history.append(row)
        if progress is not None:
            progress(row)
    policy.eval()
    record = {"train": {**asdict(config), "channels": list(config.channels),
                        "strides": list(config.strides)},
              "samples": int(len(train_obs)), "val_samples": int(len(val_obs)),
              "parameters": policy.n_parameters(), "history": history,
              "train_accuracy": round(accuracy(policy, train_obs, train_moves), 4),
              "val_accuracy": history[-1]["val_accuracy"] if history else None,
              "seconds": round(time.perf_counter() - start, 1)}
    return policy, record
