"""Helpers every ``avec`` sub-command shares: loading the model its arguments name, progress
lines on stderr, and the one JSON emitter for ``--json`` output. The command modules import
these, never each other's private names."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def log(msg: str) -> None:
    """A progress or status line on stderr (stdout stays for results)."""
    print(msg, file=sys.stderr)


def emit_json(obj: Any) -> None:
    """``--json`` output: one indented JSON document on stdout."""
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def load_model_for(args: argparse.Namespace) -> Any:
    """The model ``args.model`` names, on ``args.backend`` (``hf`` by default); logs the load
    time."""
    from avec.models import load_model

    t0 = time.perf_counter()
    if getattr(args, "backend", "hf") == "llama.cpp":
        from avec.generation.llamacpp import LlamaCppModel

        if args.block_path:
            raise ValueError("--block-path applies to the hf backend only")
        model = LlamaCppModel.load(args.model)
    else:
        model = load_model(args.model, block_path=args.block_path)
    log(f"loaded {model.name} ({model.n_layers} layers, d_model {model.d_model}) "
        f"in {time.perf_counter() - t0:.1f} s")
    return model
