"""Reading untrusted text and JSON files with bounds: every failure is a :class:`DataError`
naming the file (and line) and what to do, never a traceback.

Bounds: a whole file read at once holds at most :data:`MAX_FILE_BYTES`; a line at most
:data:`MAX_LINE_BYTES` bytes (lines are read one at a time, so a 200 MB line costs
4 MB before it is refused); one text (a prompt, a pair's side) at most :data:`MAX_TEXT_CHARS`
characters; JSON nests at most :data:`MAX_JSON_DEPTH` levels and holds no lone surrogates.
Texts longer than the model's context are refused later, by token count
(:func:`avec.models.context.check_fits`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

from avec.errors import DataError
from avec.formats.jsonsafe import JSONInputError, has_lone_surrogate, loads

MAX_FILE_BYTES = 512 * 2**20
MAX_LINE_BYTES = 4 * 2**20
MAX_TEXT_CHARS = 2**20
MAX_JSON_DEPTH = 32


def _open_error(path: Path, exc: OSError) -> DataError:
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return DataError(f"{path}: is a directory; give a file")
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{path}: file not found")
    if isinstance(exc, PermissionError):
        return DataError(f"{path}: permission denied; make the file readable")
    return DataError(f"{path}: cannot read the file ({exc.strerror or exc})")


def check_readable(path: Path) -> None:
    """Raise :class:`DataError` unless ``path`` is an existing regular file."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give a file")
    if not path.is_file():
        raise DataError(f"{path}: file not found")


def read_text(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> str:
    """The whole file as UTF-8 text (at most ``max_bytes``)."""
    path = Path(path)
    check_readable(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise DataError(f"{path}: the file is {size:,} bytes, over the {max_bytes:,}-byte "
                            f"limit; split it")
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as exc:
        raise _open_error(path, exc) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as "
                        f"UTF-8") from None


def iter_lines(path: str | Path, max_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(line number, line without its newline)`` for each line, read one at a time and
    decoded as UTF-8 on its own (so a bad byte is reported on its own line)."""
    path = Path(path)
    check_readable(path)
    try:
        with open(path, "rb") as fh:
            for lineno in itertools.count(1):
                raw = fh.readline(max_bytes + 1)
                if not raw:
                    return
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    raise DataError(f"{path}:{lineno}: the line is longer than {max_bytes:,} "
                                    f"bytes; shorten or split it")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start + 1} of "
                                    f"the line); save the file as UTF-8") from None
                yield lineno, line.rstrip("\r\n")
    except OSError as exc:
        raise _open_error(path, exc) from None


def parse_json(text: str, where: str) -> Any:
    """``text`` parsed as JSON (bounded depth, valid Unicode), errors naming ``where``."""
    try:
        return loads(text, max_depth=MAX_JSON_DEPTH)
    except JSONInputError as exc:
        raise DataError(f"{where}: {exc.message}") from None


def parse_json_document(path: Path, text: str) -> Any:
    """A whole-file JSON document; a syntax error names the line it is on."""
    try:
        return loads(text, max_depth=MAX_JSON_DEPTH)
    except JSONInputError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise DataError(f"{where}: {exc.message}") from None


def check_text(value: Any, where: str, key: str = "text") -> str:
    """``value`` as a non-empty string of valid Unicode within :data:`MAX_TEXT_CHARS`."""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty")
    if len(value) > MAX_TEXT_CHARS:
        raise DataError(f"{where}: {key!r} is {len(value):,} characters, over the "
                        f"{MAX_TEXT_CHARS:,}-character limit; shorten it")
    if has_lone_surrogate(value):
        raise DataError(f"{where}: {key!r} holds a lone surrogate (not valid Unicode)")
    return value
