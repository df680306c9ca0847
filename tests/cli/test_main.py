"""The avec command on a tiny model directory (no downloads)."""

from __future__ import annotations

import json

import torch

from avec.cli.main import build_parser, main
from avec.data import ContrastPair, save_jsonl_pairs
from avec.vector import SteeringVector


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_extract_info_generate(capsys, tmp_path, model_dir, pairs_file):
    vec_path = tmp_path / "v.safetensors"
    code, out, _ = run(capsys, "extract", "--model", str(model_dir), "--pairs", str(pairs_file),
                       "--layer", "1", "--layer", "2", "--output", str(vec_path), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["layers"] == [1, 2] and info["n_pairs"] == 2 and info["position"] == "last"
    vec = SteeringVector.load(vec_path)
    assert vec.metadata["model"]["name"] == "tiny-llama" and vec.width == 32

    code, out, _ = run(capsys, "info", str(vec_path), "--json")
    assert code == 0 and json.loads(out)["n_pairs"] == 2

    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--vector", str(vec_path),
                       "--coef", "0", "--coef", "30", "--layer", "1", "--prompt", "Tell me",
                       "--prompt", "hi", "--max-new-tokens", "8", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [(r["prompt"], r["coef"]) for r in rows] == [("Tell me", 0.0), ("Tell me", 30.0),
                                                        ("hi", 0.0), ("hi", 30.0)]
    assert set(rows[0]) == {"prompt", "coef", "text"}
    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--prompt", "Tell me",
                       "--prompt", "hi", "--max-new-tokens", "8", "--json")
    plain = json.loads(out)
    assert [r["text"] for r in plain] == [rows[0]["text"], rows[2]["text"]]  # coef 0 == unsteered
    assert "<eos>" not in out and "<|assistant|>" not in out

    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--vector", str(vec_path),
                       "--coef", "30", "--prompt", "Tell me", "--max-new-tokens", "6")
    assert code == 0 and "unsteered" in out and "coef +30" in out and ">>> Tell me" in out


def test_prompts_file_and_ab_extraction(capsys, tmp_path, model_dir):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\nsecond prompt\n")
    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--prompts-file",
                       str(prompts), "--max-new-tokens", "4", "--json")
    assert code == 0 and [r["prompt"] for r in json.loads(out)] == ["first prompt", "second prompt"]
    ab = tmp_path / "ab.json"
    ab.write_text(json.dumps([
        {"question": "Q1?\n(A) yes\n(B) no", "answer_matching_behavior": "(A)",
         "answer_not_matching_behavior": "(B)"},
        {"question": "Q2?\n(A) no\n(B) yes", "answer_matching_behavior": "(B)",
         "answer_not_matching_behavior": "(A)"}]))
    code, out, _ = run(capsys, "extract", "--model", str(model_dir), "--pairs", str(ab),
                       "--layer", "0", "--chat", "-o", str(tmp_path / "ab.safetensors"), "--json")
    assert code == 0 and json.loads(out)["position"] == "ab_letter"
    meta = SteeringVector.load(tmp_path / "ab.safetensors").metadata
    assert meta["chat_template"] is True and meta["positions"] == "ab_letter"


def test_cli_errors_are_clear(capsys, tmp_path, model_dir, pairs_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n')
    code, _, err = run(capsys, "extract", "--model", str(model_dir), "--pairs", str(bad),
                       "--layer", "0", "-o", str(tmp_path / "x.safetensors"))
    assert code == 2 and "bad.jsonl:2" in err and "missing key 'negative'" in err
    code, _, err = run(capsys, "extract", "--model", str(model_dir), "--pairs", str(pairs_file),
                       "--layer", "9", "-o", str(tmp_path / "x.safetensors"))
    assert code == 2 and "layers are 0..3" in err
    wide = SteeringVector({1: torch.ones(48)}, {"model": {"name": "other", "d_model": 48}})
    wide.save(tmp_path / "wide.safetensors")
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--vector",
                       str(tmp_path / "wide.safetensors"), "--prompt", "x")
    assert code == 2 and "does not match the model width 32" in err
    code, _, err = run(capsys, "generate", "--model", str(model_dir), "--coef", "3",
                       "--prompt", "x")
    assert code == 2 and "--coef needs --vector" in err
    code, _, err = run(capsys, "info", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "not found" in err


def test_help_lists_commands():
    text = build_parser().format_help()
    for cmd in ("extract", "generate", "info", "demo", "convert", "export", "serve"):
        assert cmd in text


def test_eval_and_sweep_commands(capsys, tmp_path, model_dir, pairs_file):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nhow are you\n")
    code, out, _ = run(capsys, "sweep", "kl", "--model", str(model_dir), "--pairs",
                       str(pairs_file), "--layers", "0-2:2", "--coef", "0", "--coef", "2",
                       "--prompts", str(prompts), "-o", str(tmp_path / "sw"), "--json")
    assert code == 0
    res = json.loads(out)
    assert res["layers"] == [0, 2] and res["coefs"] == [0.0, 2.0]
    assert all(row[0] == 0.0 and row[1] > 0 for row in res["values"])
    assert (tmp_path / "sw" / "sweep_kl.png").is_file() and (tmp_path / "sw" / "sweep_kl.csv").is_file()
    essay = tmp_path / "essay.txt"
    essay.write_text("A short essay about nothing in particular, written for a test.")
    code, out, _ = run(capsys, "eval", "ppl", "--model", str(model_dir), "--texts", str(essay))
    assert code == 0 and "ppl on tiny-llama (unsteered)" in out
    ab = tmp_path / "ab.json"
    ab.write_text(json.dumps([{"prompt": "Q?\n(A) x\n(B) y", "correct": "(A)",
                               "incorrect": "(B)"}]))
    code, out, _ = run(capsys, "eval", "mmlu", "--model", str(model_dir), "--data", str(ab),
                       "--json")
    assert code == 0 and 0 < json.loads(out)["values"][0][0] < 1
    code, _, err = run(capsys, "eval", "kl", "--model", str(model_dir), "--coef", "2",
                       "--prompts", str(prompts))
    assert code == 2 and "needs --vector or --pairs" in err


def test_compare_command(capsys, tmp_path, model_dir):
    pairs = tmp_path / "pairs.jsonl"
    save_jsonl_pairs([ContrastPair(f"I love item {i}", f"I hate item {i}") for i in range(6)],
                     pairs)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nhow are you\n")
    code, out, _ = run(capsys, "compare", "--model", str(model_dir), "--pairs", str(pairs),
                       "--prompts", str(prompts), "--keywords", "love,like", "--layer", "1",
                       "--n-pairs", "1,3", "--seeds", "2", "--coefs", "1,4",
                       "--methods", "mean_diff,random", "--max-new-tokens", "6",
                       "--kl-prompts", str(prompts), "-o", str(tmp_path / "cmp"), "--json")
    assert code == 0
    res = json.loads(out)
    assert {(s["method"], s["n_pairs"]) for s in res["summary"]} == {
        ("mean_diff", 1), ("mean_diff", 3), ("random", 1), ("random", 3)}
    for name in ("results.json", "report.html", "effect_vs_pairs.png", "effect_vs_kl.png"):
        assert (tmp_path / "cmp" / name).is_file()
    code, _, err = run(capsys, "compare", "--model", str(model_dir), "--pairs", str(pairs),
                       "--prompts", str(prompts), "--layer", "1", "-o", str(tmp_path / "x"))
    assert code == 2 and "--concept and/or --keywords" in err


def test_compare_concept_only_makes_a_synthetic_pool(capsys, tmp_path, model_dir, monkeypatch):
    """`avec compare --concept X` alone: the model writes the pool, which is saved and recorded,
    and the built-in everyday prompts are generated from at the default layer."""
    import avec.generation.synthetic as synthetic
    from avec.data.demo import CONCEPT_PROMPTS

    calls = []

    def fake_generate(model, concept, n, *, contrast, seed, progress):
        assert contrast is None
        calls.append((concept, n, seed))
        return [synthetic.GeneratedPair(ContrastPair(f"The sea {i} is deep.", f"A desk {i}."),
                                        synthetic.TEMPLATES[0], "The", "a desk")
                for i in range(5)]

    monkeypatch.setattr(synthetic, "generate_pairs", fake_generate)
    out_dir = tmp_path / "cmp"
    code, out, err = run(capsys, "compare", "--model", str(model_dir), "--concept", "the sea",
                         "--synthetic-pairs", "8", "--seed", "4", "--n-pairs", "1,3,32",
                         "--seeds", "1", "--coefs", "2", "--methods", "mean_diff,random",
                         "--max-new-tokens", "4", "-o", str(out_dir), "--json")
    assert code == 0, err
    assert calls == [("the sea", 8, 4)] and "only 5 of 8" in err
    saved = [json.loads(line) for line in (out_dir / "pairs.jsonl").read_text().splitlines()]
    assert len(saved) == 5 and saved[0]["concept"] == "the sea"
    assert saved[0]["generator"]["seed"] == 4 and saved[0]["generator"]["model"]
    res = json.loads(out)
    assert res["layer"] == 4 // 3  # a third of the tiny model's 4 blocks
    assert {s["n_pairs"] for s in res["summary"]} == {1, 3}  # 32 > pool of 5: skipped
    full = json.loads((out_dir / "results.json").read_text())
    assert full["task"]["n_prompts"] == len(CONCEPT_PROMPTS)
    assert full["task"]["pairs_source"].startswith("synthetic: ")
    assert full["model"]["n_layers"] == 4 and full["avec_version"]
    assert "synthetic: " in (out_dir / "report.html").read_text()


def test_compare_argument_errors(capsys, tmp_path, model_dir):
    code, _, err = run(capsys, "compare", "--model", str(model_dir), "-o", str(tmp_path))
    assert code == 2 and "--pairs FILE, or --concept TEXT" in err
    code, _, err = run(capsys, "compare", "--model", str(model_dir), "--concept", "x",
                       "--data", str(tmp_path / "ab.json"), "-o", str(tmp_path))
    assert code == 2 and "--data (A/B items) needs --pairs" in err
    ab = tmp_path / "ab.json"
    code, _, err = run(capsys, "compare", "--model", str(model_dir), "--pairs", str(ab),
                       "--data", str(ab), "--concept", "x", "-o", str(tmp_path))
    assert code == 2 and "with --data the effect is A/B p(match)" in err
    code, _, err = run(capsys, "compare", "--model", str(model_dir), "--pairs", str(ab),
                       "--concept", "x", "--contrast", "y", "-o", str(tmp_path))
    assert code == 2 and "--contrast only shapes synthetic pairs" in err


def test_serve_flag_defaults_are_the_servers_own_limits():
    """`avec serve`'s defaults come from Limits / ConnectionLimits (one source of truth), and
    building the parser imports neither the engine nor fastapi."""
    import subprocess
    import sys

    from avec.cli.main import build_parser
    from avec.serve.limits import ConnectionLimits, Limits

    args = build_parser().parse_args(["serve"])
    lim, conn = Limits(), ConnectionLimits()
    assert (args.max_tokens, args.max_queue, args.request_timeout, args.max_abs_coef,
            args.max_abs_value, args.max_vectors, args.max_batch) == (
        lim.max_tokens, lim.max_queue, lim.request_timeout_s, lim.max_abs_coef,
        lim.max_abs_value, lim.max_vectors, lim.max_batch)
    assert args.max_store_mb * 2**20 == lim.max_store_bytes
    assert (args.idle_timeout, args.body_timeout, args.max_connections) == (
        conn.idle_timeout_s, conn.body_timeout_s, conn.max_connections)
    code = ("import sys; from avec.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('avec.serve.engine', 'avec.serve.app', 'fastapi') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vllm_check_without_vllm_says_how_to_install(capsys):
    """This environment has no vLLM (it lives in .venv-vllm): the command says so, exit 1."""
    from avec.cli.main import main
    from avec.vllm import vllm_available

    assert not vllm_available()
    assert main(["vllm-check"]) == 1
    assert "pip install 'avec[vllm]'" in capsys.readouterr().err


def test_serve_default_steering_is_checked_before_anything_loads(capsys, tmp_path):
    """`--default-steering` takes JSON or a file holding it; a bad one is one line, exit 2,
    before the model loads (and --backend vllm without vLLM says how to install it)."""
    from avec.cli.main import main
    from avec.cli.serve import _default_steering

    assert _default_steering(None) == []
    (tmp_path / "d.json").write_text('[{"vector": "v", "coef": 2}]')
    (spec,) = _default_steering(str(tmp_path / "d.json"))
    assert (spec.vector, spec.coef, spec.op) == ("v", 2.0, "add")
    assert _default_steering('{"vector": "v", "coef": 1, "op": "ablate"}')[0].op == "ablate"
    for bad, needle in (('[{"vector": "v", "coef": "x"}]', "coef"), ("[{", "--default-steering"),
                        ('[{"vector": "v", "coef": 1, "op": "scale"}]', "op")):
        assert main(["serve", "--default-steering", bad]) == 2
        err = capsys.readouterr().err
        assert "--default-steering" in err and needle in err, err
    assert main(["serve", "--backend", "vllm"]) == 2
    assert "pip install 'avec[vllm]'" in capsys.readouterr().err
