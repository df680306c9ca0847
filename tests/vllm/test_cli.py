"""The vLLM face of the ``avec`` command: ``generate --backend vllm`` and ``vllm-check``."""

from __future__ import annotations

import json
import subprocess
import sys


from avec.data.demo import DEMO_PAIRS
from avec.directions.extract import extract
from avec.generation.hf import steered_completions
from avec.models import load_model
from processes import stop

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


def test_generate_with_a_condition_on_the_vllm_backend(tmp_path):
    """`avec generate --backend vllm --condition FILE`: the prompt above the threshold is
    steered on its generated tokens, the one below is the plain model."""
    import torch

    from avec.intervene.condition_fit import prompt_means
    from avec.intervene.conditions import condition_vector

    hf = load_model()
    path = extract(hf, DEMO_PAIRS, [10]).save(tmp_path / "ocean.safetensors")
    direction = torch.randn(hf.d_model, generator=torch.Generator().manual_seed(2))
    values = torch.nn.functional.cosine_similarity(
        prompt_means(hf, PROMPTS, [8])[8], direction.expand(2, -1), dim=-1)
    condition_vector(direction, 8, float(values.mean())).save(tmp_path / "c.safetensors")
    above = int(values.argmax())

    def texts(*extra):
        done = _avec("generate", "--backend", "vllm", "--vector", str(path), "--coef", "8",
                     "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "12",
                     "--json", *extra)
        assert done.returncode == 0, done.stderr[-2000:]
        return [r["text"] for r in json.loads(done.stdout)]

    steered = texts("--positions", "generated")
    plain = [r.text for r in steered_completions(hf, PROMPTS, None, [0.0], max_new_tokens=12)]
    got = texts("--condition", str(tmp_path / "c.safetensors"))
    assert got[above] == steered[above] != plain[above]
    assert got[1 - above] == plain[1 - above]


def test_vllm_check_command():
    done = _avec("vllm-check", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["steered"] != report["reference"]
    assert report["plain"] == report["reference"]


def test_vllm_check_fails_when_steering_does_not_fire():
    """Fault injection (``AVEC_VLLM_FAULT=no-steer``): the op runs at every layer, so the
    worker's start-up check passes, but it never steers; the self-check catches it."""
    import os

    done = subprocess.run([sys.executable, "-m", "avec.cli.main", "vllm-check", "--json"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
                               "AVEC_VLLM_FAULT": "no-steer"})
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert not report["ok"] and "came back unsteered" in report["message"]


def test_avec_serve_with_the_vllm_backend(tmp_path):
    """`avec serve --backend vllm`: vectors from --vectors, a --default-steering, the playground
    page, a steered and a plain reply through the HTTP API."""
    import os
    import socket
    import time

    import httpx

    hf = load_model()
    extract(hf, DEMO_PAIRS, [10]).save(tmp_path / "vectors" / "ocean.safetensors")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "avec.cli.main", "serve", "--backend", "vllm", "--eager",
         "--vectors", str(tmp_path / "vectors"), "--port", str(port), "--max-tokens", "16",
         "--default-steering", '[{"vector": "ocean", "coef": 8}]'],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    stopped = False
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.time() < deadline, "avec serve --backend vllm did not start in 300 s"
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        assert "<html" in httpx.get(url).text.lower()

        def reply(**extra) -> str:
            body = {"model": "default", "max_tokens": 16,
                    "messages": [{"role": "user", "content": PROMPTS[0]}], **extra}
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        ref = steered_completions(hf, PROMPTS[:1], None, [0.0], max_new_tokens=16)[0].text
        assert reply(default_steering=False) == ref  # plain: the HF model's text
        assert reply() != ref  # the default steering applies
        assert reply(default_steering=False, steering=[{"vector": "ocean", "coef": 8}]) \
            == reply()
        # SIGTERM stops vLLM's engine processes too (uvicorn re-raises the signal once it has
        # stopped, so the engine shuts down in the app's lifespan, not in a `finally`)
        assert stop(proc) == []
        stopped = True
    finally:
        if not stopped:
            stop(proc)
