"""What one request, and the server as a whole, may use (:class:`Limits`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass
class Limits:
    """The server's limits; every per-request one is checked before generation starts.

    Request size: ``max_body_bytes`` (HTTP body), ``max_prompt_chars`` (the messages' text,
    checked before tokenizing), ``max_prompt_tokens``, ``max_tokens`` (``default_max_tokens``
    when a request gives none). Steering: ``max_steering`` entries, ``|coef| <= max_abs_coef``,
    ``|value| <= max_abs_value``. Time and load: ``request_timeout_s`` from submission to the
    last token (queue wait included; the request's work stops then), ``max_queue`` requests
    waiting to start (beyond it a 429 with ``Retry-After: retry_after_s``), ``max_batch`` rows
    per batch gathered over ``batch_window_s``. Vector store: ``max_vector_bytes`` per file,
    ``max_vectors`` vectors, ``max_store_bytes`` of tensors in all.
    """

    max_body_bytes: int = 16 * 1024 * 1024
    max_vector_bytes: int = 16 * 1024 * 1024
    max_vectors: int = 256
    max_store_bytes: int = 1024 * 1024 * 1024
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_prompt_tokens: int = 4096
    max_prompt_chars: int = 128 * 1024
    max_steering: int = 8
    max_abs_coef: float = 1000.0
    max_abs_value: float = 1.0e4
    request_timeout_s: float = 300.0
    max_queue: int = 64
    retry_after_s: int = 1
    max_batch: int = 16
    batch_window_s: float = 0.005

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"Limits.{f.name} must be a number, got {value!r}")
            low_ok = value >= 0 if f.name == "batch_window_s" else value > 0
            if not math.isfinite(value) or not low_ok:
                raise ValueError(f"Limits.{f.name}={value!r}: it must be a finite number > 0")


    def out_of_bounds(self, coef: float, value: float) -> tuple[str, str] | None:
        """The field of a steering entry past ``max_abs_coef`` / ``max_abs_value`` and why, or
        ``None`` when both are inside."""
        for name, x, cap in (("coef", coef, self.max_abs_coef),
                             ("value", value, self.max_abs_value)):
            if abs(x) > cap:
                return name, f"|{name}| {abs(x):g} exceeds the limit {cap:g}"
        return None

    def busy_error_args(self) -> dict:
        """The 429 a full server answers (for :class:`~avec.serve.errors.ServeError`)."""
        return {"status": 429, "message": f"the server is busy ({self.max_queue} requests are "
                f"waiting); retry later", "code": "server_busy",
                "retry_after": max(1, int(-(-self.retry_after_s // 1)))}


@dataclass(frozen=True)
class ConnectionLimits:
    """What one HTTP connection may hold: ``idle_timeout_s`` without a complete request head,
    ``body_timeout_s`` from a head to the end of its body, and ``max_connections`` open at once
    (beyond it uvicorn answers 503)."""

    idle_timeout_s: int = 5
    body_timeout_s: float = 60.0
    max_connections: int = 256
