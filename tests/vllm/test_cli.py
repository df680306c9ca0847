"""The vLLM face of the ``avec`` command: ``generate --backend vllm`` and ``vllm-check``."""

from __future__ import annotations

import json
import subprocess
import sys


from avec.data.demo import DEMO_PAIRS
from avec.directions.extract import extract
from avec.generation.hf import steered_completions
from avec.models import load_model

PROMPTS = ["Tell me a story.", "What should I cook tonight?"]


def _avec(*args: str) -> subprocess.CompletedProcess:
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    import os

    return subprocess.run([sys.executable, "-m", "avec.cli.main", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **env})


def test_generate_with_the_vllm_backend(tmp_path):
    hf = load_model()
    vec = extract(hf, DEMO_PAIRS, [10])
    path = vec.save(tmp_path / "ocean.safetensors")
    done = _avec("generate", "--backend", "vllm", "--vector", str(path), "--coef", "0",
                 "--coef", "8", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--max-new-tokens", "16", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert [(r["prompt"], r["coef"]) for r in rows] == [(p, c) for p in PROMPTS
                                                          for c in (0.0, 8.0)]
    ref = steered_completions(hf, PROMPTS, vec, [0.0], max_new_tokens=16)
    plain = {r["prompt"]: r["text"] for r in rows if r["coef"] == 0}
    assert plain == {r.prompt: r.text for r in ref}  # unsteered: the same text as HF
    for p in PROMPTS:
        steered = next(r["text"] for r in rows if r["prompt"] == p and r["coef"] == 8)
        assert steered != plain[p]


def test_vllm_check_command():
    done = _avec("vllm-check", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["steered"] != report["reference"]
    assert report["plain"] == report["reference"]
