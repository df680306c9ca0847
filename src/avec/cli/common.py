"""Helpers every ``avec`` sub-command shares: the model and vector-file arguments, argument
value parsers, loading the model the arguments name, progress lines on stderr, the one JSON
emitter for ``--json`` output, side-by-side columns and the context-fit check. The command
modules import these, never each other's private names.

Command modules call :func:`load_model_for` as ``common.load_model_for(args)`` (looked up at
call time), so tests patch this one name to hand every command a model."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
import time
from typing import Any

from avec.cli.args import output_file


def log(msg: str) -> None:
    """A progress or status line on stderr (stdout stays for results)."""
    print(msg, file=sys.stderr)


def emit_json(obj: Any) -> None:
    """``--json`` output of every command: one indented JSON document on stdout (values JSON
    cannot hold, such as paths, are written as strings)."""
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


DTYPES = ("float32", "bfloat16")  # --dtype choices, names of torch dtypes


def load_model_for(args: argparse.Namespace) -> Any:
    """The model ``args.model`` names, on ``args.backend`` (``hf`` by default); logs the load
    time."""
    import torch

    from avec.models import load_model

    t0 = time.perf_counter()
    backend = getattr(args, "backend", "hf")
    if backend != "hf" and getattr(args, "dtype", "float32") != "float32":
        raise ValueError(f"--dtype applies to the hf backend only (--backend {backend} runs "
                         f"its own types)")
    if backend == "llama.cpp":
        from avec.generation.llamacpp import LlamaCppModel
        from avec.models.loading import model_file

        if args.block_path:
            raise ValueError("--block-path applies to the hf backend only")
        model = LlamaCppModel.load(model_file(args.model))
    else:
        model = load_model(args.model, block_path=args.block_path,
                           dtype=getattr(torch, getattr(args, "dtype", "float32")))
    log(f"loaded {model.name} ({model.n_layers} layers, d_model {model.d_model}) "
        f"in {time.perf_counter() - t0:.1f} s")
    return model


def position(value: str) -> str | int:
    """``--position`` values: an int index, or a name (``last``, ``mean``, ``ab_letter``)."""
    try:
        return int(value)
    except ValueError:
        return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--block-path`` and ``--json``, which every model command takes."""
    p.add_argument("--model", default=None,
                   help="a named model (`avec models` lists them, e.g. "
                        "qwen2.5-coder-1.5b-instruct), HF directory, hub id (offline if cached) "
                        "or .gguf file (default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--block-path", default=None,
                   help="dotted path of the decoder blocks, for architectures avec does not know")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="parameter dtype of the hf backend (default float32). bfloat16 halves "
                        "memory and is faster on CPUs with native bf16 (AVX512-BF16, AMX), "
                        "slower elsewhere: measure")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def add_vector_io_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `convert` and `export`."""
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--layers", default=None,
                   help="keep only these layers: 14, 4,8,12 or 4-20[:step]")
    p.add_argument("--model-hint", default=None,
                   help="GGUF model hint (default: the model type the vector was made on)")
    p.add_argument("--raw", action="store_true",
                   help="GGUF output: write the directions as they are, without a tuned "
                        "vector's recommended coefficient multiplied in")
    p.add_argument("--json", action="store_true", help="print JSON")


def columns(headers: list[str], bodies: list[str]) -> str:
    """Texts side by side under their headers, wrapped to the terminal's width."""
    width = max(40, shutil.get_terminal_size((160, 24)).columns)
    col = max(20, (width - 3 * (len(headers) - 1)) // len(headers))
    wrapped = [textwrap.wrap(" ".join(b.split()), col) or [""] for b in bodies]
    lines = [" | ".join(h.ljust(col) for h in headers), "-+-".join("-" * col for _ in headers)]
    for i in range(max(len(w) for w in wrapped)):
        lines.append(" | ".join((w[i] if i < len(w) else "").ljust(col) for w in wrapped))
    return "\n".join(line.rstrip() for line in lines)


def check_fit(model: Any, located: list[tuple[str, str]], chat: bool | None,
              max_new_tokens: int) -> None:
    """Refuse, naming the prompt, any prompt whose tokens (chat template included) and
    ``max_new_tokens`` do not fit the model's context."""
    from avec.generation.hf import format_prompt
    from avec.models.context import check_texts

    texts = [text for _where, text in located]
    ids = [format_prompt(model, text, chat)[0] for text in texts]
    check_texts(model, texts, ids, reserve=max_new_tokens,
                reserve_for="new tokens (--max-new-tokens)",
                sources=[where for where, _text in located])
