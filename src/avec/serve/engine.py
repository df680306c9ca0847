"""The generation engine: one worker thread owns the model and batches concurrent requests.

Requests that arrive within ``batch_window_s`` of each other (up to ``max_batch``) run as one
left-padded batch (greedy, or sampled per row with its own seeded generator). Each distinct
steering entry (vector, layers, op, positions, value) becomes one
:class:`~avec.intervene.steer.Intervention` whose per-row coefficient is the row's own
coefficient, or 0 on rows that do not use it; a zero coefficient leaves a row bit-identical, so no request sees
another's steering. Rows whose entries would need a conflicting order of interventions go to a
separate batch.

One request never hurts another:

- Values that could poison shared arithmetic never enter a batch: :meth:`Engine.resolve`
  bounds ``|coef|`` and ``|value|`` (:class:`Limits`) and checks that they are finite in the
  model's dtype, and the registry only holds vectors that are finite in it.
- A row ends alone (:class:`~avec.serve.rows.RowTracker`): at its own ``max_tokens`` or stop
  string (its future resolves then, not at the end of the batch), when its client goes away
  (:meth:`~avec.serve.rows.Generation.stop`), at its deadline, or when its logits become
  non-finite (a 400 for that request only); the other rows' tokens are unchanged.
- If generating a batch raises, the batch is split in halves and each half retried, down to the
  single row that fails: only that request gets the error (400 for a steering error, 500 for
  anything else, logged with its traceback); sampled rows redraw from their seed and streamed
  tokens are not sent twice. The worker never dies.
- The queue is bounded (``max_queue``; :meth:`Engine.submit` raises a 429
  :class:`~avec.serve.errors.ServeError` with ``retry_after`` when full) and a request still
  queued at its deadline is answered 504 without running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

import torch

from avec.errors import SteeringError
from avec.generation.hf import generate_ids
from avec.intervene.conditions import Condition, to_spec
from avec.intervene.conditions import parse as parse_condition
from avec.models.model import Model, eos_token_ids
from avec.serve.errors import ServeError, safe_text
from avec.serve.limits import Limits
from avec.serve.registry import VectorRegistry, working_dtype
from avec.serve.rows import Generation, GenerationResult, Job, RowTracker
from avec.serve.schemas import SteeringSpec
from avec.intervene.steer import Intervention, steer
from avec.vector import SteeringVector

if TYPE_CHECKING:
    from avec.generation.llamacpp import ControlTerm

__all__ = ["Engine", "Generation", "GenerationResult", "Limits", "LlamaCppEngine",
           "ResolvedSteering"]

log = logging.getLogger("avec.serve")


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
    when: Condition | None = None
    per_token: bool = False
    # the registry vectors the condition's leaves were read from, by name
    condition_vectors: tuple[tuple[str, SteeringVector], ...] = ()

    @property
    def key(self) -> Hashable:
        cond = json.dumps(to_spec(self.when), sort_keys=True) if self.when is not None else None
        return (self.name, id(self.vector), self.layers, self.op, self.positions, self.value,
                cond, self.per_token, tuple(id(v) for _, v in self.condition_vectors))


def _fits(x: float, dtype: torch.dtype) -> bool:
    """``x`` is finite once converted to ``dtype``."""
    return bool(torch.isfinite(torch.tensor(x, dtype=torch.float64).to(dtype)))


def check_request(prompt_ids: Sequence[int], max_tokens: int, temperature: float,
                  limits: Limits) -> None:
    """The checks every engine makes on a request before queueing it."""
    if not prompt_ids:
        raise SteeringError("the prompt is empty")
    if len(prompt_ids) > limits.max_prompt_tokens:
        raise SteeringError(f"the prompt has {len(prompt_ids)} tokens; the limit is "
                            f"{limits.max_prompt_tokens}")
    if not 1 <= max_tokens <= limits.max_tokens:
        raise SteeringError(f"max_tokens={max_tokens}; it must be between 1 and "
                            f"{limits.max_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise SteeringError(f"temperature={temperature}; it must be >= 0")


def resolve_entries(specs: Sequence[SteeringSpec], registry: VectorRegistry, limits: Limits,
                    dtype: torch.dtype, *, label: str = "steering") -> list[ResolvedSteering]:
    """Bind steering entries to the registry's vectors, checked against the limits: at most
    ``max_steering`` entries, ``|coef|`` and ``|value|`` bounded and finite in ``dtype``,
    integer positions inside the longest context, layers the vector has. Raises
    :class:`SteeringError` naming ``label[i]`` (or the registry's error for an unknown name).
    Every engine runs these checks; each adds what its backend needs."""
    if len(specs) > limits.max_steering:
        raise SteeringError(f"{len(specs)} {label} entries; at most {limits.max_steering} "
                            f"are allowed per request")
    context = limits.max_prompt_tokens + limits.max_tokens
    out: list[ResolvedSteering] = []
    for i, spec in enumerate(specs):
        where = f"{label}[{i}]"
        vec = registry.get(spec.vector)
        try:
            s = spec.setting(vec)
        except ValueError as exc:
            raise SteeringError(f"{where}.{exc}") from None
        bad = limits.out_of_bounds(s.coef, s.value)
        if bad is not None:
            raise SteeringError(f"{where}: {bad[1]}")
        for what, x in (("coef", s.coef), ("value", s.value)):
            if not _fits(x, dtype):
                raise SteeringError(f"{where}: {what}={x:g} is not finite in the model's "
                                    f"dtype {dtype}")
        if isinstance(s.positions, int) and s.positions >= context:
            raise SteeringError(f"{where}: positions={s.positions} is past the longest "
                                f"context this server runs ({context} tokens), so it would "
                                f"never apply")
        layers = s.layers if s.layers is not None else tuple(vec.layers)
        missing = [L for L in layers if L not in vec.directions]
        if missing:
            raise SteeringError(f"{where}: layer(s) {missing} not in vector {spec.vector!r}, "
                                f"which has layers {vec.layers}")
        when = None
        used: dict[str, SteeringVector] = {}
        if spec.when is not None:
            def condition_vector(name: str) -> SteeringVector:
                used[name] = registry.get(name)  # an unknown name: a 400 naming the field
                return used[name]

            model = registry.model
            when = parse_condition(spec.when, condition_vector, where=f"{where}.when",
                                   n_layers=model.n_layers, d_model=model.d_model)
        out.append(ResolvedSteering(spec.vector, vec, s.coef, layers, s.op,
                                    "generated" if when is not None else s.positions,
                                    s.value, when, spec.per_token,
                                    tuple(sorted(used.items(), key=lambda kv: kv[0]))))
    return out


class Engine:
    """Owns ``model`` in a single worker thread; :meth:`submit` is safe from any thread.

    ``stats`` counts requests that ended early by cause (``cancelled``, ``timed_out``,
    ``non_finite``, ``failed``, ``refused``) and batch ``retries``; ``batches_run`` counts
    generation passes started (retries included)."""

    def __init__(self, model: Model, registry: VectorRegistry, limits: Limits | None = None
                 ) -> None:
        self.model = model
        self.registry = registry
        self.limits = limits or Limits()
        self.default: list[ResolvedSteering] = []
        registry.set_caps(max_file_bytes=self.limits.max_vector_bytes,
                          max_vectors=self.limits.max_vectors,
                          max_total_bytes=self.limits.max_store_bytes)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=self.limits.max_queue)
        self._closed = False
        self.batches_run = 0
        self.stats: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._worker, name="avec-engine", daemon=True)
        self._thread.start()

    # ---- validation ------------------------------------------------------------------------
    def set_default(self, specs: Sequence[SteeringSpec]) -> None:
        """The server's default steering: resolved now (an error names ``default_steering[i]``),
        applied before every request's own entries unless the request switches it off."""
        self.default = self._check(resolve_entries(specs, self.registry, self.limits,
                                                   working_dtype(self.model),
                                                   label="default_steering"),
                                   "default_steering")

    def resolve(self, specs: Sequence[SteeringSpec], use_default: bool = True
                ) -> list[ResolvedSteering]:
        """Check steering entries against the registry and the limits; raise
        :class:`SteeringError` (or the registry's error for an unknown name) saying what is
        wrong. With ``use_default`` the server's default entries come first."""
        own = resolve_entries(specs, self.registry, self.limits, working_dtype(self.model))
        return self._check(own, "steering", list(self.default) if use_default else [])

    def _check(self, entries: list[ResolvedSteering], label: str,
               before: Sequence[ResolvedSteering] = ()) -> list[ResolvedSteering]:
        """The checks ``steer()`` makes, now, so a bad entry never reaches a batch; and no
        entry may repeat another (the batch gives each distinct entry one coefficient per
        row)."""
        out = list(before)
        for i, entry in enumerate(entries):
            where = f"{label}[{i}]"
            try:
                iv = Intervention(entry.vector, coef=entry.coef, layers=list(entry.layers),
                                  op=entry.op, positions=entry.positions,  # type: ignore
                                  value=entry.value, when=entry.when,
                                  per_token=entry.per_token)
                for L in entry.layers:
                    iv.check_layer(L)
            except SteeringError as exc:
                raise SteeringError(f"{where} (vector {entry.name!r}): {exc}") from None
            twin = next((j for j, o in enumerate(out) if o.key == entry.key), None)
            if twin is not None:
                other = (f"default_steering[{twin}]" if twin < len(before)
                         else f"{label}[{twin - len(before)}]")
                raise SteeringError(f"{where} repeats {other} (same vector, layers, op, "
                                    f"positions); give one entry with the summed coef"
                                    + (" (switch the default off with default_steering: "
                                       "false)" if twin < len(before) else ""))
            out.append(entry)
        return out

    # ---- API -------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Raise the 429 :class:`ServeError` :meth:`submit` would raise if the queue is full
        now (a cheap early refusal, before tokenizing)."""
        if self._closed:
            raise ServeError(503, "the server is shutting down", retry_after=5)
        if self._queue.full():
            self.stats["refused"] += 1
            raise self._busy()

    def _busy(self) -> ServeError:
        return ServeError(**self.limits.busy_error_args())

    def submit(self, prompt_ids: list[int], steering: Sequence[SteeringSpec],
               max_tokens: int, on_token: Callable[[int], None] | None = None,
               temperature: float = 0.0, seed: int | None = None,
               stop: Sequence[str] = (), use_default: bool = True) -> Generation:
        """Queue one generation (greedy unless ``temperature`` > 0); the returned
        :class:`Generation` future resolves to a :class:`GenerationResult`, or fails with a
        :class:`ServeError` if this request fails (deadline, non-finite output, ...); its
        ``stop()`` ends the request's work.

        ``on_token(token_id)`` is called from the worker thread with each new token of this
        request as soon as it is generated (not the end-of-sequence token, nothing past
        ``max_tokens``): it must be quick. ``temperature`` > 0 samples this request's row with
        a generator of its own, seeded with ``seed`` (random if None), so the same seed gives
        the same text whatever else shares the batch. ``stop`` strings end the row as soon as
        its text contains one (the caller cuts the text there). ``use_default=False`` drops the
        server's default steering (:meth:`set_default`) for this request.

        Validation errors (unknown vector, layer not in the vector, limits) raise here, before
        anything is queued; a full queue raises a 429 :class:`ServeError`.
        """
        if self._closed:
            raise ServeError(503, "the server is shutting down", retry_after=5)
        check_request(prompt_ids, max_tokens, temperature, self.limits)
        resolved = self.resolve(steering, use_default)
        job = Job(list(prompt_ids), resolved, int(max_tokens),
                  deadline=time.monotonic() + self.limits.request_timeout_s,
                  on_token=on_token, temperature=float(temperature),
                  seed=secrets.randbits(63) if seed is None else int(seed), stop=tuple(stop))
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.stats["refused"] += 1
            raise self._busy() from None
        return job.future

    def shutdown(self, timeout: float | None = 5.0) -> None:
        """Stop the worker after the requests already queued."""
        self._closed = True
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)

    # ---- worker ----------------------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            if not self._admit(first):
                continue
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
                if self._admit(item):
                    batch.append(item)
            for order, group in _split_by_order(batch):
                try:
                    self._run(order, group)
                except Exception as exc:  # a bug outside generation: fail the group, not the worker
                    for job in group:
                        self._fail_with(job, exc)
            if stop:
                return

    def _admit(self, job: Job) -> bool:
        """Start ``job`` unless it was stopped while queued or its deadline has passed."""
        if not job.future.set_running_or_notify_cancel():
            self.stats["cancelled"] += 1
            return False
        if time.monotonic() > job.deadline:
            self._fail(job, ServeError(504, f"the request waited in the queue past its "
                                            f"deadline ({self.limits.request_timeout_s:g} s); "
                                            f"retry later"), "timed_out")
            return False
        return True

    def _fail(self, job: Job, error: ServeError, counter: str) -> None:
        if not job.future.done():
            job.future.set_exception(error)
            self.stats[counter] += 1

    def _fail_with(self, job: Job, exc: Exception) -> None:
        """Fail ``job`` alone with ``exc``: its own fault (a 400) or a server bug (a 500, logged
        with the traceback)."""
        if isinstance(exc, ServeError):
            self._fail(job, exc, "failed")
        elif isinstance(exc, SteeringError):
            self._fail(job, ServeError(400, f"steering failed: {safe_text(str(exc))}",
                                       param="steering"), "failed")
        else:
            ref = secrets.token_hex(4)
            log.error("generation failed (ref %s)", ref, exc_info=exc)
            detail = safe_text(f"{type(exc).__name__}: {exc}")[:300]
            self._fail(job, ServeError(500, f"generation failed: {detail} (a server error, "
                                            f"logged as ref {ref})"), "failed")

    def _eos_ids(self) -> set[int]:
        return eos_token_ids(self.model)

    def _tracker(self, jobs: Sequence[Job]) -> RowTracker:
        return RowTracker(jobs, self.model.tokenizer, self._eos_ids(), self._fail,
                          self.limits.request_timeout_s)

    def _run(self, order: list[Hashable], batch: list[Job]) -> None:
        """Generate ``batch`` (its steering entries applied in ``order``); if that raises, retry
        each half of it, so only the row that fails alone gets the error."""
        live = [job for job in batch if not job.future.done()]
        if not live:
            return
        try:
            self._generate(order, live)
        except Exception as exc:
            if len(live) == 1:
                self._fail_with(live[0], exc)
                return
            self.stats["retries"] += 1
            half = len(live) // 2
            for part in (live[:half], live[half:]):
                keys = {s.key for job in part for s in job.steering}
                self._run([k for k in order if k in keys], part)

    def _generate(self, order: list[Hashable], batch: list[Job]) -> None:
        entries = {s.key: s for job in batch for s in job.steering}
        ivs = []
        for key in order:
            entry = entries[key]
            coef = torch.zeros(len(batch))
            for j, job in enumerate(batch):
                for s in job.steering:
                    if s.key == key:
                        coef[j] = s.coef
            ivs.append(Intervention(entry.vector, coef=coef, layers=list(entry.layers),
                                    positions=entry.positions, op=entry.op,  # type: ignore
                                    value=entry.value, when=entry.when,
                                    per_token=entry.per_token))
        rows = self._tracker(batch)
        sampling = [job.sampling() for job in batch]
        self.batches_run += 1
        with steer(self.model, ivs) if ivs else contextlib.nullcontext():
            generate_ids(self.model, [job.prompt_ids for job in batch],
                         max(job.max_tokens for job in batch), on_step=rows.on_step,
                         row_sampling=sampling if any(s is not None for s in sampling)
                         else None, row_stop=rows.row_stop)
        rows.finish_all()


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


def _split_by_order(batch: list[Job]) -> list[tuple[list[Hashable], list[Job]]]:
    """Group requests so each group's interventions can be applied in one order that respects
    every row's order (almost always a single group); returns ``(order, members)`` pairs."""
    groups: list[tuple[list[Hashable], list[Job]]] = []
    for job in batch:
        keys = [s.key for s in job.steering]
        for order, members in groups:
            if _insert_row(order, keys):
                members.append(job)
                break
        else:
            groups.append((list(keys), [job]))  # resolve() refused repeated entries
    return groups


class _Ended(Exception):
    """Raised from the token listener to end a llama.cpp generation early."""


class LlamaCppEngine(Engine):
    """The engine on the llama.cpp backend (:class:`~avec.generation.llamacpp.LlamaCppModel`).

    llama.cpp holds one control vector per context, so requests run one at a time, each with
    its own control vector installed (isolation by construction); only ``op: add`` entries on
    layers >= 1 are accepted, and anything else is refused at submit time with a 400. A
    conditional entry (``when``) is decided on the prompt, read in a second llama.cpp context
    (:mod:`avec.generation.llamacpp_states`), before the request's control vector is set. The same
    limits hold: the bounded queue, deadlines, stop strings and client disconnects end a
    request between two tokens.
    """

    def _check(self, entries: list[ResolvedSteering], label: str,
               before: Sequence[ResolvedSteering] = ()) -> list[ResolvedSteering]:
        out = super()._check(entries, label, before)
        for i, entry in enumerate(entries):
            if entry.per_token:
                raise SteeringError(f"{label}[{i}].per_token: the llama.cpp backend decides a "
                                    f"condition once, on the prompt; re-checking on generated "
                                    f"tokens needs --backend hf")
        self.model.check(_control_terms(out))  # type: ignore[attr-defined]
        return out

    def _eos_ids(self) -> set[int]:
        return set(self.model.eos_ids)  # type: ignore[attr-defined]

    def _run(self, order: list[Hashable], batch: list[Job]) -> None:
        for job in batch:
            if job.future.done():
                continue
            rows = self._tracker([job])
            every = torch.ones(1, dtype=torch.bool)

            def on_token(tok: int, rows: RowTracker = rows, every: torch.Tensor = every) -> None:
                rows.on_step(torch.tensor([tok]))
                if bool(rows.row_stop(every)[0]):
                    raise _Ended

            self.batches_run += 1
            try:
                self.model.generate(  # type: ignore[attr-defined]
                    job.prompt_ids, job.max_tokens, _control_terms(job.steering),
                    sampling=job.sampling(), on_token=on_token)
            except _Ended:
                pass
            except Exception as exc:  # fail this request, keep the worker alive
                self._fail_with(job, exc)
                continue
            rows.finish_all()


def _control_terms(steering: Sequence[ResolvedSteering]) -> list[ControlTerm]:
    from avec.generation.llamacpp import ControlTerm

    return [ControlTerm(s.vector, s.coef, s.layers, s.positions, s.op, s.when) for s in steering]
