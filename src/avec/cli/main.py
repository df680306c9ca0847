"""The ``avec`` command: a thin layer over the library. Every command takes ``--json``.

This module holds the root parser, the list of command groups, :func:`main` and the failure
handling; each group module (:mod:`avec.cli.vectors`, :mod:`avec.cli.generate`, ...) owns the
parsers of its commands (``add_parsers(sub)``) and maps their names to functions
(``COMMANDS``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from avec._version import __version__
from avec.cli import compare as cli_compare
from avec.cli import compose as cli_compose
from avec.cli import condition as cli_condition
from avec.cli import demo as cli_demo
from avec.cli import discover as cli_discover
from avec.cli import evaluate as cli_evaluate
from avec.cli import generate as cli_generate
from avec.cli import maze as cli_maze
from avec.cli import models as cli_models
from avec.cli import refusal as cli_refusal
from avec.cli import sae as cli_sae
from avec.cli import serve as cli_serve
from avec.cli import tune as cli_tune
from avec.cli import vectors as cli_vectors
from avec.cli import vllm as cli_vllm
from avec.cli.args import check_text_args

# The command groups, in the order their commands appear in ``avec --help``.
GROUPS = (cli_vectors, cli_generate, cli_evaluate, cli_tune, cli_condition, cli_compare,
          cli_compose, cli_serve, cli_refusal, cli_maze, cli_discover, cli_sae, cli_vllm,
          cli_models, cli_demo)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    name: fn for group in GROUPS for name, fn in group.COMMANDS.items()}


def build_parser() -> argparse.ArgumentParser:
    """The full ``avec`` parser: the root options and every group's sub-commands."""
    parser = argparse.ArgumentParser(
        prog="avec", description="Activation engineering: build steering vectors from contrast "
        "pairs and apply them to language models. Layer L means the output of decoder block L "
        "(0-based), for reading and for steering.")
    parser.add_argument("--version", action="version", version=f"avec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        check_text_args(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _error(args, "interrupted")
        return 130
    except Exception as exc:  # the boundary: a message and an exit code, never a traceback
        if os.environ.get("AVEC_DEBUG"):
            raise
        code, message = describe_failure(exc)
        _error(args, message)
        return code


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """``(exit code, message)`` for an exception that reached the command line: 2 for bad
    input (avec's own errors, malformed files, unreadable paths, inputs too large or too deeply
    nested), 1 for anything else, which is a bug in avec."""
    import struct

    from avec.errors import AvecError

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = ValueError  # type: ignore[misc,assignment]  # noqa: N806
    if isinstance(exc, (AvecError, ValueError)):
        return 2, str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return 2, f"{where}{exc.strerror or exc}"
    if isinstance(exc, (SafetensorError, struct.error)):
        return 2, f"malformed file ({exc})"
    if isinstance(exc, RecursionError):
        return 2, "the input is nested too deeply to process; simplify it"
    if isinstance(exc, MemoryError):
        return 2, ("out of memory; use smaller inputs (shorter texts, fewer prompts, a smaller "
                   "--batch-size or --max-new-tokens)")
    return 1, (f"internal error ({type(exc).__name__}: {exc}); this is a bug in avec, please "
               f"report it (AVEC_DEBUG=1 shows the traceback)")


def _error(args: argparse.Namespace, message: str) -> None:
    """One line on stderr, whatever the terminal's encoding, at most 4,000 characters."""
    if len(message) > 4000:
        message = message[:4000] + " [...]"
    text = f"avec {args.command}: error: {message}"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
