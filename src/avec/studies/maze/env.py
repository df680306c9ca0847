"""A procgen-like maze world in numpy: Kruskal mazes, a mouse and a piece of cheese.

Coordinates are ``(row, col)`` with row 0 at the top. A maze of odd size ``s`` has rooms at the
cells whose maze coordinates are both even; randomized Kruskal opens walls between rooms until
every room is connected, so the free cells form a tree (exactly one path between any two
cells). The maze is centred in a fixed ``world x world`` grid, and everything outside it is
wall, as in procgen's maze. The mouse starts in the maze's bottom-left room; the "top-right
corner" is the maze's top-right room, where training cheese always sits nearby (the
top-right vector opens a path from it to the world's own corner).

The observation is symbolic, ``[3, world, world]`` float32 channels: wall, cheese, mouse.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np

MOVES: tuple[tuple[int, int], ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))
MOVE_NAMES: tuple[str, ...] = ("up", "down", "left", "right")
CHANNELS: tuple[str, ...] = ("wall", "cheese", "mouse")
Cell = tuple[int, int]


@dataclass(frozen=True)
class Maze:
    """One maze: ``walls[r, c]`` is True for wall cells; ``cheese`` may be None (removed)."""

    walls: np.ndarray
    mouse: Cell
    cheese: Cell | None
    offset: int  # row/col of the maze's top-left cell inside the world
    size: int  # odd side length of the maze

    @property
    def world(self) -> int:
        return int(self.walls.shape[0])

    @property
    def start(self) -> Cell:
        """The mouse's starting cell: the maze's bottom-left room."""
        return (self.offset + self.size - 1, self.offset)

    @property
    def corner(self) -> Cell:
        """The maze's top-right room."""
        return (self.offset, self.offset + self.size - 1)

    def is_free(self, cell: Cell) -> bool:
        r, c = cell
        return 0 <= r < self.world and 0 <= c < self.world and not self.walls[r, c]

    def free_cells(self) -> list[Cell]:
        return [(int(r), int(c)) for r, c in zip(*np.nonzero(~self.walls))]

    def with_mouse(self, cell: Cell) -> "Maze":
        if not self.is_free(cell):
            raise ValueError(f"cell {cell} is a wall; the mouse must stand on a free cell")
        return replace(self, mouse=cell)

    def with_cheese(self, cell: Cell | None) -> "Maze":
        if cell is not None and not self.is_free(cell):
            raise ValueError(f"cell {cell} is a wall; cheese must sit on a free cell")
        return replace(self, cheese=cell)

    def step(self, move: int) -> "Maze":
        """The maze after the mouse tries ``move`` (0 up, 1 down, 2 left, 3 right); walking into
        a wall leaves it where it is, as in procgen."""
        dr, dc = MOVES[move]
        target = (self.mouse[0] + dr, self.mouse[1] + dc)
        return self.with_mouse(target) if self.is_free(target) else self

    def observation(self) -> np.ndarray:
        """``[3, world, world]`` float32: wall, cheese and mouse channels."""
        obs = np.zeros((3, self.world, self.world), dtype=np.float32)
        obs[0] = self.walls
        if self.cheese is not None:
            obs[1][self.cheese] = 1.0
        obs[2][self.mouse] = 1.0
        return obs


def region_cells(maze: Maze, region: int) -> list[Cell]:
    """Free cells in the maze's top-right ``region x region`` square."""
    top, right = maze.corner
    return [(r, c) for r in range(top, top + region) for c in range(right - region + 1, right + 1)
            if maze.is_free((r, c))]


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def generate_maze(rng: np.random.Generator, *, world: int = 15, size: int | None = None,
                  min_size: int | None = None, cheese_region: int | None = None) -> Maze:
    """A random Kruskal maze centred in the world: of odd ``size`` if given, else of a random
    odd size in ``[min_size, world]`` (procgen's variety), else as large as the world.

    Cheese goes on a random free cell other than the start: inside the maze's top-right
    ``cheese_region`` square if given (the training distribution; a maze no larger than the
    region has it anywhere, as in procgen), else anywhere in the maze (the test distribution).
    """
    if size is None and min_size is not None:
        if min_size % 2 == 0 or not 3 <= min_size <= world:
            raise ValueError(f"min_size {min_size} must be odd and in [3, world={world}]")
        size = int(min_size + 2 * rng.integers((world - min_size) // 2 + 1))
    size = world if size is None else size
    if size % 2 == 0 or world % 2 == 0 or not 3 <= size <= world:
        raise ValueError(f"maze size {size} and world {world} must be odd with 3 <= size <= world")
    rooms = (size + 1) // 2
    walls = np.ones((world, world), dtype=bool)
    offset = (world - size) // 2
    for i in range(rooms):
        for j in range(rooms):
            walls[offset + 2 * i, offset + 2 * j] = False
    edges = [((i, j), (i + di, j + dj)) for i in range(rooms) for j in range(rooms)
             for di, dj in ((1, 0), (0, 1)) if i + di < rooms and j + dj < rooms]
    order = rng.permutation(len(edges))
    parent = list(range(rooms * rooms))
    for k in order:
        (i, j), (a, b) = edges[k]
        ra, rb = _find(parent, i * rooms + j), _find(parent, a * rooms + b)
        if ra != rb:
            parent[ra] = rb
            walls[offset + i + a, offset + j + b] = False  # the wall between the two rooms
    maze = Maze(walls=walls, mouse=(0, 0), cheese=None, offset=offset, size=size)
    maze = replace(maze, mouse=maze.start)
    choices = region_cells(maze, cheese_region) if cheese_region is not None \
        else maze.free_cells()
    choices = [cell for cell in choices if cell != maze.start]
    return maze.with_cheese(choices[int(rng.integers(len(choices)))])


def mazes(seed: int, count: int, **kwargs: object) -> Iterator[Maze]:
    """``count`` mazes from one seeded generator (same seed, same mazes)."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield generate_maze(rng, **kwargs)  # type: ignore[arg-type]


def distances(maze: Maze, target: Cell) -> np.ndarray:
    """Breadth-first distance (in moves) from every cell to ``target``; -1 where unreachable."""
    dist = np.full(maze.walls.shape, -1, dtype=np.int64)
    if not maze.is_free(target):
        raise ValueError(f"target {target} is a wall")
    dist[target] = 0
    queue = deque([target])
    while queue:
        r, c = queue.popleft()
        for dr, dc in MOVES:
            nxt = (r + dr, c + dc)
            if maze.is_free(nxt) and dist[nxt] < 0:
                dist[nxt] = dist[r, c] + 1
                queue.append(nxt)
    return dist


def best_move(dist: np.ndarray, cell: Cell) -> int:
    """The move that lowers the distance (the first one, in MOVES order, if several do)."""
    here = dist[cell]
    if here <= 0:
        raise ValueError(f"no move from {cell}: it is the target or cannot reach it")
    for move, (dr, dc) in enumerate(MOVES):
        r, c = cell[0] + dr, cell[1] + dc
        if 0 <= r < dist.shape[0] and 0 <= c < dist.shape[1] and dist[r, c] == here - 1:
            return move
    raise AssertionError("a reachable cell always has a neighbour one step closer")


def path(maze: Maze, source: Cell, target: Cell) -> list[Cell]:
    """The unique shortest path from ``source`` to ``target``, both included."""
    dist = distances(maze, target)
    if dist[source] < 0:
        raise ValueError(f"{target} cannot be reached from {source}")
    cells = [source]
    while cells[-1] != target:
        dr, dc = MOVES[best_move(dist, cells[-1])]
        cells.append((cells[-1][0] + dr, cells[-1][1] + dc))
    return cells


@dataclass(frozen=True)
class DecisionSquare:
    """Where the path from the start to the cheese and the path to the top-right corner part:
    the last cell they share, and the move each path takes from it."""

    cell: Cell
    cheese_move: int
    corner_move: int


def decision_square(maze: Maze) -> DecisionSquare | None:
    """The decision square, or None when one path contains the other (no choice to make)."""
    if maze.cheese is None:
        raise ValueError("the decision square needs a maze with cheese")
    to_cheese = path(maze, maze.start, maze.cheese)
    to_corner = path(maze, maze.start, maze.corner)
    shared = 0
    while (shared < min(len(to_cheese), len(to_corner))
           and to_cheese[shared] == to_corner[shared]):
        shared += 1
    if shared >= len(to_cheese) or shared >= len(to_corner):
        return None
    cell = to_cheese[shared - 1]

    def move_to(nxt: Cell) -> int:
        return MOVES.index((nxt[0] - cell[0], nxt[1] - cell[1]))

    return DecisionSquare(cell, move_to(to_cheese[shared]), move_to(to_corner[shared]))


def open_corner_path(maze: Maze) -> Maze:
    """The maze with a corridor carved from its top-right room up to the world's top edge and
    on to the world's top-right corner (the top-right vector's "path opened to the corner"
    input). Needs a maze smaller than the world: one that fills it has no room for the path."""
    if maze.size >= maze.world:
        raise ValueError(f"a {maze.size}x{maze.size} maze fills the {maze.world}x{maze.world} "
                         f"world, so no path to the world's corner can be opened; use a "
                         f"smaller maze")
    walls = maze.walls.copy()
    top, right = maze.corner
    walls[0:top + 1, right] = False
    walls[0, right:] = False
    return replace(maze, walls=walls)


def render(maze: Maze, cell_px: int = 12) -> np.ndarray:
    """An RGB image ``[world*px, world*px, 3]`` uint8: dark walls, yellow cheese, grey mouse."""
    colors = np.zeros((maze.world, maze.world, 3), dtype=np.uint8)
    colors[:] = (235, 230, 215)
    colors[maze.walls] = (60, 60, 70)
    if maze.cheese is not None:
        colors[maze.cheese] = (245, 200, 40)
    colors[maze.mouse] = (140, 110, 100)
    return np.kron(colors, np.ones((cell_px, cell_px, 1), dtype=np.uint8))
