"""One request inside the engine (:class:`Job`) and the row-by-row bookkeeping of one
generation attempt (:class:`RowTracker`): streaming each row's tokens to its request, its stop
strings, and which rows end now, so a cancelled, late or failed row stops alone."""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from avec.generation.hf import RowSampling
from avec.serve.errors import ServeError

if TYPE_CHECKING:
    from avec.serve.engine import ResolvedSteering


@dataclass
class GenerationResult:
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length" (max_tokens)


class Generation(concurrent.futures.Future):
    """The future of one submitted request; resolves to a :class:`GenerationResult` or fails
    with a :class:`~avec.serve.errors.ServeError`. :meth:`stop` ends its work: a queued request
    never starts, a running one ends at the next decoding step."""

    def __init__(self) -> None:
        super().__init__()
        self.stopped = False

    def stop(self) -> None:
        """Give up on this request (its client went away): the engine stops its work."""
        self.stopped = True
        self.cancel()


@dataclass
class Job:
    """A request as the engine holds it. ``deadline`` is on the ``time.monotonic`` clock;
    ``sent`` counts the tokens already handed to ``on_token`` (a retried row does not send them
    twice)."""

    prompt_ids: list[int]
    steering: list[ResolvedSteering]
    max_tokens: int
    deadline: float
    on_token: Callable[[int], None] | None = None
    temperature: float = 0.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    future: Generation = field(default_factory=Generation)
    sent: int = 0

    def sampling(self) -> RowSampling | None:
        """A fresh generator for each attempt, so a retried row draws the same tokens."""
        if self.temperature <= 0:
            return None
        return RowSampling(self.temperature, torch.Generator().manual_seed(self.seed))


Fail = Callable[[Job, ServeError, str], None]


class RowTracker:
    """Per-row state of one generation attempt over ``jobs``.

    :meth:`on_step` records each row's new token (not its end-of-sequence token, nothing past
    ``max_tokens`` or a stop string), streams it and resolves the row's future as soon as the
    row has ended well; :meth:`row_stop` (a :data:`~avec.generation.hf.RowStop`) ends the rows
    whose request was stopped, is past its deadline or whose logits are not usable, failing
    those with ``fail(job, error, counter)``."""

    def __init__(self, jobs: Sequence[Job], tokenizer: Any, eos_ids: set[int], fail: Fail,
                 timeout_s: float) -> None:
        self.jobs = list(jobs)
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.fail = fail
        self.timeout_s = timeout_s
        self.tokens: list[list[int]] = [[] for _ in self.jobs]
        self.reason: list[str | None] = [None] * len(self.jobs)

    def ended(self, j: int) -> bool:
        return self.reason[j] is not None or self.jobs[j].future.done()

    def row_stop(self, usable: torch.Tensor) -> torch.Tensor:
        now = time.monotonic()
        for j, job in enumerate(self.jobs):
            if self.ended(j):
                continue
            if job.future.stopped:
                self.fail(job, ServeError(499, "the client closed the connection"), "cancelled")
            elif now > job.deadline:
                self.fail(job, ServeError(504, f"generation did not finish within "
                                               f"{self.timeout_s:g} s; ask for fewer max_tokens "
                                               f"or retry later"), "timed_out")
            elif not bool(usable[j]):
                self.fail(job, ServeError(
                    400, "this request's steering made the model's outputs non-finite (NaN or "
                    "inf); use a smaller coef or clamp value", param="steering",
                    code="non_finite_output"), "non_finite")
        return torch.tensor([self.ended(j) for j in range(len(self.jobs))], dtype=torch.bool)

    def on_step(self, new: torch.Tensor) -> None:
        for j, tok in enumerate(new.tolist()):
            if self.ended(j):
                continue
            job = self.jobs[j]
            if tok in self.eos_ids:
                self._finish(j, "stop")
                continue
            self.tokens[j].append(tok)
            if len(self.tokens[j]) > job.sent and job.on_token is not None:
                job.sent += 1
                try:
                    job.on_token(tok)
                except Exception:  # a broken listener must not fail the other rows
                    job.on_token = None
            if job.stop and self._hit_stop(j):
                self._finish(j, "stop")
            elif len(self.tokens[j]) >= job.max_tokens:
                self._finish(j, "length")

    def finish_all(self) -> None:
        """Resolve every row still open when the batch's generation returned."""
        for j, job in enumerate(self.jobs):
            if not self.ended(j):
                self._finish(j, "length" if len(self.tokens[j]) >= job.max_tokens else "stop")

    def _hit_stop(self, j: int) -> bool:
        text = self.tokenizer.decode(self.tokens[j], skip_special_tokens=True)
        return any(s in text for s in self.jobs[j].stop)

    def _finish(self, j: int, reason: str) -> None:
        self.reason[j] = reason
        job = self.jobs[j]
        if not job.future.done():
            job.future.set_result(GenerationResult(list(self.tokens[j]), len(job.prompt_ids),
                                                    reason))
