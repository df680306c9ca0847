"""MELBO (avec discover) on tiny random models: sphere, orthogonality, objective, seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avec.cli.main import main
from avec.discover.melbo import (MelboConfig, MelboTrainer, default_layers, target_mask,
                                 train_melbo)
from avec.discover.report import (Behaviour, answer_accuracy, arithmetic_prompts, cluster,
                                  parse_behaviour)
from avec.vector import load_vector

from conftest import make_tiny

PROMPTS = ["hello there, friend", "a=1+2, b=3+4. What is a*b?", "x", "Tell me a story."]
CONFIG = MelboConfig(source_layer=1, target_layer=3, radius=2.0, num_vectors=3, steps=30,
                     patience=30, seed=0)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny("llama")


@pytest.fixture(scope="module")
def trained(tiny):
    return train_melbo(tiny, PROMPTS, CONFIG)


def test_vectors_stay_on_the_sphere_and_are_orthogonal(trained) -> None:
    assert len(trained.vectors) == 3
    for item in trained.vectors:
        assert item.vector.layers == [1]
        assert abs(float(item.vector[1].norm()) - 2.0) < 1e-4
        assert item.vector.metadata["method"] == "melbo"
    cos = np.array(trained.cosines())
    assert np.allclose(cos, np.eye(3), atol=1e-4)


def test_trained_vectors_beat_random_vectors_of_the_same_norm(tiny, trained) -> None:
    best_random = max(trained.random_objectives)
    for item in trained.vectors:
        assert item.objective > best_random
        assert item.history[-1] >= item.history[0]
    trainer = MelboTrainer(tiny, PROMPTS, CONFIG)
    again = trainer.objective(trained.vectors[0].vector[1])
    assert again == pytest.approx(trained.vectors[0].objective, rel=1e-4)


def test_same_seed_same_vectors(tiny, trained) -> None:
    config = MelboConfig(**{**CONFIG.__dict__, "num_vectors": 2})
    again = train_melbo(tiny, PROMPTS, config)
    for a, b in zip(trained.vectors, again.vectors):
        assert torch.allclose(a.vector[1], b.vector[1], atol=1e-6)
    other = train_melbo(tiny, PROMPTS, MelboConfig(**{**config.__dict__, "seed": 1}))
    assert not torch.allclose(other.vectors[0].vector[1], again.vectors[0].vector[1])


def test_no_work_past_the_target_layer_and_weights_stay_trainable(tiny) -> None:
    calls = []
    handle = tiny.blocks[3].register_forward_hook(lambda *_: calls.append(1))
    flags = [p.requires_grad for p in tiny.hf.parameters()]
    try:
        train_melbo(tiny, PROMPTS[:2], MelboConfig(source_layer=0, target_layer=2, radius=1.0,
                                                   num_vectors=1, steps=3))
    finally:
        handle.remove()
    assert calls == [], "block 3 (after the target) never ran"
    assert [p.requires_grad for p in tiny.hf.parameters()] == flags


def test_target_positions_and_errors(tiny) -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert target_mask(mask, "all").tolist() == mask.float().tolist()
    assert target_mask(mask, "last:1").tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]
    assert target_mask(mask, "from:2").tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]
    with pytest.raises(ValueError, match="target positions"):
        target_mask(mask, "first:2")
    with pytest.raises(ValueError, match="must come after"):
        MelboTrainer(tiny, PROMPTS, MelboConfig(source_layer=2, target_layer=1))
    with pytest.raises(ValueError, match="radius"):
        MelboTrainer(tiny, PROMPTS, MelboConfig(radius=0))
    assert default_layers(tiny) == (1, 3)


def test_report_helpers() -> None:
    items = arithmetic_prompts(5, seed=3)
    assert items == arithmetic_prompts(5, seed=3)
    x, y, z, w = (int(c) for c in items[0]["prompt"][2:].replace(", b=", "+")
                  .split(".")[0].split("+"))
    assert int(items[0]["answer"]) == (x + y) * (z + w)
    assert answer_accuracy(["so a*b = 42.", "it is 420", "1.42"], ["42", "42", "42"]) == 1 / 3
    emb = np.array([[1, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.98, 0.1], [0, 0, 1.0]])
    labels = cluster(emb, threshold=0.2)
    assert labels[0] == labels[1] and labels[2] == labels[3]
    assert len({labels[0], labels[2], labels[4]}) == 3
    assert parse_behaviour("cot=step,first") == Behaviour("cot", ("step", "first"))
    assert parse_behaviour("refusal").score(["I cannot help with that.", "Sure!"]) == 0.5
    with pytest.raises(ValueError, match="NAME=word1"):
        parse_behaviour("nothing")


def test_cli_discover_writes_vectors_and_report(tmp_path, capsys) -> None:
    path = tmp_path / "tiny-llama"
    model = make_tiny("llama")
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)})
                                 for i in range(3)))
    out = tmp_path / "run"
    code = main(["discover", "--model", str(path), "--prompts", str(prompts), "--num-vectors",
                 "2", "--steps", "5", "--radius", "1.5", "--source-layer", "1",
                 "--target-layer", "2", "--max-new-tokens", "4", "--behaviour", "refusal",
                 "-o", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert [r["index"] for r in summary["vectors"]] == [0, 1]
    assert {"accuracy", "refusal", "cluster"} <= set(summary["vectors"][0])
    vec = load_vector(out / "vector_00.safetensors")
    assert vec.layers == [1] and abs(float(vec[1].norm()) - 1.5) < 1e-4
    record = json.loads((out / "melbo.json").read_text())
    assert len(record["cosines"]) == 2 and len(record["random_objectives"]) == 2
    page = (out / "report.html").read_text()
    assert "MELBO: 2 unsupervised steering vectors" in page and "cluster" in page
    full = json.loads((out / "summary.json").read_text())
    assert len(full["completions"]) == 3 and len(full["completions"][0]) == 3
    assert full["answers"] == ["0", "2", "4"] and len(record["prompts"]) == 3

    again = tmp_path / "again"
    code = main(["discover", "--model", str(path), "--from", str(out), "--max-new-tokens", "4",
                 "--cluster-threshold", "2.0", "-o", str(again), "--json"])
    assert code == 0
    redone = json.loads(capsys.readouterr().out)
    assert {r["cluster"] for r in redone["vectors"]} == {0}, "threshold 2 merges everything"
    assert "accuracy" in redone["vectors"][0], "answers come back from the earlier summary"
    assert load_vector(again / "vector_01.safetensors").metadata["index"] == 1
