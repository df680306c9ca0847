"""Fuzzing the server's request handling: random and half-valid bodies, numeric edge values
(NaN, +-inf, denormals, 1e300, 2**64, -0.0) and Unicode edge cases (lone surrogates, BOM,
bidi controls, combining marks) never get a 5xx; a hostile batchmate never changes a benign
request's text or status; a flooded queue still answers or refuses a small request fast.

Bounded (a fixed number of examples, no deadline flakiness) and derandomized, so CI is stable;
every answer must be a JSON body, with an ``error`` object whenever the status is 4xx.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient  # dev dependencies: a missing one fails, never skips
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avec.serve import Engine, Limits, VectorRegistry, create_app
from avec.vector import SteeringVector

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=4),
    max_leaves=12)
ANY = JSON | st.just(float("inf")) | st.just(-1) | st.just(10**9)

MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"])
                                 | ANY, "content": st.text(max_size=30) | ANY})
STEER = st.fixed_dictionaries(
    {"vector": st.sampled_from(["v0", "v1", "nope"]) | ANY,
     "coef": st.floats(-100, 100) | ANY},
    optional={"layers": st.lists(st.integers(-3, 5), max_size=3) | ANY,
              "op": st.sampled_from(["add", "ablate", "clamp", "mul"]) | ANY,
              "positions": st.sampled_from(["all", "prompt", "generated", "from:2", "from:x"])
              | st.integers(-2, 5) | ANY,
              "value": st.floats(-5, 5) | ANY})
REQUEST = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "default", "other"]) | ANY,
     "messages": st.lists(MESSAGE, max_size=3) | ANY},
    optional={"max_tokens": st.integers(-2, 40) | ANY,
              "temperature": st.sampled_from([None, 0, 0.7]) | ANY,
              "stream": st.booleans() | ANY,
              "n": st.integers(0, 3) | ANY,
              "steering": st.lists(STEER, max_size=3) | ANY})


@pytest.fixture(scope="module")
def client(tiny_llama):
    registry = VectorRegistry(tiny_llama)
    g = torch.Generator().manual_seed(0)
    for name in ("v0", "v1"):
        registry.put(name, SteeringVector({1: torch.randn(tiny_llama.d_model, generator=g)}))
    limits = Limits(max_tokens=8, default_max_tokens=4, max_steering=2, max_abs_coef=50.0,
                    request_timeout_s=30.0, max_body_bytes=1 << 16)
    engine = Engine(tiny_llama, registry, limits)
    yield TestClient(create_app(engine, model_id="tiny"), raise_server_exceptions=False)
    engine.shutdown()


def check(response) -> None:
    assert response.status_code < 500, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]") or '"error"' in response.text
        return
    body = response.json()
    if response.status_code >= 400:
        assert isinstance(body.get("error"), dict) and body["error"].get("message")


FUZZ = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=REQUEST)
def test_chat_completions_never_5xx(client, body):
    check(client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                      headers={"content-type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_raw_bodies_never_5xx(client, raw):
    check(client.post("/v1/chat/completions", content=raw,
                      headers={"content-type": "application/json"}))


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(name=st.text(max_size=70), data=st.binary(max_size=300))
def test_vector_uploads_never_5xx(client, name, data):
    check(client.post("/v1/vectors", params={"name": name}, content=data,
                      headers={"content-type": "application/octet-stream"}))
    check(client.delete(f"/v1/vectors/{quote(name or 'x', safe='')}"))


# ---- numeric and Unicode edge values; batch isolation; load -------------------------------

EDGE_NUMBERS = st.sampled_from([
    float("nan"), float("inf"), float("-inf"), -0.0, 0.0, 5e-324, 1e-310, 2.2250738585072014e-308,
    1e-39, 1e-3, 1e300, -1e300, 1.7976931348623157e308, 3.4e38, 3.5e38, 65504.0, 65520.0,
    2**24 + 1, 2**53 + 1, 2**31, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**20, 10**400, True,
    False, 1, -1]) | st.floats() | st.integers()
EDGE_TEXT = st.sampled_from([
    "", "\ud800", "\udfff", "a\ud83dz", "\U0010ffff", "\ufeff", "\u202e", "\u0301", "\ufffd",
    "\x00", "\x1b[31m", "e\u0301\u0301\u0301", "\U0001f600" * 10, "\n", "v0\n", " v0", "v0",
    "../v0", "x" * 300]) | st.text(alphabet=st.characters(codec=None), max_size=12)
EDGE = EDGE_NUMBERS | EDGE_TEXT | st.none() | st.lists(EDGE_NUMBERS, max_size=3)
EDGE_STEER = st.fixed_dictionaries(
    {"vector": st.sampled_from(["v0", "v1"]) | EDGE_TEXT,
     "coef": st.floats(-50, 50) | EDGE_NUMBERS},
    optional={"layers": st.lists(st.integers(0, 3) | EDGE_NUMBERS, max_size=3) | EDGE,
              "op": st.sampled_from(["add", "ablate", "clamp"]) | EDGE_TEXT,
              "positions": st.sampled_from(["all", "prompt", "generated", "from:1"])
              | EDGE_NUMBERS | EDGE_TEXT,
              "value": st.floats(-5, 5) | EDGE_NUMBERS})
HOSTILE = st.fixed_dictionaries(
    {"model": st.just("tiny"),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                 "content": EDGE_TEXT}), min_size=1,
                          max_size=2)},
    optional={"max_tokens": st.integers(1, 8) | EDGE_NUMBERS,
              "temperature": st.sampled_from([0, 0.7, 2]) | EDGE_NUMBERS,
              "seed": st.integers(0, 2**63 - 1) | EDGE_NUMBERS,
              "stream": st.booleans(),
              "stop": EDGE_TEXT | st.lists(EDGE_TEXT, max_size=5),
              "top_p": EDGE_NUMBERS,
              "n": EDGE_NUMBERS,
              "logprobs": EDGE, "tools": EDGE, "presence_penalty": EDGE_NUMBERS,
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | EDGE,
              "steering": st.lists(EDGE_STEER, max_size=2) | EDGE})


def send(client, body) -> object:
    return client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                       headers={"content-type": "application/json"})


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(body=HOSTILE)
def test_edge_values_never_5xx(client, body):
    check(send(client, body))


BENIGN = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def benign_alone(client):
    r = send(client, BENIGN)
    assert r.status_code == 200
    return r.json()["choices"][0]["message"]["content"]


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(hostile=HOSTILE)
def test_hostile_batchmate_never_changes_a_benign_request(client, benign_alone, hostile):
    """A random hostile request sent together with a fixed benign one (so they share a batch
    when both get that far) never changes the benign one's text or status."""
    with ThreadPoolExecutor(2) as pool:
        bad = pool.submit(send, client, hostile)
        good = pool.submit(send, client, BENIGN)
        r = good.result()
        check(bad.result())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == benign_alone


def test_flooded_queue_still_answers_a_small_request_fast():
    """40 long requests against a queue of 8: every answer is a 200 or a 429 with Retry-After
    (never a 5xx or a 504), and a small request sent mid-flood is answered or refused within
    a generous bound."""
    from conftest import make_tiny

    model = make_tiny("llama")
    model.blocks[0].register_forward_hook(lambda *_a: time.sleep(0.005))  # a slower model
    engine = Engine(model, VectorRegistry(model),
                    Limits(max_tokens=64, max_queue=8, max_batch=4, request_timeout_s=120.0))
    client = TestClient(create_app(engine, model_id="tiny"), raise_server_exceptions=False)
    long = {**BENIGN, "max_tokens": 64}
    try:
        with ThreadPoolExecutor(24) as pool:
            flood = [pool.submit(send, client, long) for _ in range(40)]
            time.sleep(0.3)
            t0 = time.monotonic()
            small = send(client, {**BENIGN, "max_tokens": 2})
            took = time.monotonic() - t0
            statuses = [f.result().status_code for f in flood]
        assert small.status_code in (200, 429), small.text
        assert took < 10.0, took
        assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
        assert all(f.result().headers.get("retry-after") for f in flood
                   if f.result().status_code == 429)
    finally:
        engine.shutdown()
