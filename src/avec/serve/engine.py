"""The generation engine: one worker thread owns the model and batches concurrent requests.

Requests that arrive within ``batch_window_s`` of each other (up to ``max_batch``) run as one
left-padded batch (greedy, or sampled per row with its own seeded generator). Each distinct
steering entry (vector, layers, op, positions, value) becomes one
:class:`~avec.steer.Intervention` whose per-row coefficient is the row's own coefficient, or 0
on rows that do not use it; a zero coefficient leaves a row bit-identical,
so no request sees another's steering. The batch runs to the largest ``max_tokens`` among its
rows and each row is cut at its own. Rows whose entries would need a conflicting order of
interventions go to a separate batch. An error fails that batch's futures, never the worker.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch

from avec.errors import SteeringError
from avec.generation import RowSampling, generate_ids
from avec.models.model import Model, eos_token_ids
from avec.serve.registry import VectorRegistry
from avec.serve.schemas import SteeringSpec
from avec.steer import Intervention, steer
from avec.vector import SteeringVector

if TYPE_CHECKING:
    from avec.backends.llamacpp import ControlTerm


@dataclass
class Limits:
    """Per-request limits of the server (every one is checked before generation starts)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_vector_bytes: int = 16 * 1024 * 1024
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_prompt_tokens: int = 4096
    max_steering: int = 8
    max_abs_coef: float = 1000.0
    request_timeout_s: float = 300.0
    max_batch: int = 16
    batch_window_s: float = 0.005


@dataclass(frozen=True)
class ResolvedSteering:
    """A validated steering entry bound to the vector object it names."""

    name: str
    vector: SteeringVector
    coef: float
    layers: tuple[int, ...]
    op: str
    positions: int | str
    value: float

    @property
    def key(self) -> Hashable:
        return (self.name, id(self.vector), self.layers, self.op, self.positions, self.value)


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (hit max_tokens)


@dataclass
class _Request:
    prompt_ids: list[int]
    steering: list[ResolvedSteering]
    max_tokens: int
    on_token: Callable[[int], None] | None = None
    sampling: RowSampling | None = None
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class Engine:
    """Owns ``model`` in a single worker thread; :meth:`submit` is safe from any thread."""

    def __init__(self, model: Model, registry: VectorRegistry, limits: Limits | None = None
                 ) -> None:
        self.model = model
        self.registry = registry
        self.limits = limits or Limits()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = False
        self.batches_run = 0  # number of generate_ids calls, for tests and monitoring
        self._thread = threading.Thread(target=self._worker, name="avec-engine", daemon=True)
        self._thread.start()

    # ---- validation ------------------------------------------------------------------------
    def resolve(self, specs: Sequence[SteeringSpec]) -> list[ResolvedSteering]:
        """Check steering entries against the registry and the limits; raise
        :class:`SteeringError` (or the registry's error for an unknown name) saying what is
        wrong."""
        if len(specs) > self.limits.max_steering:
            raise SteeringError(f"{len(specs)} steering entries; at most "
                                f"{self.limits.max_steering} are allowed per request")
        out = []
        for i, spec in enumerate(specs):
            where = f"steering[{i}]"
            if abs(spec.coef) > self.limits.max_abs_coef:
                raise SteeringError(f"{where}: |coef| {abs(spec.coef)} exceeds the limit "
                                    f"{self.limits.max_abs_coef}")
            vec = self.registry.get(spec.vector)
            layers = tuple(spec.layers) if spec.layers is not None else tuple(vec.layers)
            missing = [L for L in layers if L not in vec.directions]
            if missing:
                raise SteeringError(f"{where}: layer(s) {missing} not in vector {spec.vector!r}, "
                                    f"which has layers {vec.layers}")
            try:  # the checks steer() makes, now, so a bad entry never reaches a batch
                iv = Intervention(vec, coef=spec.coef, layers=list(layers), op=spec.op,
                                  positions=spec.positions, value=spec.value)  # type: ignore
                for L in layers:
                    iv.check_layer(L)
            except SteeringError as exc:
                raise SteeringError(f"{where} (vector {spec.vector!r}): {exc}") from None
            entry = ResolvedSteering(spec.vector, vec, float(spec.coef), layers, spec.op,
                                     spec.positions, float(spec.value))
            twin = next((j for j, o in enumerate(out) if o.key == entry.key), None)
            if twin is not None:
                raise SteeringError(f"{where} repeats steering[{twin}] (same vector, layers, op, "
                                    f"positions); give one entry with the summed coef")
            out.append(entry)
        return out

    # ---- API -------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], steering: Sequence[SteeringSpec],
               max_tokens: int, on_token: Callable[[int], None] | None = None,
               temperature: float = 0.0, seed: int | None = None
               ) -> concurrent.futures.Future:
        """Queue one generation (greedy unless ``temperature`` > 0); the future resolves to a
        :class:`GenerationResult`.

        ``on_token(token_id)`` is called from the worker thread with each new token of this
        request as soon as it is generated (not the end-of-sequence token, nothing past
        ``max_tokens``): it must be quick and must not raise. ``temperature`` > 0 samples
        this request's row with a generator of its own, seeded with ``seed`` (random if None),
        so the same seed gives the same text whatever else shares the batch.

        Validation errors (unknown vector, layer not in the vector, limits) raise here, before
        anything is queued.
        """
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if not prompt_ids:
            raise SteeringError("the prompt is empty")
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise SteeringError(f"the prompt has {len(prompt_ids)} tokens; the limit is "
                                f"{self.limits.max_prompt_tokens}")
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise SteeringError(f"max_tokens={max_tokens}; it must be between 1 and "
                                f"{self.limits.max_tokens}")
        resolved = self.resolve(steering)
        sampling = None
        if temperature > 0:
            gen = torch.Generator()
            if seed is None:
                gen.seed()
            else:
                gen.manual_seed(int(seed))
            sampling = RowSampling(float(temperature), gen)
        req = _Request(list(prompt_ids), resolved, int(max_tokens), on_token, sampling)
        self._queue.put(req)
        return req.future

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the worker after the requests already queued."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)

    # ---- worker ----------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.limits.batch_window_s
            stop = False
            while len(batch) < self.limits.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            for order, group in _split_by_order(live):
                self._run(order, group)
            if stop:
                return

    def _run(self, order: list[Hashable], batch: list[_Request]) -> None:
        """Generate ``batch`` in one pass, its steering entries applied in ``order``."""
        try:
            entries = {s.key: s for req in batch for s in req.steering}
            ivs = []
            for key in order:
                entry = entries[key]
                coef = torch.zeros(len(batch))
                for j, req in enumerate(batch):
                    for s in req.steering:
                        if s.key == key:
                            coef[j] = s.coef
                ivs.append(Intervention(entry.vector, coef=coef, layers=list(entry.layers),
                                        positions=entry.positions, op=entry.op,  # type: ignore
                                        value=entry.value))
            longest = max(r.max_tokens for r in batch)
            with steer(self.model, ivs) if ivs else contextlib.nullcontext():
                sampling = [r.sampling for r in batch]
                rows = generate_ids(self.model, [r.prompt_ids for r in batch], longest,
                                    on_step=_streamer(self.model, batch),
                                    row_sampling=sampling if any(sampling) else None)
            self.batches_run += 1
            for req, row in zip(batch, rows):
                tokens = row[:req.max_tokens]
                reason = "length" if len(tokens) >= req.max_tokens else "stop"
                req.future.set_result(GenerationResult(tokens, len(req.prompt_ids), reason))
        except Exception as exc:  # fail this batch, keep the worker alive
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(
                        RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))


def _streamer(model: Model, batch: Sequence[_Request]) -> Callable[[torch.Tensor], None] | None:
    """The per-step callback that hands each row's new token to its request's ``on_token``,
    up to its own ``max_tokens`` and not past its end-of-sequence token."""
    if not any(r.on_token for r in batch):
        return None
    eos_ids = eos_token_ids(model)
    sent = [0] * len(batch)
    done = [False] * len(batch)

    def on_step(tokens: torch.Tensor) -> None:
        for j, tok in enumerate(tokens.tolist()):
            req = batch[j]
            if done[j] or req.on_token is None:
                continue
            if tok in eos_ids or sent[j] >= req.max_tokens:
                done[j] = True
                continue
            sent[j] += 1
            try:
                req.on_token(tok)
            except Exception:  # a broken listener must not fail the other rows of the batch
                done[j] = True

    return on_step


def _insert_row(order: list[Hashable], row: list[Hashable]) -> bool:
    """Merge ``row``'s keys into ``order`` in place, keeping both orders; False on conflict
    (``order`` is then unchanged)."""
    if len(set(row)) != len(row):
        return False
    trial = list(order)
    last = -1
    for key in row:
        if key in trial:
            idx = trial.index(key)
            if idx <= last:
                return False
            last = idx
        else:
            trial.insert(last + 1, key)
            last += 1
    order[:] = trial
    return True


def _split_by_order(batch: list[_Request]) -> list[tuple[list[Hashable], list[_Request]]]:
    """Group requests so each group's interventions can be applied in one order that respects
    every row's order (almost always a single group); returns ``(order, members)`` pairs."""
    groups: list[tuple[list[Hashable], list[_Request]]] = []
    for req in batch:
        keys = [s.key for s in req.steering]
        for order, members in groups:
            if _insert_row(order, keys):
                members.append(req)
                break
        else:
            groups.append((list(keys), [req]))  # resolve() refused repeated entries
    return groups


class LlamaCppEngine(Engine):
    """The engine on the llama.cpp backend (:class:`~avec.backends.llamacpp.LlamaCppModel`).

    llama.cpp holds one control vector per context, so requests run one at a time, each with
    its own control vector installed (isolation by construction); only ``op: add`` entries on
    layers >= 1 are accepted, and anything else is refused at submit time with a 400.
    """

    def resolve(self, specs: Sequence[SteeringSpec]) -> list[ResolvedSteering]:
        resolved = super().resolve(specs)
        self.model.check(_control_terms(resolved))  # type: ignore[attr-defined]
        return resolved

    def _run(self, order: list[Hashable], batch: list[_Request]) -> None:
        for req in batch:
            try:
                tokens = self.model.generate(  # type: ignore[attr-defined]
                    req.prompt_ids, req.max_tokens, _control_terms(req.steering),
                    sampling=req.sampling, on_token=_safe(req.on_token))
                self.batches_run += 1
                reason = "length" if len(tokens) >= req.max_tokens else "stop"
                req.future.set_result(GenerationResult(tokens, len(req.prompt_ids), reason))
            except Exception as exc:  # fail this request, keep the worker alive
                if not req.future.done():
                    req.future.set_exception(
                        RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))


def _control_terms(steering: Sequence[ResolvedSteering]) -> list[ControlTerm]:
    from avec.backends.llamacpp import ControlTerm

    return [ControlTerm(s.vector, s.coef, s.layers, s.positions, s.op) for s in steering]


def _safe(listener: Callable[[int], None] | None) -> Callable[[int], None] | None:
    """``listener`` that stops being called after it raises once (a broken stream must not
    fail the generation)."""
    if listener is None:
        return None
    broken = False

    def call(tok: int) -> None:
        nonlocal broken
        if broken:
            return
        try:
            listener(tok)
        except Exception:
            broken = True

    return call
