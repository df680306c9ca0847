"""The one error type of the server: an HTTP status, an OpenAI error type, and a message.

The engine resolves a request's future with a :class:`ServeError` when that request alone fails
(its deadline passed, its client went away, its steering made the model's outputs non-finite,
the queue is full); the app answers it as ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
               411: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 499: "cancelled", 503: "overloaded_error",
               504: "timeout_error"}


class ServeError(Exception):
    """A request's failure, answered with HTTP ``status``. ``retry_after`` (seconds) becomes a
    ``Retry-After`` header (429 and 503)."""

    def __init__(self, status: int, message: str, type_: str | None = None, *,
                 param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or ERROR_TYPES.get(status, "server_error")
        self.param = param
        self.code = code
        self.retry_after = retry_after


def safe_text(text: str) -> str:
    """``text`` with any lone surrogate escaped, so it can always be sent as UTF-8 JSON."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
