"""The avec command given hostile input: one clear message naming the file, line or option,
exit code 2, never a traceback, and output paths checked before any work starts."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from avec.cli.main import describe_failure, main
from avec.data import ContrastPair, save_jsonl_pairs
from avec.errors import SteeringError
from avec.intervene.steer import parse_positions


CONTEXT = 256  # max_position_embeddings of the tiny test models


def run(capsys, *argv: str) -> tuple[int, str]:
    """``(exit code, stderr)`` of ``avec ARGV`` run in-process; argparse errors count too."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def extract(capsys, model_dir, pairs, tmp_path, *extra: str) -> tuple[int, str]:
    return run(capsys, "extract", "--model", str(model_dir), "--pairs", str(pairs), "--layer",
               "1", "-o", str(tmp_path / "v.safetensors"), *extra)


# ---- data files -----------------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ("[" * 50_000 + "]" * 50_000, "nested 50000 levels deep"),
    ('{"positive": "a\\ud800", "negative": "b"}', "lone surrogate"),
    ('{"positive": 1, "negative": "b"}', "'positive' must be a string, got int"),
    ('{"positive": ["a"], "negative": "b"}', "must be a string, got list"),
    ('{"positive": "a", "negative": "b", "prompt": {"x": 1}}', "'prompt' must be a string"),
    ('"just a string"', "expected an object"),
    ('{"positive": "a", "negative": "b"', "invalid JSON"),
])
def test_bad_pair_lines(capsys, tmp_path, model_dir, line, message):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"positive": "good", "negative": "bad"}\n' + line + "\n", encoding="utf-8")
    code, err = extract(capsys, model_dir, pairs, tmp_path)
    assert code == 2 and "pairs.jsonl:2" in err and message in err, err


def test_invalid_utf8_and_overlong_lines(capsys, tmp_path, model_dir):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"positive": "good", "negative": "bad"}\n{"positive": "\xff\xfe"}\n')
    code, err = extract(capsys, model_dir, pairs, tmp_path)
    assert code == 2 and "pairs.jsonl:2: not UTF-8" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" + "x" * (4 * 2**20 + 10) + "\n")
    code, err = run(capsys, "generate", "--model", str(model_dir), "--prompts-file",
                    str(prompts))
    assert code == 2 and "prompts.txt:2: the line is longer than 4,194,304 bytes" in err


def test_texts_longer_than_the_context(capsys, tmp_path, model_dir):
    long = "word " * 4000  # the byte tokenizer: 20,000 tokens
    pairs = tmp_path / "pairs.jsonl"
    save_jsonl_pairs([ContrastPair("short", "also short"), ContrastPair(long, "tiny")], pairs)
    code, err = extract(capsys, model_dir, pairs, tmp_path)
    assert code == 2 and "pairs.jsonl:2 (positive): the text is 20,000 tokens" in err
    assert f"reads at most {CONTEXT} positions" in err
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": long}) + "\n")
    code, err = run(capsys, "generate", "--model", str(model_dir), "--prompts-file",
                    str(prompts), "--no-chat")
    assert code == 2 and "prompts.jsonl:2: the text is 20,000 tokens" in err
    code, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", "x" * 200,
                    "--no-chat", "--max-new-tokens", "100")
    assert code == 2 and "--prompt 1: the text is 200 tokens" in err
    assert "100 are kept for new tokens (--max-new-tokens)" in err
    essay = tmp_path / "essay.txt"
    essay.write_text(long)
    code, err = run(capsys, "eval", "ppl", "--model", str(model_dir), "--texts", str(essay))
    assert code == 2 and "20,000 tokens" in err


def test_bad_prompt_and_ab_files(capsys, tmp_path, model_dir):
    cases = {
        "p.json": ('[{"prompt": 3}]', "p.json: item 0: 'prompt' must be a string"),
        "q.json": ("[" * 1000 + "]" * 1000, "nested 1000 levels"),
        "r.jsonl": ('{"text": "\\udfff"}\n', "r.jsonl:1: "),
        "s.txt": ("ok\n\n", None),
    }
    for name, (text, message) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        code, err = run(capsys, "generate", "--model", str(model_dir), "--prompts-file",
                        str(path), "--max-new-tokens", "2")
        assert (code == 0) if message is None else (code == 2 and message in err), err
    ab = tmp_path / "ab.json"
    ab.write_text(json.dumps([{"prompt": "Q?\n(A) x\n(B) y", "correct": "(A)",
                               "incorrect": ["(B)"]}]))
    code, err = run(capsys, "eval", "mmlu", "--model", str(model_dir), "--data", str(ab))
    assert code == 2 and "ab.json: item 0: missing or empty ['incorrect']" in err
    code, err = run(capsys, "eval", "mmlu", "--model", str(model_dir), "--data", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_non_utf8_arguments(capsys, model_dir):
    code, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", "hi \udcff")
    assert code == 2 and "argument --prompt is not valid UTF-8" in err


# ---- vector files ---------------------------------------------------------------------------

def vector_file(tmp_path, tensor, **fields):
    path = tmp_path / "v.safetensors"
    save_file({"layer.1": tensor}, str(path),
              metadata={"avec": json.dumps({"method": "x", **fields})})
    return path


@pytest.mark.parametrize("tensor, fields, message", [
    (torch.ones(32), {"layers": 14}, "metadata field 'layers' must be a list"),
    (torch.ones(32), {"clamp_value": [1]}, "metadata field 'clamp_value' must be a finite"),
    (torch.ones(4).to(torch.float8_e4m3fn), {}, "dtype F8_E4M3"),
    (torch.tensor(1.0), {}, "shape []"),
    (torch.zeros(0, 32), {}, "is empty"),
    (torch.ones(1, 1, 32), {}, "shape [1, 1, 32]"),
    (torch.full((32,), 1e300, dtype=torch.float64), {}, "NaN/inf values"),
])
def test_bad_vector_files(capsys, tmp_path, model_dir, tensor, fields, message):
    path = vector_file(tmp_path, tensor, **fields)
    code, err = run(capsys, "info", str(path))
    assert code == 2 and "v.safetensors" in err and message in err, err
    code, err = run(capsys, "generate", "--model", str(model_dir), "--vector", str(path),
                    "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and message in err


def test_gguf_memory_bomb_via_info(capsys, tmp_path):
    key = b"tokenizer.ggml.tokens".ljust(54, b"_")
    bomb = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<IIQ", 9, 0, 2**40))
    path = tmp_path / "bomb.gguf"
    path.write_bytes(bomb)
    code, err = run(capsys, "info", str(path))
    assert code == 2 and "bomb.gguf: not a readable GGUF file" in err
    code, err = run(capsys, "info", str(tmp_path))
    assert code == 2 and "not a regular file" in err


# ---- arguments and output paths -------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--coef", "nan"], "argument --coef: 'nan' is not a finite number"),
    (["--coef", "inf"], "argument --coef"),
    (["--coef", "1e300"], "argument --coef"),
    (["--clamp-value", "-inf"], "argument --clamp-value"),
    (["--positions", "true"], "argument --positions: invalid positions 'true'"),
    (["--positions", "from:"], "argument --positions"),
    (["--positions", "from:99999999999"], "argument --positions"),
    (["--positions", "-1"], "argument --positions"),
    (["--positions", "3000000000"], "a start index must be in 0..2147483647"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range"),
    (["--batch-size", "-3"], "argument --batch-size"),
    (["--layer", str(2**64)], "argument --layer"),
])
def test_bad_numbers_refused_while_parsing(capsys, args, message):
    code, err = run(capsys, "generate", "--model", "/nonexistent", "--prompt", "hi", *args)
    assert code == 2 and message in err, err


def test_seed_range(capsys, tmp_path):
    code, err = run(capsys, "pairs", "generate", "--concept", "x", "-o",
                    str(tmp_path / "p.jsonl"), "--seed", str(2**64), "--model", "/nonexistent")
    assert code == 2 and "argument --seed" in err


def test_output_paths_checked_before_work(capsys, tmp_path, pairs_file):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    model = ["--model", "/nonexistent/model"]  # never reached: the output check comes first
    for argv, message in [
        (["extract", "--pairs", str(pairs_file), "--layer", "1", "-o", str(tmp_path)],
         "is a directory"),
        (["extract", "--pairs", str(pairs_file), "--layer", "1", "-o",
          str(a_file / "v.safetensors")], "is not a directory"),
        (["sweep", "kl", "-o", str(a_file)], "exists and is not a directory"),
        (["compare", "--concept", "x", "-o", str(a_file / "sub")], "is not a directory"),
        (["top-examples", "--vector", "v.safetensors", "--texts", "t.txt", "--html",
          str(tmp_path)], "is a directory"),
        (["pairs", "generate", "--concept", "x", "-o", str(tmp_path)], "is a directory"),
        (["demo", "-o", str(tmp_path)], "is a directory"),
        (["convert", "in.safetensors", "-o", str(tmp_path)], "is a directory"),
        (["refusal", "select", "-o", str(a_file)], "not a directory"),
        (["sae", "train", "--layer", "1", "--texts", "t.txt", "-o", str(a_file)],
         "not a directory"),
        (["discover", "--arithmetic", "4", "-o", str(a_file)], "not a directory"),
        (["maze", "train", "-o", str(tmp_path)], "is a directory"),
    ]:
        code, err = run(capsys, *argv, *(model if argv[0] not in ("convert", "maze") else []))
        assert code == 2 and message in err, (argv, err)
        assert "/nonexistent/model" not in err


def test_unwritable_output(capsys, tmp_path, pairs_file):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    # root ignores permission bits, but not /proc, where no file can be made
    target = "/proc/avec-test/v.safetensors" if os.geteuid() == 0 else \
        str(locked / "v.safetensors")
    try:
        code, err = run(capsys, "extract", "--pairs", str(pairs_file), "--layer", "1", "-o",
                        target, "--model", "/nonexistent")
        assert code == 2 and ("not writable" in err or "cannot write in" in err), err
    finally:
        locked.chmod(0o700)


def test_missing_output_parents_are_created(capsys, tmp_path, model_dir, pairs_file):
    out = tmp_path / "new" / "deeper" / "v.safetensors"
    code, err = extract(capsys, model_dir, pairs_file, tmp_path, "-o", str(out))
    assert code == 0 and out.is_file(), err


# ---- the boundary ---------------------------------------------------------------------------

def test_parse_positions_refuses_bools_ranges_and_junk():
    for ok, want in (("all", "all"), (0, 0), ("from:7", 7), (2**31 - 1, 2**31 - 1)):
        assert parse_positions(ok) == want
    for bad in (True, False, -1, 2**31, 10**20, "from:", "from:-1", "from:1e3",
                "from:99999999999", "from:٣", " 3", 1.0, None, [1]):
        with pytest.raises(SteeringError):
            parse_positions(bad)


def test_layer_specs_and_scalar_values_are_bounded(tmp_path):
    from avec.evaluate.sweep import parse_layers
    from avec.intervene.steer import Intervention
    from avec.vector import SteeringVector

    assert parse_layers("4-10:3,14") == [4, 7, 10, 14]
    for bad in ("0-99999999999", "1-5:0", "1-5:-1", "x", "3,", "1-2-3"):
        with pytest.raises(ValueError, match="invalid layers"):
            parse_layers(bad)
    vec = SteeringVector({1: torch.ones(4)})
    for kwargs in ({"coef": float("nan")}, {"coef": float("inf")},
                   {"op": "clamp", "value": float("nan")}, {"op": "clamp", "value": {1: 1e400}}):
        with pytest.raises(SteeringError, match="finite"):
            Intervention(vec, **kwargs)


def test_describe_failure_codes():
    assert describe_failure(RecursionError())[0] == 2
    assert describe_failure(MemoryError())[0] == 2
    assert describe_failure(PermissionError(13, "Permission denied", "/x"))[1] == \
        "/x: Permission denied"
    assert describe_failure(IsADirectoryError(21, "Is a directory", "/d"))[0] == 2
    assert describe_failure(struct.error("unpack"))[0] == 2
    code, message = describe_failure(KeyError("boom"))
    assert code == 1 and "bug in avec" in message


def test_real_entry_point_prints_no_traceback(tmp_path):
    key = b"k"
    bomb = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + key
            + struct.pack("<IIQ", 9, 0, 2**40))
    path = tmp_path / "bomb.gguf"
    path.write_bytes(bomb)
    nested = tmp_path / "nested.safetensors"
    save_file({"layer.1": torch.ones(2)}, str(nested), metadata={"avec": "[" * 200_000})
    for target in (path, nested):
        proc = subprocess.run([sys.executable, "-m", "avec.cli.main", "info", str(target)],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "AVEC_DEBUG": ""})
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and target.name in proc.stderr
