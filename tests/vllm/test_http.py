"""Plain vLLM's own OpenAI server with the plugin installed: steering through ``vllm_xargs``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from avec.models.loading import model_directory
from avec.vector import SteeringVector
from avec.vllm import VECTORS_ENV
from processes import stop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import httpx

    d = tmp_path_factory.mktemp("http-vectors")
    g = torch.Generator().manual_seed(3)
    v = torch.randn(576, generator=g)
    SteeringVector({12: v / v.norm() * 40.0}).save(d / "probe.safetensors")
    port = _free_port()
    env = {**os.environ, VECTORS_ENV: str(d), "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_directory(),
         "--served-model-name", "smollm2", "--dtype", "float32", "--enforce-eager",
         "--max-model-len", "512", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(1)
    else:
        stop(proc)
        raise RuntimeError("vLLM's server did not start in 300 s")
    yield url
    stop(proc)  # its engine processes included


def _chat(url: str, steering: list[dict] | str | None) -> tuple[int, dict]:
    import httpx

    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": 12, "temperature": 0}
    if steering is not None:
        body["vllm_xargs"] = {"avec_steering": steering if isinstance(steering, str)
                              else json.dumps(steering)}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    return r.status_code, r.json()


def test_steering_through_vllm_xargs(server):
    code, plain = _chat(server, None)
    assert code == 200
    code, steered = _chat(server, [{"vector": "probe", "coef": 1.0}])
    assert code == 200
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    assert text(steered) != text(plain)
    assert text(_chat(server, None)[1]) == text(plain)  # no leak into a later plain request


def test_a_bad_entry_is_a_400_naming_it(server):
    code, body = _chat(server, [{"vector": "probe", "coef": 1.0, "layers": [3]}])
    assert code == 400
    assert "avec_steering[0].layers" in json.dumps(body)
    code, body = _chat(server, "not json")
    assert code == 400 and "not valid JSON" in json.dumps(body)
    assert _chat(server, None)[0] == 200
