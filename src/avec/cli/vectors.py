"""``avec extract|info|convert|export``: build a steering vector from contrast pairs, show a
vector file's metadata, and convert or export it for other engines."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, int_arg, output_file, seed_arg
from avec.cli.common import add_model_args, add_vector_io_args, emit_json, log
from avec.directions.methods import METHODS


def _add_extract_parser(sub: Any) -> None:
    """``avec extract``."""
    p = sub.add_parser("extract", help="build a steering vector from contrast pairs",
                       description="Read activations of positive and negative texts and save "
                       "their direction (mean difference by default) as a safetensors file.")
    p.add_argument("--pairs", required=True,
                   help='.jsonl with {"positive", "negative"[, "prompt"]} per line, or CAA-style '
                        'A/B .json (question, answer_matching_behavior, '
                        'answer_not_matching_behavior)')
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "ab"],
                   help="pair file format (auto: .json is A/B, anything else JSONL)")
    p.add_argument("--layer", type=int_arg, action="append", required=True,
                   help="0-based block whose output is read (repeat for several layers)")
    p.add_argument("--method", default="mean_diff",
                   choices=list(METHODS),
                   help="direction method (default mean_diff; actadd takes exactly one pair)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random control direction")
    p.add_argument("--position", type=common.position, default=None,
                   help="token read: last (default; ab_letter for A/B data), mean, ab_letter or "
                        "an int index")
    p.add_argument("--chat", action="store_true",
                   help="wrap texts in the model's chat template (default: texts as given)")
    p.add_argument("--batch-size", type=count_arg, default=32)
    p.add_argument("--output", "-o", required=True, type=output_file,
                   help="output .safetensors file")
    add_model_args(p)


def _add_info_parser(sub: Any) -> None:
    """``avec info``."""
    p = sub.add_parser("info", help="show the metadata of a vector file (.safetensors or .gguf)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_convert_parser(sub: Any) -> None:
    """``avec convert``."""
    p = sub.add_parser("convert", help="convert a vector between avec's safetensors format and "
                       "llama.cpp/repeng control-vector GGUF (chosen by the file suffixes)",
                       description="Convert a vector file. INPUT and OUTPUT are .safetensors "
                       "(avec) or .gguf (llama.cpp --control-vector, repeng export_gguf). Layer "
                       "L stays layer L: the output of block L in all three tools.")
    add_vector_io_args(p)


def _add_export_parser(sub: Any) -> None:
    """``avec export``."""
    p = sub.add_parser("export", help="export a vector for another engine: --format gguf writes "
                       "a llama.cpp control vector",
                       description="Export a vector file for another engine. --format gguf "
                       "writes a llama.cpp control vector (general.architecture "
                       "'controlvector', float32 tensors direction.N added at the output of "
                       "0-based block N, as `llama-cli --control-vector FILE` applies them). "
                       "llama.cpp cannot steer block 0, so a vector on layer 0 is refused: "
                       "pass --layers without 0.")
    add_vector_io_args(p)
    p.add_argument("--format", choices=["gguf"], default="gguf")


def cmd_extract(args: argparse.Namespace) -> int:
    from avec.data import load_pairs
    from avec.directions.extract import extract

    pairs = load_pairs(args.pairs, args.format)
    is_ab = args.format == "ab" or (args.format == "auto" and Path(args.pairs).suffix == ".json")
    position = args.position if args.position is not None else ("ab_letter" if is_ab else "last")
    model = common.load_model_for(args)
    t0 = time.perf_counter()
    vec = extract(model, pairs, args.layer, method=args.method, position=position,
                  chat=args.chat, batch_size=args.batch_size, progress=True, seed=args.seed)
    vec.metadata["source_pairs"] = str(args.pairs)
    out = vec.save(args.output)
    info = {"output": str(out), "method": args.method, "n_pairs": len(pairs),
            "layers": vec.layers, "position": position,
            "norms": {str(k): round(v, 4) for k, v in vec.norms().items()},
            "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        emit_json(info)
    else:
        norms = ", ".join(f"L{k}: {v:.2f}" for k, v in vec.norms().items())
        print(f"saved {out} ({len(pairs)} pairs, {args.method}, read at {position}; norms {norms})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from avec.evaluate.sweep import parse_layers
    from avec.formats.gguf_control import write_gguf_control_vector
    from avec.vector import load_vector

    vec = load_vector(args.input)
    if args.layers:
        vec = vec.select(parse_layers(args.layers))
    out = Path(args.output)
    info: dict[str, Any] = {"input": args.input, "output": str(out)}
    if getattr(args, "format", None) == "gguf" or out.suffix.lower() == ".gguf":
        rec = vec.recommended
        if rec is not None and not args.raw:
            if rec.op != "add" or rec.positions != "all":
                raise ValueError(f"the recommended setting is op {rec.op} on positions "
                                 f"{rec.positions}; a llama.cpp control vector adds at every "
                                 f"position: export with --raw")
            vec = vec.select(list(rec.layers)) * rec.coef
            info["coef_applied"] = rec.coef
            log(f"the recommended coefficient {rec.coef:g} (layers {list(rec.layers)}) is "
                f"multiplied into the directions: llama.cpp files have no metadata for it, so "
                f"use this file at strength 1 (--raw writes the directions unscaled)")
        write_gguf_control_vector(vec, out, model_hint=args.model_hint)
    elif out.suffix.lower() == ".safetensors":
        vec.save(out)
    else:
        raise ValueError(f"{out}: the output must end in .safetensors or .gguf")
    info.update({"layers": vec.layers, "width": vec.width})
    if args.json:
        emit_json(info)
    else:
        print(f"wrote {out} ({len(vec.layers)} layers, width {vec.width})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from avec.vector import load_vector

    vec = load_vector(args.file)
    info = vec.describe()
    if args.json:
        emit_json(info)
        return 0
    for key, value in info.items():
        if key != "recommended":
            print(f"{key:>14}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    rec = vec.recommended
    if rec is not None:
        budget, score = rec.details.get("budget", {}), rec.details.get("score", {})
        how = []
        if budget:
            how.append(f"{budget.get('metric')} {budget.get('value', '?')} <= "
                       f"{budget.get('max', '?')}")
        if "held_in" in score:
            how.append(f"{score.get('metric')} {score['held_in']} held-in"
                       + (f", {score['held_out']} held-out" if "held_out" in score else "")
                       + f" (unsteered {score.get('unsteered_held_in', '?')})")
        print(f"{'recommended':>14}: coef {rec.coef:g} at layer(s) {list(rec.layers)}, op "
              f"{rec.op}, positions {rec.positions}" + (f"; {'; '.join(how)}" if how else ""))
    return 0


def add_parsers(sub: Any) -> None:
    _add_extract_parser(sub)
    _add_info_parser(sub)
    _add_convert_parser(sub)
    _add_export_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "extract": cmd_extract, "info": cmd_info, "convert": cmd_convert, "export": cmd_convert}
