"""A request's steering: read from ``SamplingParams.extra_args``, validated completely, resolved
against the vector store, and turned into the prefix-cache salt that keeps steered and unsteered
KV apart."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from avec.formats.jsonsafe import JSONInputError, loads
from avec.serve.limits import Limits
from avec.serve.schemas import SteeringSpec
from avec.vllm import EXTRA_ARGS_KEY
from avec.vllm.store import StoredVector, VectorStore

_ENTRIES = TypeAdapter(list[SteeringSpec])


class SteeringRequestError(ValueError):
    """A request's steering is invalid; the message names the entry and field (a 400)."""


@dataclass(frozen=True)
class Entry:
    """One resolved steering entry: ``op`` at ``layers`` with ``stored``'s direction."""

    name: str
    stored: StoredVector
    coef: float
    layers: tuple[int, ...]
    op: str
    positions: str | int
    value: float


def raw_entries(extra_args: dict[str, Any] | None) -> Any:
    """The request's steering value (``None`` when it asks for none). A string is JSON (the
    OpenAI ``vllm_xargs`` values are flat, so a list arrives as a JSON string)."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    value = extra_args[EXTRA_ARGS_KEY]
    if isinstance(value, str):
        try:
            value = loads(value, max_depth=8)
        except JSONInputError as exc:
            raise SteeringRequestError(f"{EXTRA_ARGS_KEY}: not valid JSON ({exc})") from None
    return value


def parse(extra_args: dict[str, Any] | None, store: VectorStore, n_layers: int,
          limits: Limits | None = None) -> tuple[Entry, ...]:
    """The request's entries, checked: schema (strict types, finite numbers, known fields), at
    most ``limits.max_steering`` entries, bounded ``coef``/``value``, a vector that exists, and
    layers the vector has and the model has."""
    raw = raw_entries(extra_args)
    if raw is None:
        return ()
    limits = limits or Limits()
    if isinstance(raw, dict):
        raw = [raw]
    try:
        specs = _ENTRIES.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = list(first["loc"])
        where = (f"[{loc[0]}]" if loc else "") + "".join(f".{x}" for x in loc[1:])
        raise SteeringRequestError(f"{EXTRA_ARGS_KEY}{where}: "
                                   f"{first['msg'].removeprefix('Value error, ')}") from None
    if len(specs) > limits.max_steering:
        raise SteeringRequestError(f"{EXTRA_ARGS_KEY}: {len(specs)} entries; at most "
                                   f"{limits.max_steering}")
    return tuple(_resolve(i, s, store, n_layers, limits) for i, s in enumerate(specs))


def _resolve(i: int, s: SteeringSpec, store: VectorStore, n_layers: int,
             limits: Limits) -> Entry:
    where = f"{EXTRA_ARGS_KEY}[{i}]"
    if abs(s.coef) > limits.max_abs_coef:
        raise SteeringRequestError(f"{where}.coef={s.coef}: |coef| must be <= "
                                   f"{limits.max_abs_coef:g}")
    if abs(s.value) > limits.max_abs_value:
        raise SteeringRequestError(f"{where}.value={s.value}: |value| must be <= "
                                   f"{limits.max_abs_value:g}")
    stored = store.get(s.vector)
    if stored is None:
        known = ", ".join(store.names()[:20]) or "none"
        raise SteeringRequestError(f"{where}.vector: no vector named {s.vector!r} (known: {known})")
    have = sorted(stored.vector.directions)
    layers = tuple(s.layers) if s.layers is not None else tuple(have)
    for L in layers:
        if L not in stored.vector.directions:
            raise SteeringRequestError(f"{where}.layers: vector {s.vector!r} has no layer {L} "
                                       f"(it has {have})")
        if not 0 <= L < n_layers:
            raise SteeringRequestError(f"{where}.layers: layer {L} is outside this model's "
                                       f"0..{n_layers - 1}")
    return Entry(s.vector, stored, float(s.coef), layers, s.op, s.positions, float(s.value))


def cache_salt(entries: tuple[Entry, ...]) -> str | None:
    """A prefix-cache salt naming the steering exactly (vector file digests included): requests
    steered alike share cached KV, and never with differently steered or unsteered ones."""
    if not entries:
        return None
    key = [[e.stored.digest, e.coef, list(e.layers), e.op, e.positions, e.value]
           for e in entries]
    return "avec:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
