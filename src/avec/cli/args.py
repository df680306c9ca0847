"""Argument types for the ``avec`` command: each refuses bad input while arguments are parsed,
so the user gets argparse's one-line message (naming the option) and exit code 2 before any
model is loaded or any work is done.

Numbers must be finite and fit the type they are used in (float32 for coefficients and values,
a 32-bit int for counts and indices); output paths must be writable *now*: an output file may
not be a directory, an output directory may not be a file, and the nearest existing parent must
be a writable directory (missing parents are created when the output is written).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from avec.formats.jsonsafe import has_lone_surrogate

FLOAT32_MAX = 3.4028234663852886e38
INT_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1


def finite_float(text: str) -> float:
    """A finite number that float32 can hold."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number within float32's "
                                         f"range (|x| <= {FLOAT32_MAX:.4g})")
    return value


def _int(text: str, low: int, high: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text[:40]} is out of range ({low}..{high})")
    return value


def int_arg(text: str) -> int:
    """An integer in the signed 32-bit range (layer indices may be negative)."""
    return _int(text, -INT_MAX, INT_MAX)


def count_arg(text: str) -> int:
    """A positive integer (a count, a size, a number of tokens)."""
    return _int(text, 1, INT_MAX)


def nonneg_arg(text: str) -> int:
    """A non-negative integer."""
    return _int(text, 0, INT_MAX)


def seed_arg(text: str) -> int:
    """A random seed, 0..2**32-1."""
    return _int(text, 0, SEED_MAX)


def steer_positions(text: str) -> str | int:
    """``all``, ``prompt``, ``generated``, ``from:K`` or ``K`` (validated by
    :func:`avec.intervene.steer.parse_positions`)."""
    from avec.errors import SteeringError
    from avec.intervene.steer import parse_positions

    try:
        return parse_positions(int(text) if text.isascii() and text.isdigit() else text)
    except SteeringError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _writable_ancestor(path: Path) -> None:
    """Raise unless the nearest existing ancestor of ``path`` is a writable directory."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{path}: {parent} is not writable")
    try:  # os.access trusts permission bits; a read-only mount only shows on a real write
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{path}: cannot write in {parent} "
                                         f"({exc.strerror or exc})") from None


def output_file(text: str) -> str:
    """A file to write: not an existing directory, in a writable place."""
    if not text or has_lone_surrogate(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable file name")
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)):
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and is not writable")
    _writable_ancestor(path)
    return text


def output_dir(text: str) -> str:
    """A directory to write into (created if missing): not an existing file, in a writable
    place."""
    if not text or has_lone_surrogate(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable directory name")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(f"{text} is not writable")
        _writable_ancestor(path / "x")
    else:
        _writable_ancestor(path)
    return text


def check_text_args(args: argparse.Namespace) -> None:
    """Raise ``ValueError`` naming the first argument that is not valid Unicode (bytes that are
    not UTF-8 reach Python as lone surrogates)."""
    for key, value in vars(args).items():
        values: list[Any] = value if isinstance(value, list) else [value]
        flat = [v for item in values for v in (item if isinstance(item, (list, tuple))
                                                else [item])]
        if any(isinstance(v, str) and has_lone_surrogate(v) for v in flat):
            raise ValueError(f"argument --{key.replace('_', '-')} is not valid UTF-8 text; "
                             f"give it as UTF-8")
