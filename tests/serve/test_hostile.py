"""Hostile input against the server: one request never hurts another (its text and its status),
every bad input gets a clear 4xx, and resources stay bounded (queue, deadlines, disconnects,
prompt size, idle connections, the vector store). Tiny random models on loopback; the few
timing bounds are generous."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import httpx
import pytest
import torch
import uvicorn
from conftest import make_tiny
from fastapi.testclient import TestClient
from safetensors.torch import save_file

import avec.serve.engine as engine_mod
from avec.cli.main import main
from avec.serve import Engine, Limits, ServeError, VectorRegistry, create_app
from avec.serve.schemas import SteeringSpec
from avec.serve.server import uvicorn_config
from avec.vector import SteeringVector

MODEL = "tiny"
URL = "/v1/chat/completions"


def random_vector(width: int, layers: list[int], seed: int) -> SteeringVector:
    g = torch.Generator().manual_seed(seed)
    return SteeringVector({L: torch.randn(width, generator=g) * 6 for L in layers})


def make_registry(model: Any) -> VectorRegistry:
    registry = VectorRegistry(model)
    for i, name in enumerate(["v0", "v1"]):
        registry.put(name, random_vector(model.d_model, [1, 2], seed=i))
    return registry


@pytest.fixture(scope="module")
def served(tiny_llama):
    # a huge |coef| is allowed here so that a row can be made to overflow inside the model
    limits = Limits(max_tokens=16, default_max_tokens=8, max_abs_coef=1e38,
                    request_timeout_s=60.0, batch_window_s=0.05)
    engine = Engine(tiny_llama, make_registry(tiny_llama), limits)
    yield engine, TestClient(create_app(engine, model_id=MODEL), raise_server_exceptions=False)
    engine.shutdown()


@pytest.fixture()
def client(served):
    return served[1]


def body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}],
            "max_tokens": 8, **extra}


def post(client: TestClient, data: dict[str, Any] | str | bytes) -> httpx.Response:
    raw = data if isinstance(data, (str, bytes)) else json.dumps(data, allow_nan=True)
    return client.post(URL, content=raw, headers={"content-type": "application/json"})


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def error_of(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert "Traceback" not in err["message"]
    return err


def ids(model: Any, text: str) -> list[int]:
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


@contextlib.contextmanager
def record_batches(monkeypatch) -> Iterator[list[list[list[int]]]]:
    """The prompts of every batch the engine generates."""
    seen: list[list[list[int]]] = []
    real = engine_mod.generate_ids

    def spy(model, prompt_ids, *a, **k):
        seen.append([list(p) for p in prompt_ids])
        return real(model, prompt_ids, *a, **k)

    monkeypatch.setattr(engine_mod, "generate_ids", spy)
    yield seen
    monkeypatch.setattr(engine_mod, "generate_ids", real)


# ---- rows isolated under failure ----------------------------------------------------------

POISON = [  # each passes nothing into a batch: refused at the boundary with a 400
    {"steering": [{"vector": "v0", "coef": 1.0, "op": "clamp", "value": float("nan")}]},
    {"steering": [{"vector": "v0", "coef": 1.0, "op": "clamp", "value": float("inf")}]},
    {"steering": [{"vector": "v0", "coef": 1.0, "op": "clamp", "value": 1e300}]},
    {"steering": [{"vector": "v0", "coef": 1.0, "op": "clamp", "value": -1e300}]},
    {"steering": [{"vector": "v0", "coef": float("nan")}]},
    {"steering": [{"vector": "v0", "coef": float("-inf")}]},
    {"steering": [{"vector": "v0", "coef": 1e300}]},
    {"steering": [{"vector": "v0", "coef": 1.0, "positions": 10**20}]},
    {"steering": [{"vector": "v0", "coef": 1.0, "positions": True}]},
    {"temperature": 1e-39, "seed": 1},
    {"seed": 2**64},
]


@pytest.mark.parametrize("hostile", POISON, ids=range(len(POISON)))
def test_poison_is_refused_and_batchmates_are_unchanged(client, hostile):
    alone = text_of(post(client, body("hello")))
    with ThreadPoolExecutor(4) as pool:
        bad = pool.submit(post, client, body("hello", **hostile))
        good = [pool.submit(post, client, body("hello")) for _ in range(2)]
        assert [text_of(f.result()) for f in good] == [alone, alone]
        error_of(bad.result(), 400)


def test_non_finite_row_ends_alone(served, tiny_llama, monkeypatch):
    """A row whose steering overflows inside the model (coef 1e38) ends with a 400 of its own;
    the greedy and the seeded sampled rows batched with it are bit-identical to alone."""
    engine = served[0]
    prompt = ids(tiny_llama, "hello there")
    greedy = engine.submit(prompt, [], 12).result(30).tokens
    sampled = engine.submit(prompt, [], 12, temperature=1.0, seed=5).result(30).tokens
    with record_batches(monkeypatch) as batches:
        futures = [engine.submit(prompt, [], 12),
                   engine.submit(prompt, [SteeringSpec(vector="v0", coef=1e38)], 12),
                   engine.submit(prompt, [], 12, temperature=1.0, seed=5)]
        assert futures[0].result(30).tokens == greedy
        assert futures[2].result(30).tokens == sampled
        with pytest.raises(ServeError, match="non-finite") as err:
            futures[1].result(30)
    assert err.value.status == 400
    assert any(len(b) == 3 for b in batches), batches  # they really shared a batch


def test_failing_row_fails_alone(served, tiny_llama, monkeypatch):
    """A batch that raises mid-generation is split and retried: the row that fails alone gets a
    500, its batchmates get their own text, and streamed tokens are not sent twice."""
    engine = served[0]
    good_ids, bad_ids = ids(tiny_llama, "good one"), ids(tiny_llama, "bad one")
    want = engine.submit(good_ids, [], 10).result(30).tokens
    real = engine_mod.generate_ids

    def flaky(model, prompt_ids, *a, on_step=None, **k):
        steps = [0]

        def step(tokens):
            steps[0] += 1
            if steps[0] == 3 and bad_ids in prompt_ids:
                raise RuntimeError("simulated failure on one row")
            on_step(tokens)

        return real(model, prompt_ids, *a, on_step=step, **k)

    monkeypatch.setattr(engine_mod, "generate_ids", flaky)
    streamed: list[int] = []
    retries = engine.stats["retries"]
    futures = [engine.submit(good_ids, [], 10, on_token=streamed.append),
               engine.submit(bad_ids, [], 10), engine.submit(good_ids, [], 10)]
    assert futures[0].result(30).tokens == want and futures[2].result(30).tokens == want
    with pytest.raises(ServeError, match="simulated failure") as err:
        futures[1].result(30)
    assert err.value.status == 500 and engine.stats["retries"] > retries
    assert streamed == want


# ---- 400s, never 500s ---------------------------------------------------------------------

@pytest.mark.parametrize("raw, needle", [
    (json.dumps(body(seed=2**64)), "seed"),
    ('{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "lone surrogate"),
    (('{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
      '"text": "\\udfff"}]}]}'), "lone surrogate"),
    ('{"model": "tiny\\ud800", "messages": [{"role": "user", "content": "x"}]}', "model"),
    (json.dumps(body(tools=[{"type": "function", "function": {"name": "f"}}])), "tools"),
    (json.dumps(body(logprobs=True)), "logprobs"),
    (json.dumps(body(top_logprobs=3)), "top_logprobs"),
    (json.dumps(body(response_format={"type": "json_object"})), "response_format"),
    (json.dumps(body(n=2)), "n"),
    (json.dumps(body(presence_penalty=0.5)), "presence_penalty"),
    (json.dumps(body(logit_bias={"1": 5})), "logit_bias"),
    (json.dumps(body(frobnicate=1)), "frobnicate"),
    (json.dumps(body(stop=["a", "b", "c", "d", "e"])), "stop"),
    (json.dumps(body(max_tokens=True)), "max_tokens"),
    (json.dumps(body(max_tokens="8")), "max_tokens"),
    (json.dumps(body(max_tokens=10**30)), "max_tokens"),
    (json.dumps(body(steering=[{"vector": "v0\n", "coef": 1.0}])), "invalid vector name"),
    (json.dumps(body(steering=[{"vector": "v0", "coef": 1.0, "positions": "from:1e9"}])),
     "positions"),
    ("[" * 50000 + "]" * 50000, "body"),
])
def test_client_errors_are_400_without_traceback(client, caplog, raw, needle):
    with caplog.at_level(logging.DEBUG):
        err = error_of(post(client, raw), 400)
    assert needle in err["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_harmless_openai_fields_are_accepted(client):
    plain = text_of(post(client, body("hello")))
    same = post(client, body("hello", n=1, logprobs=False, tools=[], presence_penalty=0,
                             frequency_penalty=0.0, top_p=1, stream=False, user="u1",
                             metadata={"k": "v"}, response_format={"type": "text"},
                             seed=None, stop=None, temperature=0))
    assert text_of(same) == plain


def test_vector_names_are_matched_whole(client, tiny_llama, tmp_path):
    data = random_vector(tiny_llama.d_model, [1], seed=3).save(tmp_path / "v.safetensors")
    for name in ["v0\n", "a b", ".hidden", "x" * 65, "\u00e9"]:
        r = client.post("/v1/vectors", params={"name": name}, content=data.read_bytes())
        assert "invalid vector name" in error_of(r, 400)["message"]


@pytest.mark.parametrize("shape", [(0, 32), (1, 1, 32), ()])
def test_unservable_uploads_are_400(client, tmp_path, shape):
    path = tmp_path / "bad.safetensors"
    save_file({"layer.1": torch.ones(shape)}, str(path),
              metadata={"avec": json.dumps({"layers": [1]})})
    r = client.post("/v1/vectors", params={"name": "odd"}, content=path.read_bytes())
    error_of(r, 400)


def test_float64_vector_overflowing_float32_is_refused(client, tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"layer.1": torch.full((32,), 1e300, dtype=torch.float64)}, str(path),
              metadata={"avec": json.dumps({"layers": [1]})})
    r = client.post("/v1/vectors", params={"name": "big"}, content=path.read_bytes())
    message = error_of(r, 400)["message"]
    assert "not finite" in message or "NaN/inf" in message


# ---- stop strings and stream options ------------------------------------------------------

def sse(client: TestClient, data: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", URL, json=data) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_stop_strings_cut_the_text(client):
    plain = text_of(post(client, body("hello", max_tokens=16)))
    stop = plain[5:7]
    cut = plain[:plain.find(stop)]
    r = post(client, body("hello", max_tokens=16, stop=[stop, "\u2603never"]))
    assert text_of(r) == cut and r.json()["choices"][0]["finish_reason"] == "stop"
    chunks = sse(client, body("hello", max_tokens=16, stop=stop, stream=True,
                              stream_options={"include_usage": True}))
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == cut
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 16
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


# ---- bounded resources --------------------------------------------------------------------

def slow_model(delay: float = 0.02):
    """A tiny model whose every forward pass sleeps ``delay`` s; ``calls[0]`` counts them."""
    model = make_tiny("llama")
    calls = [0]

    def hook(*_a):
        calls[0] += 1
        time.sleep(delay)

    model.blocks[0].register_forward_hook(hook)
    return model, calls


@pytest.fixture(scope="module")
def slow():
    model, calls = slow_model()
    limits = Limits(max_tokens=400, max_queue=2, request_timeout_s=60.0, max_batch=1,
                    max_prompt_chars=10_000)
    engine = Engine(model, make_registry(model), limits)
    yield engine, create_app(engine, model_id=MODEL), calls
    engine.shutdown()


def wait_until(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def idle(calls: list[int], quiet: float = 0.5) -> bool:
    """No forward pass for ``quiet`` seconds."""
    before = calls[0]
    time.sleep(quiet)
    return calls[0] == before


def test_full_queue_answers_429_with_retry_after(slow):
    engine, app, calls = slow
    prompt = ids(engine.model, "busy")
    futures = [engine.submit(prompt, [], 400)]
    assert wait_until(lambda: calls[0] > 0)  # the first one runs; two more fill the queue
    futures += [engine.submit(prompt, [], 400) for _ in range(2)]
    try:
        t0 = time.monotonic()
        r = post(TestClient(app), body("small", max_tokens=2))
        err = error_of(r, 429)
        assert time.monotonic() - t0 < 5.0
        assert int(r.headers["retry-after"]) >= 1 and err["type"] == "rate_limit_error"
        with pytest.raises(ServeError) as direct:
            engine.submit(prompt, [], 2)
        assert direct.value.status == 429
    finally:
        for f in futures:
            f.stop()
    assert wait_until(lambda: all(f.done() for f in futures)) and wait_until(lambda: idle(calls))


def test_deadline_stops_the_work():
    model, calls = slow_model()
    engine = Engine(model, make_registry(model), Limits(max_tokens=400, request_timeout_s=0.5))
    try:
        future = engine.submit(ids(model, "late"), [], 400)  # ~8 s of work
        with pytest.raises(ServeError, match="did not finish") as err:
            future.result(20)
        assert err.value.status == 504 and engine.stats["timed_out"] == 1
        assert calls[0] < 300 and idle(calls)
        assert len(engine.submit(ids(model, "next"), [], 2).result(20).tokens) <= 2
    finally:
        engine.shutdown()


@contextlib.contextmanager
def live(app: Any, **config: Any) -> Iterator[str]:
    """``app`` on a free loopback port with avec's uvicorn config; yields the base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, 15)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("stream", [False, True])
def test_client_disconnect_cancels_the_work(slow, stream, capfd):
    engine, app, calls = slow
    before = engine.stats["cancelled"]
    with live(app) as url:
        data = body("go on", max_tokens=400, stream=stream)
        if stream:
            with httpx.stream("POST", f"{url}{URL}", json=data, timeout=30) as r:
                next(r.iter_lines())  # the stream has started; now hang up
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{url}{URL}", json=data, timeout=0.5)
        assert wait_until(lambda: engine.stats["cancelled"] > before)
        assert idle(calls)
        r = httpx.post(f"{url}{URL}", json=body("after", max_tokens=2), timeout=30)
        assert r.status_code == 200
    logged = capfd.readouterr().err
    assert "Traceback" not in logged and "Exception" not in logged, logged


def test_huge_prompt_is_refused_fast_and_models_stay_responsive(slow):
    _engine, app, _calls = slow
    with live(app) as url:
        big = json.dumps(body("x" * 15_000_000))
        slowest = [0.0]

        def poll() -> None:
            for _ in range(10):
                t0 = time.monotonic()
                assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - t0)

        with ThreadPoolExecutor(2) as pool:
            poller = pool.submit(poll)
            t0 = time.monotonic()
            r = httpx.post(f"{url}{URL}", content=big, timeout=60,
                           headers={"content-type": "application/json"})
            took = time.monotonic() - t0
            poller.result()
        assert "characters" in error_of(r, 400)["message"]
        assert took < 10.0 and slowest[0] < 5.0


def test_idle_connections_are_closed(slow):
    _engine, app, _calls = slow
    with live(app, idle_timeout_s=1) as url:
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        try:
            silent.settimeout(10)
            trickle.settimeout(10)
            t0 = time.monotonic()
            with contextlib.suppress(OSError):  # a request head that never completes
                for ch in b"GET /v1/models HTTP/1.1\r\nHost: x\r\n":
                    trickle.sendall(bytes([ch]))
                    time.sleep(0.15)
            assert silent.recv(100) == b""  # closed by the server
            with contextlib.suppress(ConnectionResetError):
                assert trickle.recv(100) == b""
            assert time.monotonic() - t0 < 15.0
        finally:
            silent.close()
            trickle.close()
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 200


def test_a_trickled_body_is_cut_off(slow):
    _engine, app, _calls = slow
    with live(app, idle_timeout_s=30, body_timeout_s=1) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.settimeout(15)
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            t0 = time.monotonic()
            with contextlib.suppress(OSError):  # the rest of the body, far too slowly
                for _ in range(40):
                    sock.sendall(b" ")
                    time.sleep(0.25)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""  # closed without an answer
            assert time.monotonic() - t0 < 10.0  # the idle timeout (30 s) did not do it
        r = httpx.post(f"{url}{URL}", json=body("hi", max_tokens=2), timeout=30)
        assert r.status_code == 200  # a request sent at once is served


def test_vector_store_caps(tiny_llama, tmp_path):
    engine = Engine(tiny_llama, make_registry(tiny_llama),
                    Limits(max_vectors=3, max_store_bytes=700))  # v0, v1: 512 bytes
    try:
        client = TestClient(create_app(engine, model_id=MODEL))
        data = random_vector(tiny_llama.d_model, [1], seed=9).save(tmp_path / "a.safetensors")
        assert client.post("/v1/vectors?name=third", content=data.read_bytes()).status_code \
            == 201
        two = random_vector(tiny_llama.d_model, [1, 2], seed=9).save(tmp_path / "b.safetensors")
        error_of(client.post("/v1/vectors?name=third", content=two.read_bytes()), 413)
        error_of(client.post("/v1/vectors?name=fourth", content=data.read_bytes()), 409)
        assert client.delete("/v1/vectors/third").status_code == 200
        assert client.post("/v1/vectors?name=fourth", content=data.read_bytes()).status_code \
            == 201
    finally:
        engine.shutdown()


# ---- the command line ---------------------------------------------------------------------

@pytest.fixture()
def fake_uvicorn(monkeypatch, tiny_llama):
    """``avec serve`` on the tiny model, with a server that records its app instead of
    listening."""
    from avec.cli import common as cli

    ran: list[Any] = []

    class FakeServer:
        def __init__(self, config: Any) -> None:
            self.config = config

        def run(self) -> None:
            ran.append(self.config)

    monkeypatch.setattr(cli, "load_model_for", lambda _args: tiny_llama)
    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    return ran


def vectors_dir(tmp_path, model) -> Any:
    d = tmp_path / "vectors"
    d.mkdir()
    random_vector(model.d_model, [1], seed=1).save(d / "good.safetensors")
    (d / "garbage.safetensors").write_bytes(b"\x00" * 100)
    save_file({"layer.1": torch.full((model.d_model,), float("nan"))},
              str(d / "nan.safetensors"), metadata={"avec": json.dumps({"layers": [1]})})
    save_file({"layer.1": torch.ones(0, model.d_model)}, str(d / "empty.safetensors"),
              metadata={"avec": json.dumps({"layers": [1]})})
    random_vector(model.d_model, [1], seed=2).save(d / "bad name.safetensors")
    return d


def test_serve_refuses_a_bad_vectors_dir(fake_uvicorn, tiny_llama, tmp_path, capsys):
    d = vectors_dir(tmp_path, tiny_llama)
    assert main(["serve", "--vectors", str(d)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and not fake_uvicorn
    for name in ("garbage", "nan", "empty", "bad name"):
        assert f"{name}.safetensors" in err
    assert "good.safetensors" not in err and "--skip-bad-vectors" in err


def test_serve_skips_bad_vectors_when_asked(fake_uvicorn, tiny_llama, tmp_path, capsys):
    d = vectors_dir(tmp_path, tiny_llama)
    assert main(["serve", "--vectors", str(d), "--skip-bad-vectors", "--max-queue", "7",
                 "--idle-timeout", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 4 and "1 vectors: good" in err
    config = fake_uvicorn[0]
    assert config.timeout_keep_alive == 3 and config.limit_concurrency == 256


@pytest.mark.parametrize("key", ["", " ", "two words", "caf\u00e9"])
def test_serve_refuses_an_unusable_api_key(fake_uvicorn, capsys, key):
    assert main(["serve", "--api-key", key]) == 2
    err = capsys.readouterr().err
    assert "API key" in err and "Traceback" not in err and not fake_uvicorn


def test_create_app_refuses_an_empty_api_key(served):
    with pytest.raises(ValueError, match="API key"):
        create_app(served[0], api_key="")


class FakeLlama:
    """Stands in for a LlamaCppModel: emits token 65 every 20 ms and counts the tokens it
    made."""

    name = "fake-llama"
    d_model = 32
    n_layers = 4
    eos_ids = {256}

    def __init__(self) -> None:
        from conftest import byte_tokenizer

        self.tokenizer = byte_tokenizer()
        self.made = 0

    def check(self, _terms: Any) -> None:
        pass

    def generate(self, prompt_ids, max_new_tokens, terms=(), *, sampling=None, on_token=None):
        out = []
        for _ in range(max_new_tokens):
            time.sleep(0.02)
            self.made += 1
            out.append(65)
            if on_token is not None:
                on_token(65)
        return out


def test_llama_cpp_engine_keeps_the_same_limits():
    """Deadlines, stop(), stop strings and the bounded queue end work on the llama.cpp engine
    too (between two tokens)."""
    from avec.serve import LlamaCppEngine

    model = FakeLlama()
    engine = LlamaCppEngine(model, VectorRegistry(model),  # type: ignore[arg-type]
                            Limits(max_tokens=400, request_timeout_s=0.5, max_queue=1))
    try:
        with pytest.raises(ServeError, match="did not finish") as err:
            engine.submit([1, 2], [], 400).result(20)
        assert err.value.status == 504 and model.made < 100
        result = engine.submit([1, 2], [], 50, stop=[model.tokenizer.decode([65] * 3)]).result(20)
        assert result.tokens == [65, 65, 65] and result.finish_reason == "stop"
        start = model.made
        running = engine.submit([1, 2], [], 400)
        assert wait_until(lambda: model.made > start + 3)
        queued = engine.submit([1, 2], [], 400)
        with pytest.raises(ServeError) as busy:
            engine.submit([1, 2], [], 1)
        assert busy.value.status == 429
        running.stop()
        queued.stop()
        assert wait_until(lambda: running.done() and queued.done())
        made = model.made
        time.sleep(0.2)
        assert model.made == made and engine.stats["cancelled"] >= 2
    finally:
        engine.shutdown()


def test_worker_survives_a_bug_outside_generation(tiny_llama, monkeypatch):
    engine = Engine(tiny_llama, make_registry(tiny_llama), Limits(max_tokens=4))
    try:
        def broken(_jobs):
            raise RuntimeError("bookkeeping bug")

        monkeypatch.setattr(engine, "_tracker", broken)
        with pytest.raises(ServeError, match="bookkeeping bug") as err:
            engine.submit([1, 2, 3], [], 4).result(20)
        assert err.value.status == 500
        monkeypatch.undo()
        assert len(engine.submit([1, 2, 3], [], 4).result(20).tokens) <= 4
    finally:
        engine.shutdown()
