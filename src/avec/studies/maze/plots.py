"""Vector-field pictures as in the paper: the maze, and at each free cell an arrow that is the
policy's expected move (probability-weighted sum of up/down/left/right)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from avec.report import pyplot, save_figure
from avec.studies.maze.env import Cell, render
from avec.studies.maze.field import VectorField


def _arrows(field: VectorField) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rows = np.array([c[0] for c in field.cells], dtype=float)
    cols = np.array([c[1] for c in field.cells], dtype=float)
    p = field.probs
    return cols, rows, p[:, 3] - p[:, 2], p[:, 1] - p[:, 0]  # x, y, dx (right), dy (down)


def plot_fields(panels: Sequence[tuple[str, VectorField]], out: str | Path,
                marks: dict[str, Cell] | None = None, diff: bool = True) -> Path:
    """One panel per (title, field), plus the difference of the last two if ``diff``.
    ``marks`` labels cells (e.g. ``{"decision square": (r, c)}``)."""
    plt = pyplot()
    n = len(panels) + (1 if diff and len(panels) >= 2 else 0)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.4), squeeze=False)
    items: list[tuple[str, VectorField, np.ndarray | None]] = [(t, f, None) for t, f in panels]
    if diff and len(panels) >= 2:
        (_, a), (tb, b) = panels[-2], panels[-1]
        items.append((f"difference ({tb} - before)", b, b.probs - a.probs))
    for ax, (title, field, delta) in zip(axes[0], items):
        world = field.maze.world
        ax.imshow(render(field.maze, 1), extent=(-0.5, world - 0.5, world - 0.5, -0.5))
        x, y, dx, dy = _arrows(field)
        if delta is not None:
            dx, dy = delta[:, 3] - delta[:, 2], delta[:, 1] - delta[:, 0]
        ax.quiver(x, y, dx, dy, angles="xy", scale_units="xy", scale=1.25, width=0.006,
                  color="tab:red" if delta is not None else "tab:blue")
        for label, (r, c) in (marks or {}).items():
            ax.scatter([c], [r], s=140, facecolors="none", edgecolors="tab:green", linewidths=2)
            ax.annotate(label, (c, r), xytext=(3, -6), textcoords="offset points",
                        color="tab:green", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, out, dpi=110)


def plot_distribution(values: dict[str, Sequence[float]], title: str, out: str | Path) -> Path:
    """Box plots of a per-maze quantity under several conditions."""
    fig, ax = pyplot().subplots(figsize=(1.6 * len(values) + 2, 3.6))
    ax.boxplot(list(values.values()), showmeans=False)
    ax.set_xticks(range(1, len(values) + 1), list(values), rotation=20, fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, out, dpi=110)
