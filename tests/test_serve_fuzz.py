"""Fuzzing the server's request handling: random and half-valid bodies never get a 5xx.

Bounded (a fixed number of examples, no deadline flakiness) and derandomized, so CI is stable;
every answer must be a JSON body, with an ``error`` object whenever the status is 4xx.
"""

from __future__ import annotations

import json
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
