"""JSON parsing for untrusted files: bounded nesting, valid Unicode, one error type.

``json.loads`` recurses once per nesting level (a line of 100,000 ``[`` raises RecursionError,
not a decode error) and accepts ``"\\ud800"``, a lone surrogate that no UTF-8 encoder, tokenizer
or terminal accepts later. :func:`loads` measures the nesting depth first (without recursion),
parses, and refuses lone surrogates in any key or string, raising :class:`JSONInputError` for
every kind of bad input so callers can name the file and line once.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

import numpy as np

DEFAULT_MAX_DEPTH = 64

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class JSONInputError(ValueError):
    """Malformed, too deeply nested or non-Unicode JSON; ``line`` is 1-based when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message, self.line = message, line


def nesting_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text (strings skipped), computed without recursion."""
    if text.count("[") + text.count("{") <= 1:
        return text.count("[") + text.count("{")
    skeleton = _STRING.sub('""', text).encode("utf-8", "replace")
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = (np.isin(codes, (0x5B, 0x7B)).astype(np.int64)
             - np.isin(codes, (0x5D, 0x7D)).astype(np.int64))
    return int(np.cumsum(steps).max(initial=0))


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a UTF-16 surrogate code point (which UTF-8 cannot encode)."""
    return _SURROGATE.search(text) is not None


def _first_surrogate(obj: Any) -> bool:
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def loads(text: str, *, max_depth: int = DEFAULT_MAX_DEPTH,
          object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """Parse ``text`` as JSON; raise :class:`JSONInputError` when it is not valid JSON, nests
    deeper than ``max_depth`` levels, or holds a lone surrogate (an unpaired ``\\udXXX``
    escape) in a string or key. ``object_pairs_hook`` is passed to ``json.loads``."""
    if has_lone_surrogate(text):
        raise JSONInputError("the text holds a lone surrogate code point (not valid Unicode)")
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JSONInputError(f"JSON nested {depth} levels deep (at most {max_depth} allowed)")
    try:
        obj = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"invalid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})",
                             exc.lineno) from None
    except RecursionError:  # cannot happen below max_depth; kept as a last guard
        raise JSONInputError(f"JSON nested too deeply (at most {max_depth} levels)") from None
    if _MAYBE_SURROGATE.search(text) and _first_surrogate(obj):
        raise JSONInputError("a JSON string holds a lone surrogate escape such as \\ud800 "
                             "(half of a UTF-16 pair); write the character itself or a full "
                             "pair")
    return obj
