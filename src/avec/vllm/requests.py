"""A request's steering: read from ``SamplingParams.extra_args``, validated completely, resolved
against the vector store (each vector pinned by its file's sha256), merged with the server's
default steering, and turned into the prefix-cache salt that keeps steered and unsteered KV
apart.

Keys a request may set (over HTTP, flat ``vllm_xargs`` values):

* ``avec_steering``: a list of entries ``{vector, coef?, layers?, op?, positions?, value?,
  when?}`` (the schema of ``avec serve``), or one entry, as JSON text or as a list; ``when``
  makes an entry conditional (CAST, decided on the prompt; ``per_token`` is refused here);
* ``avec_default``: ``false`` / ``"off"`` switches the server's default steering off for this
  request (``true`` / ``"on"``, the default, keeps it; request entries apply after it).

Any other key starting with ``avec_`` is refused, and so is ``avec_resolved``: that key is what
the front end hands the workers (:func:`wire`), never something a client may send.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from avec.errors import AvecError, SteeringError
from avec.formats.jsonsafe import JSONInputError, loads
from avec.serve.limits import Limits
from avec.intervene.conditions import Condition, leaves, to_spec
from avec.intervene.conditions import parse as parse_condition
from avec.serve.schemas import SteeringSpec
from avec.vector import SteeringVector
from avec.vllm import DEFAULT_ENV, DEFAULT_KEY, EXTRA_ARGS_KEY, RESOLVED_KEY
from avec.vllm.store import StoredVector, VectorStore

_ENTRIES = TypeAdapter(list[SteeringSpec])
KNOWN_KEYS = (EXTRA_ARGS_KEY, DEFAULT_KEY)
MAX_DEFAULT_ENTRIES = 16


class SteeringRequestError(ValueError):
    """A request's steering is invalid; the message names the entry and field (a 400)."""


@dataclass(frozen=True)
class Entry:
    """One resolved steering entry: ``op`` at ``layers`` with the vector file ``name`` whose
    bytes hash to ``digest``. ``stored`` is the loaded vector where the front end has it."""

    name: str
    digest: str
    coef: float
    layers: tuple[int, ...]
    op: str
    positions: str | int
    value: float
    stored: StoredVector | None = field(default=None, compare=False, repr=False)
    # a conditional entry: the condition's JSON form (every field written out, canonical text)
    # and the digest of each condition vector file it names
    when: str | None = None
    when_digests: tuple[tuple[str, str], ...] = ()

    def wire(self) -> dict[str, Any]:
        out = {"vector": self.name, "digest": self.digest, "coef": self.coef,
               "layers": list(self.layers), "op": self.op, "positions": self.positions,
               "value": self.value}
        if self.when is not None:
            out["when"] = json.loads(self.when)
            out["when_digests"] = dict(self.when_digests)
        return out


class _WireEntry(BaseModel):
    """An entry as the front end hands it to the workers (checked again there)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    vector: str = Field(min_length=1, max_length=64)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    coef: float = Field(allow_inf_nan=False)
    layers: list[int] = Field(min_length=1, max_length=1024)
    op: str = Field(pattern=r"^(add|ablate|clamp)$")
    positions: int | str
    value: float = Field(allow_inf_nan=False)
    when: dict[str, Any] | None = None
    when_digests: dict[str, str] | None = Field(default=None, max_length=8)


_WIRE = TypeAdapter(list[_WireEntry])


def _decode(value: Any, key: str) -> Any:
    if isinstance(value, str):
        try:
            return loads(value, max_depth=8)
        except JSONInputError as exc:
            raise SteeringRequestError(f"{key}: not valid JSON ({exc})") from None
    return value


def raw_entries(extra_args: dict[str, Any] | None) -> Any:
    """The request's steering value (``None`` when it asks for none). A string is JSON (the
    OpenAI ``vllm_xargs`` values are flat, so a list arrives as a JSON string)."""
    if not extra_args or EXTRA_ARGS_KEY not in extra_args:
        return None
    return _decode(extra_args[EXTRA_ARGS_KEY], EXTRA_ARGS_KEY)


def wants_default(extra_args: dict[str, Any] | None) -> bool:
    """Whether the request keeps the server's default steering (``avec_default``)."""
    if not extra_args or DEFAULT_KEY not in extra_args:
        return True
    value = extra_args[DEFAULT_KEY]
    if value is True or value in ("on", "true"):
        return True
    if value is False or value in ("off", "false"):
        return False
    raise SteeringRequestError(f"{DEFAULT_KEY}={str(value)[:40]!r}: use false or \"off\" to "
                               f"switch the server's default steering off, true or \"on\" to "
                               f"keep it")


def check_keys(extra_args: dict[str, Any] | None) -> None:
    """Refuse ``avec_*`` keys avec does not know (a typo must not be silently ignored)."""
    for key in extra_args or {}:
        if isinstance(key, str) and key.startswith("avec_") and key not in KNOWN_KEYS:
            hint = (" (it is set by the server, not by clients)" if key == RESOLVED_KEY else "")
            raise SteeringRequestError(f"{key}: unknown avec key{hint}; use "
                                       f"{' or '.join(KNOWN_KEYS)}")


def parse(extra_args: dict[str, Any] | None, store: VectorStore, n_layers: int,
          limits: Limits | None = None, d_model: int | None = None) -> tuple[Entry, ...]:
    """The request's own entries, checked: schema (strict types, finite numbers, known fields),
    at most ``limits.max_steering`` entries, bounded ``coef``/``value``, a vector that exists,
    layers the vector has and the model has, and (given ``d_model``) the model's width."""
    check_keys(extra_args)
    raw = raw_entries(extra_args)
    if raw is None:
        return ()
    return parse_entries(raw, store, n_layers, limits, EXTRA_ARGS_KEY, d_model=d_model)


def parse_entries(raw: Any, store: VectorStore, n_layers: int, limits: Limits | None,
                  where: str, max_entries: int | None = None, d_model: int | None = None
                  ) -> tuple[Entry, ...]:
    """Entries from decoded JSON (a list of entries, or one); errors name ``where[i].field``."""
    limits = limits or Limits()
    if isinstance(raw, dict):
        raw = [raw]
    try:
        specs = _ENTRIES.validate_python(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = list(first["loc"])
        at = (f"[{loc[0]}]" if loc else "") + "".join(f".{x}" for x in loc[1:])
        raise SteeringRequestError(f"{where}{at}: "
                                   f"{first['msg'].removeprefix('Value error, ')}") from None
    cap = limits.max_steering if max_entries is None else max_entries
    if len(specs) > cap:
        raise SteeringRequestError(f"{where}: {len(specs)} entries; at most {cap}")
    return tuple(_resolve(f"{where}[{i}]", s, store, n_layers, limits, d_model)
                 for i, s in enumerate(specs))


def _resolve(where: str, spec: SteeringSpec, store: VectorStore, n_layers: int,
             limits: Limits, d_model: int | None) -> Entry:
    try:
        stored = store.get(spec.vector)
    except (AvecError, OSError, ValueError) as exc:
        raise SteeringRequestError(f"{where}.vector: {spec.vector!r} is not usable ({exc})"
                                   ) from None
    if stored is None:
        known = ", ".join(store.names()) or "none"
        raise SteeringRequestError(f"{where}.vector: no vector named {spec.vector!r} (known: "
                                   f"{known})")
    try:
        s = spec.setting(stored.vector)
    except ValueError as exc:
        raise SteeringRequestError(f"{where}.{exc}") from None
    bad = limits.out_of_bounds(s.coef, s.value)
    if bad is not None:
        raise SteeringRequestError(f"{where}.{bad[0]}: {bad[1]}")
    if d_model is not None and stored.vector.width != d_model:
        raise SteeringRequestError(f"{where}.vector: {spec.vector!r} has width "
                                   f"{stored.vector.width}; this model's is {d_model}")
    when, digests = None, ()
    if spec.per_token:
        raise SteeringRequestError(f"{where}.per_token: the vLLM backend decides a condition "
                                   f"once, on the prompt; re-checking on generated tokens "
                                   f"needs --backend hf")
    if spec.when is not None:
        when, digests = _condition(f"{where}.when", spec.when, store, n_layers, d_model)
    have = sorted(stored.vector.directions)
    layers = s.layers if s.layers is not None else tuple(have)
    for L in layers:
        if L not in stored.vector.directions:
            raise SteeringRequestError(f"{where}.layers: vector {spec.vector!r} has no layer "
                                       f"{L} (it has {have})")
        if not 0 <= L < n_layers:
            raise SteeringRequestError(f"{where}.layers: layer {L} is outside this model's "
                                       f"0..{n_layers - 1}")
    return Entry(spec.vector, stored.digest, s.coef, layers, s.op,
                 "generated" if when is not None else s.positions, s.value, stored,
                 when, digests)


def _condition(where: str, spec: Any, store: VectorStore, n_layers: int, d_model: int | None
               ) -> tuple[str, tuple[tuple[str, str], ...]]:
    """A condition checked against the store: its canonical JSON (every field written out, so
    the workers need no file metadata) and the digests of the files it names."""
    digests: dict[str, str] = {}

    def resolve(name: str) -> SteeringVector:
        try:
            found = store.get(name)
        except (AvecError, OSError, ValueError) as exc:
            raise SteeringRequestError(f"condition vector {name!r} is not usable ({exc})"
                                       ) from None
        if found is None:
            known = ", ".join(store.names()) or "none"
            raise SteeringRequestError(f"no condition vector named {name!r} (known: {known})")
        digests[name] = found.digest
        return found.vector

    try:
        cond = parse_condition(spec, resolve, where=where, n_layers=n_layers, d_model=d_model)
    except SteeringError as exc:
        raise SteeringRequestError(str(exc)) from None
    return (json.dumps(to_spec(cond), sort_keys=True, separators=(",", ":")),
            tuple(sorted(digests.items())))


def condition_of(entry: Entry, load: Any, n_layers: int, d_model: int) -> Condition | None:
    """A wire entry's condition, parsed again in the worker; ``load(name, digest)`` gives the
    condition vector whose file has that digest (raising when it is gone or changed)."""
    if entry.when is None:
        return None
    digests = dict(entry.when_digests)

    def resolve(name: str) -> SteeringVector:
        if name not in digests:
            raise SteeringRequestError(f"condition vector {name!r} has no digest")
        return load(name, digests[name])

    try:
        cond = parse_condition(json.loads(entry.when), resolve, where=f"{RESOLVED_KEY}.when",
                               n_layers=n_layers, d_model=d_model)
    except SteeringError as exc:
        raise SteeringRequestError(str(exc)) from None
    if {leaf.name for leaf in leaves(cond)} != set(digests):
        raise SteeringRequestError(f"{RESOLVED_KEY}.when_digests: not the condition's vectors")
    return cond


def default_entries(store: VectorStore, n_layers: int, limits: Limits | None = None,
                    text: str | None = None, d_model: int | None = None) -> tuple[Entry, ...]:
    """The server's default steering from ``$AVEC_VLLM_DEFAULT`` (JSON entries; ``text``
    overrides the variable), checked like a request's; none when unset. Raises
    :class:`SteeringRequestError` naming the variable for a bad value."""
    text = os.environ.get(DEFAULT_ENV) if text is None else text
    if not text or not text.strip():
        return ()
    raw = _decode(text, f"${DEFAULT_ENV}")
    return parse_entries(raw, store, n_layers, limits, f"${DEFAULT_ENV}",
                         max_entries=MAX_DEFAULT_ENTRIES, d_model=d_model)


def effective(extra_args: dict[str, Any] | None, store: VectorStore, n_layers: int,
              default: tuple[Entry, ...] = (), limits: Limits | None = None,
              d_model: int | None = None) -> tuple[Entry, ...]:
    """What a request is steered with: the server's default (unless it switched it off), then
    its own entries."""
    own = parse(extra_args, store, n_layers, limits, d_model)
    return (default if wants_default(extra_args) else ()) + own


def wire(entries: tuple[Entry, ...]) -> str:
    """The resolved entries as the workers read them (``extra_args["avec_resolved"]``)."""
    return json.dumps([e.wire() for e in entries], separators=(",", ":"))


def from_wire(extra_args: dict[str, Any] | None, n_layers: int) -> tuple[Entry, ...]:
    """The resolved entries the front end set (checked again: the worker trusts no input);
    entries carry no loaded vector (the worker's slot bank finds it by digest)."""
    if not extra_args or RESOLVED_KEY not in extra_args:
        return ()
    raw = _decode(extra_args[RESOLVED_KEY], RESOLVED_KEY)
    try:
        items = _WIRE.validate_python(raw)
    except ValidationError as exc:
        raise SteeringRequestError(f"{RESOLVED_KEY}: {exc.errors()[0]['msg']}") from None
    out = []
    for i, w in enumerate(items):
        if any(not 0 <= L < n_layers for L in w.layers):
            raise SteeringRequestError(f"{RESOLVED_KEY}[{i}].layers: outside 0..{n_layers - 1}")
        positions = w.positions
        if not (positions in ("all", "prompt", "generated")
                or (type(positions) is int and 0 <= positions < 2**31)):
            raise SteeringRequestError(f"{RESOLVED_KEY}[{i}].positions: {positions!r}")
        when = None if w.when is None else json.dumps(w.when, sort_keys=True,
                                                       separators=(",", ":"))
        if (w.when is None) != (w.when_digests is None) or (when and positions != "generated"):
            raise SteeringRequestError(f"{RESOLVED_KEY}[{i}].when: a condition comes with its "
                                       f"digests and steers generated positions")
        if any(not isinstance(d, str) or len(d) != 64 for d in (w.when_digests or {}).values()):
            raise SteeringRequestError(f"{RESOLVED_KEY}[{i}].when_digests: sha256 hex digests")
        out.append(Entry(w.vector, w.digest, w.coef, tuple(w.layers), w.op, positions, w.value,
                         None, when, tuple(sorted((w.when_digests or {}).items()))))
    return tuple(out)


def cache_salt(entries: tuple[Entry, ...]) -> str | None:
    """A prefix-cache salt naming the steering exactly (vector file digests included): requests
    steered alike share cached KV, and never with differently steered or unsteered ones."""
    if not entries:
        return None
    if any(e.when is not None for e in entries):
        # a condition is decided on the prompt's hidden states, which a prefix-cache hit would
        # skip: a conditional request never shares cached KV (not even its own prompt's)
        return "avec:conditional:" + secrets.token_hex(16)
    key = [[e.digest, e.coef, list(e.layers), e.op, e.positions, e.value] for e in entries]
    return "avec:" + hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
