"""`avec compose` on tiny random models: its numbers recomputed independently from the
completions (language model) and the policy's probabilities (maze), and its refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avec.cli.main import main
from avec.evaluate.concepts import keyword_rate
from avec.generation.hf import format_prompt, generate_ids
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

PROMPTS = ["Tell me a story", "What is new", "Say hello to me"]
LETTERS = "a,e,i,o,t"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def random_vector(width: int, layers: list[int], seed: int, scale: float = 8.0
                  ) -> SteeringVector:
    gen = torch.Generator().manual_seed(seed)
    dirs = {}
    for L in layers:
        d = torch.randn(width, generator=gen)
        dirs[L] = d * (scale / d.norm())
    return SteeringVector(dirs, {"method": "random"})


@pytest.fixture()
def tiny(monkeypatch, tiny_llama):
    from avec.cli import common

    monkeypatch.setattr(common, "load_model_for", lambda _args: tiny_llama)
    return tiny_llama


@pytest.fixture()
def files(tmp_path, tiny_llama):
    a = random_vector(tiny_llama.d_model, [1, 2], seed=1)
    b = random_vector(tiny_llama.d_model, [2], seed=2)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return tmp_path, a, b, prompts


def texts_with(model, interventions, max_new_tokens):
    """Greedy completions, one prompt at a time (no batching), steered by ``interventions``."""
    out = []
    for prompt in PROMPTS:
        ids = [format_prompt(model, prompt)[0]]
        with steer(model, interventions):
            toks = generate_ids(model, ids, max_new_tokens)[0]
        out.append(model.tokenizer.decode(toks, skip_special_tokens=True).strip())
    return out


def test_compose_numbers_match_an_independent_recomputation(capsys, tiny, files):
    tmp, a, b, prompts = files
    out_dir = tmp / "out"
    code, out, err = run(capsys, "compose", "--vector", str(tmp / "a.safetensors"),
                         "--vector", str(tmp / "b.safetensors"),
                         "--score", f"first=keywords:{LETTERS}", "--score", "second=keywords:s,n",
                         "--coefs", "0,3,6", "--coefs=-4,4", "--prompts", str(prompts),
                         "--max-new-tokens", "6", "-o", str(out_dir), "--json")
    assert code == 0, err
    summary = json.loads(out)
    doc = json.loads((out_dir / "compose.json").read_text())
    assert (out_dir / "compose.png").read_bytes()[:4] == b"\x89PNG"
    grid = doc["grid"]
    assert grid["coefs"] == [[0.0, 3.0, 6.0], [-4.0, 0.0, 4.0]]
    assert summary["at"] == [6.0, 4.0]  # each axis's largest magnitude, positive on a tie
    assert doc["vectors"][0]["layers"] == [1, 2] and doc["vectors"][1]["layers"] == [2]

    # every cell's per-prompt scores, recomputed from unbatched generations
    words = {"first": LETTERS.split(","), "second": ["s", "n"]}
    for i, c1 in enumerate(grid["coefs"][0]):
        for j, c2 in enumerate(grid["coefs"][1]):
            ivs = [Intervention(v, coef=c) for v, c in ((a, c1), (b, c2)) if c != 0]
            texts = texts_with(tiny, ivs, 6)
            for s, kw in words.items():
                expected = [keyword_rate([t], kw) for t in texts]
                assert grid["scores"][s]["per_item"][i][j] == expected, (s, c1, c2)

    # the summary's arithmetic from the per-item values
    for s in ("first", "second"):
        m = np.asarray(grid["scores"][s]["per_item"]).mean(-1)  # [3, 3]
        base = m[0, 1]
        alone_a, alone_b = m[2, 1] - base, m[0, 2] - base
        add = summary["additivity"][s]
        assert add["joint"] == pytest.approx(m[2, 2] - base)
        assert add["single"] == {"a": pytest.approx(alone_a), "b": pytest.approx(alone_b)}
        assert add["interaction"] == pytest.approx(m[2, 2] - base - alone_a - alone_b)
        assert add["additivity_error"] == pytest.approx(abs(add["interaction"]))
        assert summary["cross_talk"][s] == {"a": pytest.approx(alone_a),
                                            "b": pytest.approx(alone_b)}
        inter = np.asarray(grid["scores"][s]["interaction"])
        assert inter[0, 1] == 0 and inter[1, 1] == 0 and inter[0, 0] == 0  # one vector on
        assert summary["unsteered"][s] == pytest.approx(base)
    cos = summary["cosines"]
    assert [(r["layer_a"], r["layer_b"], r["shared"]) for r in cos] == [(2, 2, True)]
    assert cos[0]["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(
        a[2].double(), b[2].double(), dim=0)), abs=1e-9)
    assert len(doc["samples"]) == 9 and doc["rows"] == 27


def test_a_tuned_vector_gives_the_default_grid_and_layers(capsys, tiny, files):
    from avec.vector import Recommendation

    tmp, a, b, prompts = files
    a.with_recommendation(Recommendation((1,), 2.0)).save(tmp / "ta.safetensors")
    b.with_recommendation(Recommendation((2,), 4.0)).save(tmp / "tb.safetensors")
    code, out, err = run(capsys, "compose", "--vector", str(tmp / "ta.safetensors"),
                         "--vector", str(tmp / "tb.safetensors"), "--score", "refusal",
                         "--score", "refusal", "--extra-score", "k=keywords:a",
                         "--prompts", str(prompts), "--max-new-tokens", "2", "--pad",
                         "--batch-size", "25", "-o", str(tmp / "o2"), "--json")
    assert code == 0, err
    doc = json.loads((tmp / "o2" / "compose.json").read_text())
    assert doc["pad"] is True and doc["rows"] == 25 * len(PROMPTS)
    assert doc["grid"]["coefs"] == [[0.0, 1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 4.0, 6.0, 8.0]]
    assert [v["layers"] for v in doc["vectors"]] == [[1], [2]]
    assert set(json.loads(out)["additivity"]) == {"refusal", "k"}
    # layers 1 and 2 are not shared: the cosine is taken across them, and says so
    assert [(r["layer_a"], r["layer_b"], r["shared"]) for r in doc["summary"]["cosines"]] \
        == [(1, 2, False)]


def test_three_vectors_write_one_picture_per_pair(capsys, tiny, files):
    tmp, _a, _b, prompts = files
    random_vector(tiny.d_model, [3], seed=3).save(tmp / "c.safetensors")
    code, out, err = run(capsys, "compose", *[x for v in "abc" for x in
                                              ("--vector", str(tmp / f"{v}.safetensors"))],
                         "--score", "refusal", "--score", "refusal", "--score", "refusal",
                         "--coefs", "0,5", "--prompts", str(prompts), "--max-new-tokens", "2",
                         "-o", str(tmp / "o3"))
    assert code == 0, err
    names = {p.name for p in (tmp / "o3").iterdir()}
    assert names == {"compose.json", "compose_0_1.png", "compose_0_2.png", "compose_1_2.png"}
    assert "cosine a . c at layers 1 / 3 (not shared)" in out


@pytest.mark.parametrize("extra, message", [
    ([], "--score given 1 times for 2 vectors"),
    (["--score", "refusal", "--coefs", "0,1", "--coefs", "0,1", "--coefs", "0,1"],
     "--coefs given 3 times for 2 vectors"),
    (["--score", "refusal", "--coefs", "0,1,1"], "repeats"),
    (["--score", "refusal", "--coefs", "0,x"], "'x' is not a number"),
    (["--score", "refusal", "--coefs", "0,inf"], "not a finite"),
    (["--score", "nonsense:1"], "--score: score 'nonsense:1'"),
    (["--score", "keywords:"], "keywords needs an argument"),
    (["--score", "x=keywords:a", "--extra-score", "x=keywords:b"], "already used"),
    (["--score", "refusal", "--coefs", "0,1", "--at", "1"], "--at '1': give 2 coefficients"),
    (["--score", "refusal", "--coefs", "0,1", "--at", "1,2"], "must be a nonzero"),
    (["--score", "refusal", "--coefs", "0,1,2,3", "--max-cells", "10"],
     "more than --max-cells 10"),
    (["--score", "refusal", "--mazes", "3", "--coefs", "0,1"], "--mazes cannot be used without"),
    (["--score", "refusal", "--layers", "1,2", "--coefs", "0,1"], "has no layer(s) [1]"),
    (["--score", "refusal"], "has no recommended setting"),
    (["--score", "refusal", "--coefs", "0,1", "--layers", "9"], "out of range"),
])
def test_bad_input_is_refused_naming_the_option(capsys, tiny, files, extra, message):
    tmp, _a, _b, prompts = files
    code, _, err = run(capsys, "compose", "--vector", str(tmp / "a.safetensors"),
                       "--vector", str(tmp / "b.safetensors"), "--score", "refusal",
                       "--prompts", str(prompts), "-o", str(tmp / "bad"), *extra)
    assert code == 2, err
    assert message in err and "Traceback" not in err


def test_one_vector_and_mixed_modes_are_refused(capsys, tiny, files):
    tmp, *_ = files
    code, _, err = run(capsys, "compose", "--vector", str(tmp / "a.safetensors"),
                       "--score", "refusal", "-o", str(tmp / "x"))
    assert code == 2 and "two or more --vector" in err
    code, _, err = run(capsys, "compose", "--maze", "--vector", str(tmp / "a.safetensors"),
                       "--model", "m", "-o", str(tmp / "x"))
    assert code == 2 and "--vector, --model cannot be used with --maze" in err
    code, _, err = run(capsys, "compose", "--maze", "--coefs", "0,1", "--coefs", "0,1",
                       "--coefs", "0,1", "-o", str(tmp / "x"))
    assert code == 2 and "--coefs given 3 times for 2 vectors" in err
    code, _, err = run(capsys, "compose", "--maze", "--site", "nowhere", "--mazes", "1",
                       "-o", str(tmp / "x"))
    assert code == 2 and "--site 'nowhere' is not a module of the policy" in err


def test_maze_mode_matches_the_policy_steered_directly(capsys, tmp_path):
    from avec.studies.maze.env import decision_square
    from avec.studies.maze.field import decision_probs
    from avec.studies.maze.policy import MazePolicy, PolicyConfig, save_policy
    from avec.studies.maze.steering import (CHEESE_SITE, cheese_vector, held_out_mazes,
                                            policy_model, top_right_vector)

    torch.manual_seed(0)
    policy = MazePolicy(PolicyConfig(channels=(4, 8, 8), hidden=16)).eval()
    path = save_policy(policy, tmp_path / "tiny.safetensors", half=False)
    code, out, err = run(capsys, "compose", "--maze", "--policy", str(path), "--mazes", "3",
                         "--coefs=-2,0,1", "-o", str(tmp_path / "m"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    doc = json.loads((tmp_path / "m" / "compose.json").read_text())
    assert summary["at"] == [-2.0, 1.0]  # cheese subtracted, top-right added
    assert doc["grid"]["coefs"] == [[-2.0, 0.0, 1.0], [-2.0, 0.0, 1.0]]
    model = policy_model(policy, CHEESE_SITE)
    mazes = held_out_mazes(20230303, 3, 15, max_size=13)
    cosines = []
    for k, maze in enumerate(mazes):
        square = decision_square(maze)
        vc, vt = cheese_vector(model, maze), top_right_vector(model, maze)
        cosines.append(float(torch.nn.functional.cosine_similarity(
            vc[0].flatten(), vt[0].flatten(), dim=0)))
        for i, a in enumerate((-2.0, 0.0, 1.0)):
            for j, b in enumerate((-2.0, 0.0, 1.0)):
                with steer(model, vc * a + vt * b, coef=1.0):
                    probs = decision_probs(policy, maze, square)
                cell = doc["grid"]["scores"]
                assert cell["P(cheese)"]["per_item"][i][j][k] == pytest.approx(probs.cheese,
                                                                                abs=1e-5)
                assert cell["P(top-right)"]["per_item"][i][j][k] == pytest.approx(probs.corner,
                                                                                   abs=1e-5)
                log_odds = cell["log-odds cheese:top-right"]["per_item"][i][j][k]
                assert log_odds == pytest.approx(np.log(probs.cheese / probs.corner), abs=1e-3)
    per_maze = summary["cosines"][0]["per_maze"]
    assert per_maze["median"] == pytest.approx(float(np.median(cosines)), abs=1e-6)
    assert (tmp_path / "m" / "compose.png").is_file()
