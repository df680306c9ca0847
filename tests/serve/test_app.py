"""The OpenAI-compatible server: routes, errors, limits, per-request steering isolation under
concurrency, and a real uvicorn server driven by the official ``openai`` client."""

from __future__ import annotations

import io
import json
import pickle
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import live_server
from fastapi.testclient import TestClient  # the serve extra is part of the dev set-up: no skip

from avec.generation.hf import generate_ids
from avec.serve import Engine, Limits, ServeError, VectorRegistry, create_app
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

KEY = "test-key"
MODEL_ID = "tiny-llama"
AUTH = {"Authorization": f"Bearer {KEY}"}


def random_vector(width: int, layers: list[int], seed: int, scale: float = 6.0
                  ) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({L: torch.randn(width, generator=g) * scale for L in layers},
                          {"method": f"random{seed}"})


@pytest.fixture(scope="module")
def served(tiny_llama):
    registry = VectorRegistry(tiny_llama)
    for i, name in enumerate(["v0", "v1", "v2", "v3"]):
        registry.put(name, random_vector(tiny_llama.d_model, [1, 2], seed=i))
    limits = Limits(max_tokens=32, default_max_tokens=8, max_steering=4, max_abs_coef=50.0,
                    request_timeout_s=30.0, max_body_bytes=1 << 20)
    engine = Engine(tiny_llama, registry, limits)
    app = create_app(engine, api_key=KEY, model_id=MODEL_ID)
    yield engine, app
    engine.shutdown()


@pytest.fixture(scope="module")
def client(served):
    return TestClient(served[1], headers=AUTH)


def chat(client: TestClient, content: str = "hello", **extra) -> dict:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error_of(r, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) >= {"message", "type"}
    return body["error"]["message"]


def prompt_ids(model, content: str) -> list[int]:
    text = model.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                               add_generation_prompt=True, tokenize=False)
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def reference(model, registry, content: str, max_tokens: int, steering: list[dict]) -> str:
    """One row alone, steered with steer() directly: what the server must reproduce."""
    ivs = [Intervention(registry.get(s["vector"]), coef=s["coef"], layers=s.get("layers"),
                        op=s.get("op", "add")) for s in steering]
    with steer(model, ivs):
        toks = generate_ids(model, [prompt_ids(model, content)], max_tokens)[0]
    return model.tokenizer.decode(toks, skip_special_tokens=True)


def test_models_and_openapi(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL_ID]
    assert client.get(f"/v1/models/{MODEL_ID}").status_code == 200
    error_of(client.get("/v1/models/gpt-4"), 404)
    assert "/v1/chat/completions" in client.get("/openapi.json").json()["paths"]


def test_plain_and_steered_completion(client, served, tiny_llama):
    plain = chat(client, "hello")
    assert plain["object"] == "chat.completion"
    choice = plain["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    assert plain["usage"]["completion_tokens"] <= 8
    assert plain["usage"]["prompt_tokens"] == len(prompt_ids(tiny_llama, "hello"))
    assert chat(client, "hello", model="default")["choices"][0] == choice
    steered = chat(client, "hello", steering=[{"vector": "v0", "coef": 8.0}])
    assert steered["choices"][0]["message"]["content"] != choice["message"]["content"]
    engine = served[0]
    assert steered["choices"][0]["message"]["content"] == reference(
        tiny_llama, engine.registry, "hello", 8, [{"vector": "v0", "coef": 8.0}])


def test_default_steering_applies_first_and_a_request_can_switch_it_off(client, served,
                                                                        tiny_llama):
    from avec.errors import SteeringError
    from avec.serve.schemas import SteeringSpec

    engine = served[0]
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    plain = text(chat(client, "hello"))
    v0 = [{"vector": "v0", "coef": 8.0}]
    steered = text(chat(client, "hello", steering=v0))
    engine.set_default([SteeringSpec(vector="v0", coef=8.0)])
    try:
        assert text(chat(client, "hello")) == steered
        assert text(chat(client, "hello", default_steering=False)) == plain
        both = text(chat(client, "hello", steering=[{"vector": "v1", "coef": 8.0}]))
        assert both == reference(tiny_llama, engine.registry, "hello", 8,
                                 v0 + [{"vector": "v1", "coef": 8.0}])
        r = client.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
            "steering": v0})
        assert "repeats default_steering[0]" in error_of(r, 400)
        assert "default_steering: false" in error_of(r, 400)
        with pytest.raises(SteeringError, match=r"default_steering\[0\]: \|coef\| 99"):
            engine.set_default([SteeringSpec(vector="v0", coef=99.0)])
    finally:
        engine.set_default([])
    assert text(chat(client, "hello")) == plain


def test_an_entry_without_coef_uses_the_recommended_setting(client, served, tiny_llama):
    from avec.vector import Recommendation

    engine = served[0]
    tuned = random_vector(tiny_llama.d_model, [1, 2], seed=9).with_recommendation(
        Recommendation((2,), 5.0, details={"budget": {"metric": "kl", "max": 1.0}}))
    engine.registry.put("tuned", tuned)
    text = lambda r: r["choices"][0]["message"]["content"]  # noqa: E731
    try:
        same = text(chat(client, "hello", steering=[{"vector": "tuned", "coef": 5.0,
                                                     "layers": [2]}]))
        assert text(chat(client, "hello", steering=[{"vector": "tuned"}])) == same
        assert text(chat(client, "hello", steering=[{"vector": "tuned",
                                                     "coef": "recommended"}])) == same
        half = text(chat(client, "hello", steering=[{"vector": "tuned", "coef": 2.5,
                                                     "layers": [2]}]))
        assert text(chat(client, "hello", steering=[{"vector": "tuned",
                                                     "coef_scale": 0.5}])) == half
        listed = {v["name"]: v for v in client.get("/v1/vectors").json()["data"]}
        assert listed["tuned"]["recommended"]["coef"] == 5.0
        assert listed["v0"]["recommended"] is None
        r = client.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
            "steering": [{"vector": "v0"}]})
        assert "steering[0].coef: vector 'v0' has no recommended setting" in error_of(r, 400)
    finally:
        engine.registry.remove("tuned")


@pytest.mark.parametrize("extra, status, needle", [
    ({"steering": [{"vector": "nope", "coef": 1.0}]}, 400, "unknown vector 'nope'"),
    ({"steering": [{"vector": "v0", "coef": 1.0, "layers": [3]}]}, 400, "not in vector 'v0'"),
    ({"steering": [{"vector": "v0", "coef": 1.0, "op": "scale"}]}, 400, "op"),
    ({"steering": [{"vector": "v0", "coef": 1.0, "positions": "middle"}]}, 400, "positions"),
    ({"steering": [{"vector": "v0", "coef": 99.0}]}, 400, "exceeds the limit"),
    ({"steering": [{"vector": "v0", "coef": 1.0}] * 5}, 400, "at most 4"),
    ({"steering": [{"vector": "v0", "coef": 1.0}] * 2}, 400, "repeats steering[0]"),
    ({"max_tokens": 10_000}, 400, "limit of 32"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"top_p": 0.5}, 400, "nucleus sampling is not supported"),
    ({"temperature": 5}, 400, "temperature"),
    ({"model": "gpt-4"}, 404, "does not exist"),
    ({"messages": []}, 400, "messages"),
])
def test_bad_requests_get_json_errors(client, extra, status, needle):
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], **extra}
    assert needle in error_of(client.post("/v1/chat/completions", json=body), status)
    chat(client, "still serving")


def test_auth_and_body_limit(served):
    app = served[1]
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
    anon = TestClient(app)
    error_of(anon.post("/v1/chat/completions", json=body), 401)
    error_of(anon.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert anon.get("/openapi.json").status_code == 200
    big = {**body, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    error_of(anon.post("/v1/chat/completions", json=big, headers=AUTH), 413)
    assert temperature_zero_ok(anon)


def temperature_zero_ok(c: TestClient) -> bool:
    r = c.post("/v1/chat/completions", headers=AUTH, json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "max_tokens": 2})
    return r.status_code == 200


def vector_bytes(vec: SteeringVector, tmp_path) -> bytes:
    return vec.save(tmp_path / "v.safetensors").read_bytes()


def test_vector_upload_list_delete(client, tiny_llama, tmp_path):
    vec = random_vector(tiny_llama.d_model, [1], seed=7)
    data = vector_bytes(vec, tmp_path)
    r = client.post("/v1/vectors", data={"name": "up"},
                    files={"file": ("up.safetensors", io.BytesIO(data))})
    assert r.status_code == 201, r.text
    assert r.json()["layers"] == [1] and r.json()["width"] == tiny_llama.d_model
    listed = {v["name"]: v for v in client.get("/v1/vectors").json()["data"]}
    assert listed["up"]["method"] == "random7" and set(listed["up"]["norms"]) == {"1"}
    chat(client, "hello", steering=[{"vector": "up", "coef": 3.0}])
    r = client.post("/v1/vectors?name=raw", content=data,
                    headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    assert client.delete("/v1/vectors/up").json()["deleted"] is True
    assert client.delete("/v1/vectors/raw").status_code == 200
    error_of(client.delete("/v1/vectors/up"), 404)
    error_of(client.get("/v1/vectors/up"), 404)
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
            "steering": [{"vector": "up", "coef": 1.0}]}
    error_of(client.post("/v1/chat/completions", json=body), 400)


def test_bad_uploads_rejected(client, tiny_llama, tmp_path):
    from safetensors.torch import save_file

    nan = tmp_path / "nan.safetensors"
    save_file({"layer.1": torch.full((tiny_llama.d_model,), float("nan"))}, str(nan),
              metadata={"avec": json.dumps({"layers": [1]})})
    narrow = vector_bytes(random_vector(16, [1], seed=1), tmp_path)
    deep = vector_bytes(random_vector(tiny_llama.d_model, [9], seed=1), tmp_path)
    pickled = pickle.dumps({"layer.1": [0.0] * tiny_llama.d_model})
    cases = [(nan.read_bytes(), "NaN"), (narrow, "width 16"), (deep, "layer(s) [9]"),
             (pickled, "not a valid safetensors"), (b"", "empty")]
    for data, needle in cases:
        r = client.post("/v1/vectors", data={"name": "bad"},
                        files={"file": ("bad.safetensors", io.BytesIO(data))})
        assert needle in error_of(r, 400)
    good = vector_bytes(random_vector(tiny_llama.d_model, [1], seed=1), tmp_path)
    r = client.post("/v1/vectors?name=../etc", content=good)
    assert "invalid vector name" in error_of(r, 400)
    assert "bad" not in [v["name"] for v in client.get("/v1/vectors").json()["data"]]


def test_concurrent_requests_are_isolated(client, served, tiny_llama):
    """200 concurrent requests over 8 steering settings (7 steered, one not; adds, an ablation,
    layer subsets, generated-only positions), different prompts and max_tokens: each equals
    its own row generated alone; the engine batched them."""
    engine = served[0]
    settings = [[{"vector": "v0", "coef": 8.0}], [{"vector": "v1", "coef": -6.0}],
                [{"vector": "v2", "coef": 5.0, "layers": [1]}],
                [{"vector": "v3", "coef": 1.0, "op": "ablate"}, {"vector": "v0", "coef": 3.0}],
                [], [{"vector": "v0", "coef": -4.0}], [{"vector": "v1", "coef": 2.0,
                                                         "positions": "generated"}],
                [{"vector": "v3", "coef": 7.0, "layers": [2]}]]
    prompts = ["hello", "a long prompt here", "hi", "mid size one"]
    jobs = [(prompts[i % 4], settings[i % 8], 4 + i % 9) for i in range(200)]
    before = engine.batches_run

    def run(job):
        content, steering, max_tokens = job
        out = chat(client, content, steering=steering, max_tokens=max_tokens)
        return out["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=64) as pool:
        got = list(pool.map(run, jobs))
    assert engine.batches_run - before < 100  # requests shared batches
    want = [reference(tiny_llama, engine.registry, c, m, s) for c, s, m in jobs]
    assert got == want
    assert len(set(got)) > 5  # the settings really differ


def test_engine_survives_a_failing_batch(served, monkeypatch):
    import avec.serve.engine as engine_mod

    engine = served[0]

    def boom(*_a, **_k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(engine_mod, "generate_ids", boom)
    fut = engine.submit([1, 2, 3], [], 4)
    with pytest.raises(ServeError, match="simulated failure") as err:
        fut.result(timeout=10)
    assert err.value.status == 500
    monkeypatch.undo()
    assert len(engine.submit([1, 2, 3], [], 4).result(timeout=10).tokens) <= 4


def test_uvicorn_with_openai_client(served, tiny_llama):
    with live_server(served[1]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY,
                               max_retries=0, timeout=30)
        assert [m.id for m in client.models.list().data] == [MODEL_ID]
        messages = [{"role": "user", "content": "hello"}]
        plain = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                               max_tokens=8)
        steering = [{"vector": "v0", "coef": 8.0}]
        steered = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                                 max_tokens=8,
                                                 extra_body={"steering": steering})
        assert steered.choices[0].message.content != plain.choices[0].message.content
        assert steered.choices[0].message.content == reference(
            tiny_llama, served[0].registry, "hello", 8, steering)
        stream = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                                max_tokens=8, stream=True,
                                                extra_body={"steering": steering})
        chunks = list(stream)
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == steered.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == steered.choices[0].finish_reason
        with pytest.raises(openai.BadRequestError, match="unknown vector"):
            client.chat.completions.create(model=MODEL_ID, messages=messages,
                                           extra_body={"steering": [{"vector": "x",
                                                                     "coef": 1.0}]})
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong",
                          max_retries=0).models.list()


def test_tokens_stream_while_generating(served, tiny_llama):
    """on_token sees every token of its own request (none past max_tokens, no end-of-sequence
    token) before the request's future resolves, also when batched with other requests."""
    engine = served[0]
    prompt = list(tiny_llama.tokenizer("stream me", add_special_tokens=False)["input_ids"])
    seen: list[tuple[int, bool]] = []
    futures: list = []

    def on_token(tok: int) -> None:  # before submit() returns, the future is surely not done
        seen.append((tok, futures[0] is not None and futures[0].done()))

    futures.append(None)
    fut = engine.submit(prompt, [], 6, on_token=on_token)
    futures[0] = fut
    other = engine.submit(prompt, [], 12)  # a longer row in the same batch
    result = fut.result(timeout=30)
    other.result(timeout=30)
    assert [t for t, _ in seen] == result.tokens
    assert len(result.tokens) <= 6
    assert seen and not any(done for _, done in seen)


def test_sampling_is_seeded_per_request(client, served, tiny_llama):
    """temperature > 0 samples with the request's own seeded generator: the same seed gives the
    same text alone or batched with other requests, other seeds give other texts, and greedy
    requests in the same batch are unaffected."""
    body = {"content": "hello", "max_tokens": 12, "temperature": 1.5}
    solo = chat(client, **body, seed=7)["choices"][0]["message"]["content"]
    assert chat(client, **body, seed=7)["choices"][0]["message"]["content"] == solo
    others = {chat(client, **body, seed=s)["choices"][0]["message"]["content"]
              for s in range(8, 12)}
    assert len(others | {solo}) > 1
    greedy = chat(client, "hello", max_tokens=12)["choices"][0]["message"]["content"]
    jobs = [dict(body, seed=7), {"content": "hello", "max_tokens": 12},
            dict(body, seed=9, steering=[{"vector": "v0", "coef": 3.0}])] * 4
    with ThreadPoolExecutor(max_workers=12) as pool:
        got = list(pool.map(lambda kw: chat(client, **kw)["choices"][0]["message"]["content"],
                            jobs))
    assert got[0::3] == [solo] * 4
    assert got[1::3] == [greedy] * 4
    assert len(set(got[2::3])) == 1


def test_conditional_entries_steer_only_matching_requests(client, served, tiny_llama):
    """A ``when`` entry (CAST) decided per request from its own prompt: among concurrent
    requests, those whose prompt meets the condition equal unconditional generated-only steering,
    the others equal the plain model; a bad condition is a 400 naming the field."""
    from avec.intervene.condition_fit import prompt_means
    from avec.intervene.conditions import condition_vector

    engine = served[0]
    prompts = ["hello", "zq!! xv?? 17 zzzz"]
    g = torch.Generator().manual_seed(5)
    direction = torch.randn(tiny_llama.d_model, generator=g)
    means = prompt_means(tiny_llama, prompts, [1])[1]
    values = torch.nn.functional.cosine_similarity(means, direction.expand(2, -1), dim=-1)
    above = int(values.argmax())
    engine.registry.put("cond", condition_vector(direction, 1, float(values.mean())))

    def want(content: str, met: bool) -> str:
        ivs = [Intervention(engine.registry.get("v0"), 8.0, positions="generated")] if met \
            else []
        with steer(tiny_llama, ivs):
            toks = generate_ids(tiny_llama, [prompt_ids(tiny_llama, content)], 6)[0]
        return tiny_llama.tokenizer.decode(toks, skip_special_tokens=True)

    conditional = [{"vector": "v0", "coef": 8.0, "when": {"vector": "cond"}}]
    negated = [{"vector": "v0", "coef": 8.0, "when": {"not": {"vector": "cond"}}}]
    jobs = [(prompts[i % 2], conditional if i % 4 < 2 else negated) for i in range(16)]

    def run(job):
        content, steering = job
        return chat(client, content, steering=steering, max_tokens=6)["choices"][0][
            "message"]["content"]

    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(run, jobs))
    expected = [want(c, (c == prompts[above]) == (s is conditional)) for c, s in jobs]
    assert got == expected
    assert want(prompts[above], True) != want(prompts[above], False)  # steering shows

    for steering, needle in [
            ([{"vector": "v0", "coef": 1.0, "when": {"vector": "nope"}}], "steering[0].when"),
            ([{"vector": "v0", "coef": 1.0, "when": {"vector": "cond", "op": "="}}],
             "steering[0].when.op"),
            ([{"vector": "v0", "coef": 1.0, "when": {"any": [{"vector": "cond"}]}}],
             "steering[0].when.any"),
            ([{"vector": "v0", "coef": 1.0, "per_token": True}], "per_token"),
            ([{"vector": "v0", "coef": 1.0, "when": {"vector": "cond"}, "positions": "all"}],
             "positions")]:
        r = client.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
            "steering": steering})
        assert needle in error_of(r, 400), steering
