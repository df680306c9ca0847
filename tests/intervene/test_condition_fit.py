"""Fitting a condition (``avec condition fit``): the rule with the best F1, the ROC curve, batched
prompt means equal to one-at-a-time ones, the fitted file used by a spec that names it, and the
command end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from avec.cli.main import main
from avec.generation.hf import format_prompt
from avec.intervene.condition_fit import best_rule, fit, prompt_means, roc
from avec.intervene.conditions import CONDITION_KEY, Leaf, parse
from avec.vector import load_vector

POSITIVE = [f"aaaa aaaa {i} aaaa" for i in range(6)]
NEGATIVE = [f"zq!! xv?? {i} zzzz zzzz" for i in range(6)]


def test_best_rule_separates_and_picks_the_comparator():
    values = torch.tensor([0.1, 0.2, 0.8, 0.9])
    rule = best_rule(values, torch.tensor([False, False, True, True]))
    assert (rule.op, rule.f1, rule.precision, rule.recall) == (">", 1.0, 1.0, 1.0)
    assert 0.2 < rule.threshold < 0.8 and rule.threshold == pytest.approx(0.5)
    flipped = best_rule(values, torch.tensor([True, True, False, False]))
    assert (flipped.op, flipped.f1) == ("<", 1.0) and flipped.threshold == pytest.approx(0.5)
    # one positive among the negatives' values: the best F1 is below 1 and the rule says so
    mixed = best_rule(torch.tensor([0.1, 0.5, 0.3, 0.9]),
                      torch.tensor([False, False, True, True]))
    assert mixed.f1 == pytest.approx(0.8)


def test_roc_area():
    labels = torch.tensor([False, False, True, True])
    points, auc = roc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels, ">")
    assert auc == pytest.approx(1.0) and points[0] == (0.0, 0.0) and points[-1] == (1.0, 1.0)
    _, auc_wrong_way = roc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels, "<")
    assert auc_wrong_way == pytest.approx(0.0)
    _, half = roc(torch.tensor([0.1, 0.8, 0.2, 0.9]), labels, ">")
    assert half == pytest.approx(0.75)


def test_batched_prompt_means_equal_one_at_a_time(tiny_llama):
    prompts = POSITIVE[:3] + NEGATIVE[:3] + ["x"]  # lengths differ: padding must not leak
    means = prompt_means(tiny_llama, prompts, [0, 2], batch_size=4)
    for L in (0, 2):
        for i, p in enumerate(prompts):
            ids = torch.tensor([format_prompt(tiny_llama, p)[0]])
            with torch.no_grad():
                h = tiny_llama.hf(input_ids=ids, output_hidden_states=True).hidden_states[L + 1]
            assert torch.allclose(means[L][i], h[0, 1:].float().mean(0), atol=1e-5)


def test_fit_finds_a_separating_rule_and_the_file_carries_it(tiny_llama, tmp_path):
    result = fit(tiny_llama, POSITIVE, NEGATIVE, [0, 1, 2], held_out=0.34, seed=1)
    assert [s.layer for s in result.scan] == [0, 1, 2]
    assert result.held_in.f1 == 1.0
    chosen = next(s for s in result.scan if s.layer == result.layer)
    assert chosen.cv_f1 == max(s.cv_f1 for s in result.scan)
    split = result.split
    assert len(split["positive_out"]) == 2 and len(split["negative_out"]) == 2
    assert not set(split["positive_in"]) & set(split["positive_out"])
    # the rule, applied to the held-in prompts' means, gives exactly the held-in scores
    means = prompt_means(tiny_llama, POSITIVE + NEGATIVE, [result.layer])[result.layer]
    met = result.leaf.met({result.layer: means})
    assert met[torch.tensor(split["positive_in"])].all()
    assert not met[torch.tensor([6 + i for i in split["negative_in"]])].any()

    path = result.vector(tiny_llama).save(tmp_path / "cond.safetensors")
    vec = load_vector(path)
    block = vec.metadata[CONDITION_KEY]
    assert block["layer"] == result.layer and block["op"] == result.held_in.op
    assert block["threshold"] == pytest.approx(result.held_in.threshold)
    assert block["fit"]["held_in_f1"] == 1.0
    leaf = parse({"vector": "cond"}, lambda name: vec)
    assert isinstance(leaf, Leaf) and leaf.layer == result.layer
    assert leaf.threshold == pytest.approx(result.held_in.threshold)


def test_fit_refuses_too_few_prompts_and_bad_metrics(tiny_llama):
    with pytest.raises(ValueError, match="at least 2 positive"):
        fit(tiny_llama, POSITIVE[:1], NEGATIVE, [1])
    with pytest.raises(ValueError, match="cosine or projection"):
        fit(tiny_llama, POSITIVE, NEGATIVE, [1], metric="dot")
    for bad in (0.0, 1.0, -5.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="held_out"):
            fit(tiny_llama, POSITIVE, NEGATIVE, [1], held_out=bad)


def test_condition_fit_command(capsys, tmp_path, model_dir):
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POSITIVE) + "\n")
    neg.write_text("\n".join(NEGATIVE) + "\n")
    out = tmp_path / "fit"
    code = main(["condition", "fit", "--model", str(model_dir), "--positive", str(pos),
                 "--negative", str(neg), "--layers", "0-2", "--name", "aaaa", "-o", str(out),
                 "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out)
    assert report["layer"] in (0, 1, 2) and report["held_in_f1"] == 1.0
    assert {p.name for p in out.iterdir()} >= {"aaaa.safetensors", "condition.json", "roc.png",
                                               "scan.png"}
    saved = json.loads((out / "condition.json").read_text())
    assert [s["layer"] for s in saved["scan"]] == [0, 1, 2]
    assert load_vector(out / "aaaa.safetensors").metadata[CONDITION_KEY]["layer"] \
        == report["layer"]
    code = main(["condition", "fit", "--model", str(model_dir), "--positive", str(pos),
                 "--negative", str(neg), "--layer", "9", "-o", str(out)])
    assert code != 0 and "layer" in capsys.readouterr().err


def test_generate_with_a_condition(capsys, tmp_path, model_dir, pairs_file):
    """`avec generate --condition FILE`: a prompt that meets the fitted condition is steered on
    its generated tokens (as --positions generated), one that does not is the plain model."""
    from avec.models import load_model

    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("\n".join(POSITIVE) + "\n")
    neg.write_text("\n".join(NEGATIVE) + "\n")
    assert main(["condition", "fit", "--model", str(model_dir), "--positive", str(pos),
                 "--negative", str(neg), "--layer", "1", "--held-out", "0.2", "--name", "c",
                 "-o", str(tmp_path)]) == 0
    vec = tmp_path / "v.safetensors"
    assert main(["extract", "--model", str(model_dir), "--pairs", str(pairs_file), "--layer",
                 "2", "--output", str(vec)]) == 0
    capsys.readouterr()
    cond = load_vector(tmp_path / "c.safetensors")
    model = load_model(str(model_dir))
    leaf = parse({"vector": "c"}, lambda name: cond)
    prompts = [POSITIVE[0], NEGATIVE[0]]
    met = leaf.met(prompt_means(model, prompts, [1])).tolist()
    assert met == [True, False]

    def texts(*extra):
        argv = ["generate", "--model", str(model_dir), "--vector", str(vec), "--max-new-tokens",
                "6", "--json", *extra]
        for p in prompts:
            argv += ["--prompt", p]
        code = main(argv)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        return [r["text"] for r in json.loads(captured.out)]

    conditional = texts("--coef", "30", "--condition", str(tmp_path / "c.safetensors"))
    steered = texts("--coef", "30", "--positions", "generated")
    plain = texts("--coef", "0")
    assert steered != plain
    assert conditional == [s if m else p for s, p, m in zip(steered, plain, met)]
    negated = texts("--coef", "30", "--when",
                    json.dumps({"not": {"vector": str(tmp_path / "c.safetensors")}}))
    assert negated == [p if m else s for s, p, m in zip(steered, plain, met)]
    for bad, needle in [(["--condition", str(tmp_path / "c.safetensors"), "--positions", "all"],
                         "--positions"),
                        (["--per-token"], "--per-token"),
                        (["--when", '{"vector": 3}'], "--when.vector"),
                        (["--when", '{'], "--when: invalid JSON")]:
        code = main(["generate", "--model", str(model_dir), "--vector", str(vec), "--coef", "1",
                     "--prompt", "hi", *bad])
        assert code != 0 and needle in capsys.readouterr().err, bad


def test_cross_validation_chooses_the_layer_that_generalises():
    """Cross-validated F1 (what picks the layer) is 1 where the classes really differ and low
    where they are noise, though a rule fitted on all of the noise can still separate it."""
    from avec.intervene.condition_fit import cross_validated_f1

    g = torch.Generator().manual_seed(0)
    n = 12
    clean = torch.randn(2 * n, 16, generator=g)
    clean[:n, 0] += 6.0  # positives shifted along one axis
    noise = torch.randn(2 * n, 16, generator=g)
    pos, neg = list(range(n)), list(range(n, 2 * n))
    assert cross_validated_f1(clean, pos, neg, "projection") == 1.0
    assert cross_validated_f1(noise, pos, neg, "projection") < 0.8
    from avec.intervene.condition_fit import _rule_at

    assert _rule_at(noise, pos, neg, "projection")[2].f1 > 0.8  # the held-in fit overfits
