"""`avec tune` end to end on a tiny model, and the recommended setting carried into `avec
generate`, `avec info` and `avec export`."""

from __future__ import annotations

import json

from avec.cli.main import main
from avec.vector import load_vector


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tune_then_generate_info_export(capsys, tmp_path, model_dir, pairs_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about item {i}" for i in range(6)) + "\n")
    out_dir = tmp_path / "tuned"
    code, out, err = run(capsys, "tune", "--model", str(model_dir), "--pairs", str(pairs_file),
                         "--score", "keywords", "--keywords", "love", "--prompts", str(prompts),
                         "--layers", "1,2", "--bands", "1", "--max-new-tokens", "4",
                         "--max", "0.5", "-o", str(out_dir), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["budget"]["value"] <= 0.5 and report["layers"][0] in (1, 2)
    tuned = out_dir / f"{pairs_file.stem}.tuned.safetensors"
    assert {p.name for p in out_dir.iterdir()} >= {"tune.json", "tune_budget.png",
                                                    "tune_score.png", "report.html", tuned.name}
    rec = load_vector(tuned).recommended
    assert rec is not None and rec.coef == round(report["coef"], 6)

    code, out, err = run(capsys, "generate", "--model", str(model_dir), "--vector", str(tuned),
                         "--prompt", "hi", "--max-new-tokens", "3", "--json")
    assert code == 0 and [r["coef"] for r in json.loads(out)] == [rec.coef]
    assert "the vector's recommended setting" in err
    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--vector", str(tuned),
                       "--coef-scale", "0.5", "--prompt", "hi", "--max-new-tokens", "3",
                       "--json")
    assert [r["coef"] for r in json.loads(out)] == [rec.coef * 0.5]
    code, out, _ = run(capsys, "info", str(tuned))
    assert code == 0 and f"coef {rec.coef:g} at layer(s) {list(rec.layers)}" in out
    code, out, err = run(capsys, "export", str(tuned), "-o", str(tmp_path / "t.gguf"), "--json")
    assert code == 0 and json.loads(out)["coef_applied"] == rec.coef
    assert "multiplied into the directions" in err
    exported = load_vector(tmp_path / "t.gguf")
    plain = load_vector(tuned)
    L = rec.layers[0]
    assert exported.layers == list(rec.layers)
    assert float((exported[L] - plain[L] * rec.coef).abs().max()) < 1e-5


def test_a_vector_without_recommendation_needs_a_coefficient(capsys, tmp_path, model_dir,
                                                              pairs_file):
    vec = tmp_path / "v.safetensors"
    assert run(capsys, "extract", "--model", str(model_dir), "--pairs", str(pairs_file),
               "--layer", "1", "--output", str(vec))[0] == 0
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--vector", str(vec),
                       "--prompt", "hi")
    assert code == 2 and "has no recommended setting: give a coefficient" in err
    assert "avec tune" in err
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--vector", str(vec),
                       "--coef", "2", "--coef-scale", "0.5", "--prompt", "hi")
    assert code == 2 and "--coef-scale scales the recommended coefficient" in err
    code, _, err = run(capsys, "tune", "--model", str(model_dir), "--vector", str(vec),
                       "--score", "keywords", "-o", str(tmp_path / "o"))
    assert code == 2 and "--keywords" in err
