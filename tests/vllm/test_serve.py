"""``avec serve --backend vllm``: avec's HTTP API over vLLM's async engine with the plugin, on the
packaged default model (float32, greedy, eager)."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from avec.data.demo import DEMO_PAIRS  # noqa: E402
from avec.directions.extract import extract  # noqa: E402
from avec.generation.hf import generate_ids  # noqa: E402
from avec.models import load_model  # noqa: E402
from avec.models.loading import model_directory  # noqa: E402
from avec.serve import Limits, VectorRegistry, create_app  # noqa: E402
from avec.serve.schemas import SteeringSpec  # noqa: E402
from avec.vector import SteeringVector  # noqa: E402

MODEL = "smollm2"
PROMPT = "Tell me a story."


@pytest.fixture(scope="module")
def hf():
    return load_model()


@pytest.fixture(scope="module")
def served(hf):
    from fastapi.testclient import TestClient

    from avec.vllm.engine import VLLMEngine, VLLMModel

    directory = model_directory()
    model = VLLMModel(directory, name=MODEL)
    registry = VectorRegistry(model)
    ocean = extract(hf, DEMO_PAIRS, layers=[10, 12])
    registry.put("ocean", ocean)
    g = torch.Generator().manual_seed(5)
    r = torch.randn(hf.d_model, generator=g)
    registry.put("rand", SteeringVector({14: r / r.norm() * 30.0}))
    registry.put("block", SteeringVector({14: torch.randn(3, hf.d_model, generator=g)}))
    limits = Limits(max_tokens=32, default_max_tokens=12, max_queue=4, request_timeout_s=120.0)
    engine = VLLMEngine(directory, registry, limits, model=model, enforce_eager=True,
                        max_model_len=512, max_num_seqs=8)
    app = create_app(engine, model_id=MODEL)
    with TestClient(app) as client:
        yield engine, client
    engine.shutdown()


def chat(client, steering=None, content: str = PROMPT, status: int = 200, **extra) -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 12, **extra}
    if steering is not None:
        body["steering"] = steering
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    return r.json()


def text(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def test_plain_replies_equal_the_hf_model_and_steering_changes_them(served, hf):
    _, client = served
    ids = hf.tokenizer(hf.chat_prompt(PROMPT), add_special_tokens=False)["input_ids"]
    ref = hf.tokenizer.decode(generate_ids(hf, [ids], 12)[0], skip_special_tokens=True)
    plain = chat(client)
    assert text(plain) == ref
    assert plain["usage"]["completion_tokens"] == 12
    steered = chat(client, [{"vector": "ocean", "coef": 8.0}])
    assert text(steered) != ref
    assert text(chat(client)) == ref  # nothing leaks into a later plain request


def test_concurrent_requests_each_get_their_own_steering(served):
    _, client = served
    settings = [None, [{"vector": "ocean", "coef": 8.0}], [{"vector": "rand", "coef": 1.0}],
                [{"vector": "ocean", "coef": 1.0, "op": "ablate"},
                 {"vector": "rand", "coef": 1.0, "positions": "generated"}]]
    alone = [text(chat(client, s)) for s in settings]
    assert len(set(alone)) == len(settings)
    jobs = [settings[i % len(settings)] for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda s: text(chat(client, s)), jobs))
    assert together == [alone[i % len(settings)] for i in range(12)]


def test_streaming_sends_the_same_text(served):
    _, client = served
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 12, "stream": True, "steering": [{"vector": "ocean", "coef": 8.0}],
            "stream_options": {"include_usage": True}}
    parts, usage = [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                parts.append(choice["delta"].get("content", ""))
    assert "".join(parts) == text(chat(client, [{"vector": "ocean", "coef": 8.0}]))
    assert usage["completion_tokens"] == 12


def test_the_default_steering_applies_first_and_can_be_switched_off(served):
    engine, client = served
    plain = text(chat(client))
    steered = text(chat(client, [{"vector": "ocean", "coef": 8.0}]))
    engine.set_default([SteeringSpec(vector="ocean", coef=8.0)])
    try:
        assert text(chat(client)) == steered
        assert text(chat(client, default_steering=False)) == plain
        both = text(chat(client, [{"vector": "rand", "coef": 1.0}]))
        assert both not in (plain, steered)
    finally:
        engine.set_default([])
    assert text(chat(client)) == plain


def test_bad_steering_is_a_400_naming_the_entry(served):
    _, client = served
    msg = chat(client, [{"vector": "nope", "coef": 1.0}], status=400)["error"]["message"]
    assert "unknown vector 'nope'" in msg
    msg = chat(client, [{"vector": "ocean", "coef": 1.0, "layers": [3]}],
               status=400)["error"]["message"]
    assert "steering[0]: layer(s) [3] not in vector 'ocean'" in msg
    msg = chat(client, [{"vector": "block", "coef": 1.0}], status=400)["error"]["message"]
    assert "[T, d] blocks" in msg
    assert chat(client)["choices"]  # still serving


def test_uploaded_vectors_are_used_replaced_and_deleted(served, hf, tmp_path):
    engine, client = served
    path_text = {}
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(hf.d_model, generator=g)
        path = SteeringVector({12: v / v.norm() * 40.0}).save(tmp_path / f"{seed}.safetensors")
        r = client.post("/v1/vectors?name=up", content=path.read_bytes(),
                        headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        path_text[seed] = text(chat(client, [{"vector": "up", "coef": 1.0}]))
    assert path_text[1] != path_text[2]  # the replaced vector is the one used
    files_before = engine.mirror.files()
    assert client.delete("/v1/vectors/up").status_code == 200
    chat(client, [{"vector": "up", "coef": 1.0}], status=400)
    engine.sweep()
    assert engine.mirror.files() < files_before  # the deleted vector's file is gone


def test_a_stopped_request_is_aborted_and_others_continue(served):
    engine, client = served
    ids = [1, 2, 3, 4]
    future = engine.submit(ids, [], 32)
    time.sleep(0.5)
    future.stop()
    assert future.cancelled()
    deadline = time.time() + 30
    while engine._running and time.time() < deadline:
        time.sleep(0.1)
    assert engine._running == 0  # vLLM aborted it: nothing is left running
    assert chat(client)["choices"]


def test_a_full_server_answers_429(served):
    engine, client = served
    futures = [engine.submit([1, 2, 3], [], 32) for _ in range(engine.max_num_seqs
                                                                + engine.limits.max_queue)]
    try:
        r = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 429 and r.headers["Retry-After"]
    finally:
        for f in futures:
            f.stop()


def test_a_conditional_entry_steers_only_matching_prompts(served, hf):
    """``when`` over HTTP on the vLLM backend: the condition vector reaches vLLM's processes
    through the mirror; a matching prompt is steered on its generated tokens, another is not."""
    from avec.intervene.condition_fit import fit, prompt_means

    engine, client = served
    food = ["What should I cook tonight?", "Give me a recipe for pancakes.",
            "How do I bake bread?", "What goes well with pasta?",
            "Suggest a healthy breakfast.", "How long should I boil an egg?"]
    other = ["Tell me a story.", "What is the capital of France?", "How do planes fly?",
             "Give me advice on my career.", "Describe your morning commute.",
             "Explain how tides work."]
    result = fit(hf, food, other, [8], held_out=0.34, seed=0)
    engine.registry.put("food", result.vector(hf))
    met = result.leaf.met(prompt_means(hf, food + other, [8])).tolist()
    picked = [(food + other)[met.index(True)], (food + other)[met.index(False)]]
    cond = [{"vector": "ocean", "coef": 6.0, "when": {"vector": "food"}}]
    always = [{"vector": "ocean", "coef": 6.0, "positions": "generated"}]
    for content, is_met in zip(picked, [True, False]):
        got = text(chat(client, cond, content=content))
        assert got == text(chat(client, always if is_met else None, content=content)), content
    assert text(chat(client, always, content=picked[0])) != text(chat(client,
                                                                      content=picked[0]))
    r = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "steering": [{"vector": "ocean", "coef": 1.0, "when": {"vector": "food"},
                      "per_token": True}]})
    assert r.status_code == 400 and "per_token" in r.text
