"""The maze world, the CNN policy, steering any nn.Module, and the cheese-vector study."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avec.cli.main import main
from avec.errors import SteeringError, VectorFileError
from avec.studies.maze.env import (MOVES, distances, decision_square, generate_maze, mazes,
                           open_corner_path, path, region_cells, render)
from avec.studies.maze.field import decision_probs, vector_field
from avec.studies.maze.policy import (MazePolicy, PolicyConfig, default_policy_path, load_policy,
                              save_policy)
from avec.studies.maze.steering import (cheese_channels, cheese_vector, policy_model,
                                retarget_interventions, held_out_mazes, top_right_vector)
from avec.studies.maze.train import TrainConfig, accuracy, build_dataset, train_policy
from avec.models.modules import ModuleModel, difference_vector, read_sites
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

SITE = "embedder.block2.res1.resadd"


# ---- environment --------------------------------------------------------------------------

@pytest.mark.parametrize("world,size", [(15, 15), (15, 9), (25, 25), (7, 3)])
def test_mazes_are_connected_trees_with_reachable_cheese(world: int, size: int) -> None:
    rng = np.random.default_rng(size)
    for _ in range(20):
        maze = generate_maze(rng, world=world, size=size)
        free = maze.free_cells()
        dist = distances(maze, maze.start)
        assert all(dist[c] >= 0 for c in free), "every free cell is reachable from the start"
        rooms = ((size + 1) // 2) ** 2
        assert len(free) == 2 * rooms - 1, "a spanning tree: rooms plus rooms-1 passages"
        assert maze.cheese is not None and dist[maze.cheese] > 0
        assert maze.is_free(maze.start) and maze.is_free(maze.corner)
        outside = np.ones((world, world), dtype=bool)
        o = maze.offset
        outside[o:o + size, o:o + size] = False
        assert maze.walls[outside].all(), "everything outside the maze is wall"


def test_training_cheese_stays_in_the_top_right_region() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        maze = generate_maze(rng, world=15, min_size=3, cheese_region=3)
        assert maze.cheese in region_cells(maze, 3)
        top, right = maze.corner
        assert top <= maze.cheese[0] < top + 3 and right - 3 < maze.cheese[1] <= right


def test_generation_is_seeded() -> None:
    a = [m.walls.tobytes() + bytes(m.cheese) for m in mazes(7, 5, world=15, min_size=3)]
    b = [m.walls.tobytes() + bytes(m.cheese) for m in mazes(7, 5, world=15, min_size=3)]
    c = [m.walls.tobytes() + bytes(m.cheese) for m in mazes(8, 5, world=15, min_size=3)]
    assert a == b and a != c


def test_paths_steps_and_observation() -> None:
    maze = generate_maze(np.random.default_rng(3), world=15)
    route = path(maze, maze.start, maze.cheese)
    assert route[0] == maze.start and route[-1] == maze.cheese
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(route, route[1:]))
    walker = maze
    for a, b in zip(route, route[1:]):
        walker = walker.step(MOVES.index((b[0] - a[0], b[1] - a[1])))
        assert walker.mouse == b
    blocked = [m for m in range(4) if not maze.is_free(
        (maze.start[0] + MOVES[m][0], maze.start[1] + MOVES[m][1]))]
    assert blocked and maze.step(blocked[0]).mouse == maze.start, "walls stop the mouse"
    obs = maze.observation()
    assert obs.shape == (3, 15, 15) and obs[1].sum() == 1 and obs[2][maze.start] == 1
    assert (obs[0] == maze.walls).all()
    assert maze.with_cheese(None).observation()[1].sum() == 0
    assert render(maze, 4).shape == (60, 60, 3)
    with pytest.raises(ValueError, match="wall"):
        maze.with_mouse((1, 1))


def test_decision_square_is_where_the_two_paths_part() -> None:
    found = 0
    for maze in mazes(11, 60, world=15, min_size=5):
        square = decision_square(maze)
        to_cheese = path(maze, maze.start, maze.cheese)
        to_corner = path(maze, maze.start, maze.corner)
        if square is None:
            assert set(to_cheese) <= set(to_corner) or set(to_corner) <= set(to_cheese)
            continue
        found += 1
        assert square.cell in to_cheese and square.cell in to_corner
        assert square.cheese_move != square.corner_move
        i = to_cheese.index(square.cell)
        assert to_cheese[:i + 1] == to_corner[:i + 1]
    assert found > 20


def test_opening_the_corner_path_only_removes_walls() -> None:
    maze = generate_maze(np.random.default_rng(5), world=15, size=11)
    opened = open_corner_path(maze)
    assert (opened.walls <= maze.walls).all() and opened.walls.sum() < maze.walls.sum()
    assert distances(opened, maze.corner)[0, 14] > 0, "the world's corner is now reachable"
    assert distances(maze, maze.corner)[0, 14] < 0
    with pytest.raises(ValueError, match="fills the"):
        open_corner_path(generate_maze(np.random.default_rng(5), world=15))


# ---- policy and training ----------------------------------------------------------------

def _tiny_policy(seed: int = 0, world: int = 15) -> MazePolicy:
    torch.manual_seed(seed)
    return MazePolicy(PolicyConfig(world=world, channels=(4, 8, 8), hidden=16)).eval()


def test_vector_field_probabilities_sum_to_one() -> None:
    policy = _tiny_policy()
    maze = generate_maze(np.random.default_rng(1), world=15)
    field = vector_field(policy, maze)
    assert len(field.cells) == len(maze.free_cells())
    assert np.allclose(field.probs.sum(1), 1.0, atol=1e-5) and (field.probs >= 0).all()
    square = decision_square(maze) or decision_square(held_out_mazes(0, 1, 15)[0])
    assert square is not None


def test_policy_file_round_trip(tmp_path) -> None:
    policy = _tiny_policy(1)
    x = torch.from_numpy(np.stack([m.observation() for m in mazes(0, 4, world=15)]))
    path_ = save_policy(policy, tmp_path / "p.safetensors", {"note": "x"}, half=False)
    loaded, record = load_policy(path_)
    assert record == {"note": "x"}
    assert torch.equal(policy(x), loaded(x))
    half, _ = load_policy(save_policy(policy, tmp_path / "h.safetensors"))
    assert torch.allclose(policy(x), half(x), atol=1e-2)
    with pytest.raises(FileNotFoundError, match="avec maze train"):
        load_policy(tmp_path / "missing.safetensors")


def test_a_tiny_training_run_learns_above_chance() -> None:
    config = TrainConfig(world=7, min_size=3, region=3, mazes=300, val_mazes=40, epochs=8,
                         batch_size=64, lr=3e-3, channels=(8, 16, 16), hidden=32, seed=0)
    policy, record = train_policy(config)
    assert record["val_accuracy"] > 0.6, record["history"]  # chance is 0.25
    assert record["history"][-1]["loss"] < record["history"][0]["loss"]
    obs, moves = build_dataset(config, 99, 20)
    assert accuracy(policy, obs, moves) > 0.6


# ---- steering any nn.Module ------------------------------------------------------------

def _obs(*ms) -> torch.Tensor:
    return torch.from_numpy(np.stack([m.observation() for m in ms]))


def test_hooks_on_a_cnn_module_steer_and_are_removed() -> None:
    policy = _tiny_policy(2)
    model = ModuleModel(policy, [SITE])
    maze = generate_maze(np.random.default_rng(2), world=15)
    x = _obs(maze, maze.with_cheese(None))
    base = policy(x)
    vec = difference_vector(model, _obs(maze), _obs(maze.with_cheese(None)), [0])
    assert vec.shape == (8, 8, 8) and vec.metadata["sites"] == {"0": SITE}
    with steer(model, vec, coef=5.0):
        steered = policy(x)
    assert not torch.allclose(base, steered)
    assert torch.equal(policy(x), base), "hooks are gone after the block"
    with steer(model, vec, coef=0.0):
        assert torch.equal(policy(x), base), "coefficient 0 is bit-identical"
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, vec, coef=5.0):
            raise RuntimeError("boom")
    assert torch.equal(policy(x), base) and not policy.embedder.block2.res1.resadd._forward_hooks
    # adding the vector is the same as adding it by hand at that module
    handle = policy.embedder.block2.res1.resadd.register_forward_hook(
        lambda _m, _a, out: out + 5.0 * vec[0])
    by_hand = policy(x)
    handle.remove()
    assert torch.allclose(steered, by_hand, atol=1e-6)
    # per-row coefficients: row 0 unsteered, row 1 steered
    with steer(model, vec, coef=[0.0, 5.0]):
        rows = policy(x)
    assert torch.allclose(rows[0], base[0], atol=1e-6) and torch.allclose(rows[1], steered[1])


def test_whole_activation_ablate_and_clamp() -> None:
    policy = _tiny_policy(3)
    model = ModuleModel(policy, [SITE])
    x = _obs(*mazes(1, 3, world=15))
    h = read_sites(model, x)[0]
    u = torch.randn(h.shape[1:])
    vec = SteeringVector({0: u})
    unit = (u / u.norm()).flatten()
    with steer(model, vec, op="ablate"):
        ablated = read_sites(model, x)[0]
    assert torch.allclose(ablated.flatten(1) @ unit, torch.zeros(3), atol=1e-4)
    with steer(model, vec, op="clamp", value=2.5):
        clamped = read_sites(model, x)[0]
    assert torch.allclose(clamped.flatten(1) @ unit, torch.full((3,), 2.5), atol=1e-4)
    rest = clamped - h
    assert torch.allclose(rest.flatten(1) - (rest.flatten(1) @ unit)[:, None] * unit,
                          torch.zeros_like(rest.flatten(1)), atol=1e-5), "only along u"
    onehot = torch.zeros(h.shape[1:])
    onehot[3, 1, 2] = 1.0
    with steer(model, SteeringVector({0: onehot}), op="clamp", value=-7.0):
        one = read_sites(model, x)[0]
    assert torch.allclose(one[:, 3, 1, 2], torch.full((3,), -7.0))
    one[:, 3, 1, 2] = h[:, 3, 1, 2]
    assert torch.allclose(one, h, atol=1e-6), "every other element is unchanged"


def test_module_steering_errors() -> None:
    policy = _tiny_policy(4)
    with pytest.raises(SteeringError, match="no sub-module named"):
        ModuleModel(policy, ["embedder.nope"])
    model = ModuleModel(policy, [SITE])
    x = _obs(*mazes(1, 1, world=15))
    with pytest.raises(SteeringError, match="does not match the activation"):
        with steer(model, SteeringVector({0: torch.ones(3, 8, 8)})):
            policy(x)
    with pytest.raises(SteeringError, match="positions='all'"):
        with steer(model, SteeringVector({0: torch.ones(8, 8, 8)}), positions="prompt"):
            pass
    other = ModuleModel(policy, ["embedder.block2.res2.resadd"])
    vec = difference_vector(model, x, x * 0, [0])
    with pytest.raises(VectorFileError, match="was read at"):
        with steer(other, vec):
            pass
    with pytest.raises(VectorFileError, match="has sites"):
        with steer(model, SteeringVector({3: torch.ones(8, 8, 8)})):
            pass


def test_retargeting_clamps_one_cell_of_each_channel() -> None:
    policy = _tiny_policy(5)
    found = cheese_channels(policy, "embedder.block1.res2.resadd", held_out_mazes(0, 20, 15), top=3)
    assert len(found) == 3 and all(0 <= c.hit_rate <= 1 for c in found)
    ivs = retarget_interventions(policy, "embedder.block1.res2.resadd", found, (2, 4), 3.0)
    assert all(isinstance(iv, Intervention) and iv.op == "clamp" for iv in ivs)
    model = policy_model(policy, "embedder.block1.res2.resadd")
    x = _obs(*held_out_mazes(1, 2, 15))
    with steer(model, ivs):
        h = read_sites(model, x)[0]
    assert h.shape[-1] == 15, "block1 keeps the world's resolution"
    for ch in found:
        value = ch.present + 2.0 * ch.response
        assert torch.allclose(h[:, ch.channel, 2, 4], torch.full((2,), value), atol=1e-5)


# ---- the shipped policy: behaviour ---------------------------------------------------------

@pytest.fixture(scope="module")
def shipped() -> MazePolicy:
    policy, record = load_policy(default_policy_path())
    assert record["train"]["region"] == 3 and record["val_accuracy"] > 0.9
    return policy


def test_shipped_policy_seeks_cheese_and_the_cheese_vector_removes_it(shipped) -> None:
    model = policy_model(shipped, SITE)
    held_out = held_out_mazes(4242, 60, shipped.config.world)
    base, minus = [], []
    for maze in held_out:
        base.append(decision_probs(shipped, maze).cheese)
        with steer(model, cheese_vector(model, maze), coef=-1.0):
            minus.append(decision_probs(shipped, maze).cheese)
    assert np.median(base) > 0.5
    assert np.median(minus) < np.median(base) - 0.3
    assert np.mean(np.array(minus) < np.array(base)) > 0.7


def test_shipped_policy_top_right_vector_pulls_to_the_corner(shipped) -> None:
    model = policy_model(shipped, SITE)
    held_out = held_out_mazes(4343, 60, shipped.config.world, max_size=shipped.config.world - 2)
    base, plus = [], []
    for maze in held_out:
        base.append(decision_probs(shipped, maze).corner)
        with steer(model, top_right_vector(model, maze), coef=1.0):
            plus.append(decision_probs(shipped, maze).corner)
    assert np.median(plus) > np.median(base)
    assert np.mean(np.array(plus) > np.array(base)) > 0.5


def test_cli_maze_cheese_vector_writes_json_and_pictures(tmp_path, capsys) -> None:
    out = tmp_path / "cv"
    assert main(["maze", "cheese-vector", "--mazes", "12", "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "P(cheese) cheese_vector" in summary
    result = json.loads((out / "cheese_vector.json").read_text())
    assert result["mazes"] == 12 and len(result["rows"]) == 12
    assert (out / "cheese_vector_box.png").stat().st_size > 1000
    assert (out / "cheese_vector_field_0.png").stat().st_size > 1000
