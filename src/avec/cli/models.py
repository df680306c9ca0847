"""``avec models``: the named models, their size and source, and what is on this machine."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from avec.cli.common import emit_json


def _add_models_parser(sub: Any) -> None:
    p = sub.add_parser(
        "models", help="list the named models (--model NAME): size, layers, source packages, "
                       "installed, cached",
        description="List the models avec loads by name (`--model NAME`, "
                    "`avec.load_model(NAME)`): their GGUF file's size, layers and width, the PyPI "
                    "packages they come from, whether those are installed, and whether the "
                    "model is assembled and converted in avec's cache. Nothing is loaded or "
                    "hashed.")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _size(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def _packages(requirements: list[str]) -> str:
    """``prefix{1..N}==version`` (shell brace expansion) for numbered parts, else the list."""
    names = [r.split("==")[0] for r in requirements]
    versions = {r.partition("==")[2] for r in requirements}
    prefix = os.path.commonprefix(names)
    numbered = [n[len(prefix):] for n in names] == [str(i) for i in range(1, len(names) + 1)]
    if len(names) > 1 and len(versions) == 1 and numbered:
        return f"{prefix}{{1..{len(names)}}}=={versions.pop()}"
    return " ".join(requirements)


def _table(rows: list[dict[str, Any]]) -> str:
    headers = ["name", "size", "layers", "d", "source packages", "installed", "cached"]
    body = [[r["name"], _size(r["size"]), str(r["n_layers"]), str(r["d_model"]),
             _packages(r["packages"]), "yes" if r["installed"] else "no",
             "converted" if r["converted"] else "assembled" if r["assembled"] and r["split"]
             else "no"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
             for line in [headers, *body]]
    return "\n".join(lines)


def cmd_models(args: argparse.Namespace) -> int:
    from avec.models.named import list_models

    rows = [status.to_dict() for status in list_models()]
    if args.json:
        emit_json({"models": rows})
        return 0
    print(_table(rows))
    missing = [r for r in rows if not r["installed"]]
    if missing:
        print("\nto install:" if len(missing) > 1 else "\nto install it:")
        for r in missing:
            print(f"  {r['name']}: {r['install_command']}")
        if any(r["split"] for r in missing):
            print("(or `make models` in an avec checkout: every split model's parts)")
    licences = sorted({r["license"] for r in rows})
    print("\nlicence: " + ("; ".join(f"{r['name']} {r['license']}" for r in rows)
                           if len(licences) > 1 else f"{licences[0]} (all)"))
    return 0


def add_parsers(sub: Any) -> None:
    _add_models_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"models": cmd_models}
