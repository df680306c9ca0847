"""``avec demo``: an 'ocean' vector from built-in pairs, unsteered vs steered completions."""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float, int_arg, output_file
from avec.cli.common import add_model_args, columns, emit_json, log

DEFAULT_DEMO_OUTPUT = "avec-demo-vector.safetensors"


def _add_demo_parser(sub: Any) -> None:
    """``avec demo``."""
    p = sub.add_parser("demo", help="build an 'ocean' vector from 36 built-in pairs and show "
                       "unsteered vs steered completions on the default model")
    p.add_argument("--layer", type=int_arg, default=14)
    p.add_argument("--coef", type=finite_float, default=8.0)
    p.add_argument("--max-new-tokens", type=count_arg, default=48)
    p.add_argument("--output", "-o", default=DEFAULT_DEMO_OUTPUT, type=output_file,
                   help=f"where to save the vector (default {DEFAULT_DEMO_OUTPUT})")
    add_model_args(p)


def cmd_demo(args: argparse.Namespace) -> int:
    from avec.data.demo import DEMO_PAIRS, DEMO_PROMPTS, DEMO_TARGET_WORDS
    from avec.directions.extract import extract
    from avec.generation.hf import steered_completions

    model = common.load_model_for(args)
    t0 = time.perf_counter()
    vec = extract(model, DEMO_PAIRS, [args.layer], progress=True)
    vec.metadata["source_pairs"] = "avec built-in demo pairs (ocean vs everyday topics)"
    log(f"extracted a mean-difference vector from {len(DEMO_PAIRS)} built-in pairs at "
        f"layer {args.layer} in {time.perf_counter() - t0:.1f} s")
    out = vec.save(args.output)
    results = steered_completions(model, DEMO_PROMPTS, vec, [0.0, args.coef],
                                  max_new_tokens=args.max_new_tokens, progress=True)

    def hits(coef: float) -> int:
        return sum(any(w in r.text.lower() for w in DEMO_TARGET_WORDS)
                   for r in results if r.coef == coef)

    summary = {"vector": str(out), "layer": args.layer, "coef": args.coef,
               "pairs": len(DEMO_PAIRS), "prompts": len(DEMO_PROMPTS),
               "ocean_word_completions": {"unsteered": hits(0.0), "steered": hits(args.coef)},
               "completions": [r.to_dict() for r in results]}
    if args.json:
        emit_json(summary)
        return 0
    print(f"\navec demo: steering {model.name} toward the ocean (layer {args.layer}, "
          f"coef {args.coef:+g})")
    for prompt in DEMO_PROMPTS:
        row = [r for r in results if r.prompt == prompt]
        print(f"\n>>> {prompt}")
        print(columns(["unsteered", f"steered (coef {args.coef:+g})"], [r.text for r in row]))
    print(f"\ncompletions mentioning the ocean/sea: unsteered {hits(0.0)}/{len(DEMO_PROMPTS)}, "
          f"steered {hits(args.coef)}/{len(DEMO_PROMPTS)}")
    print(f"vector saved to {out}  (try: avec generate --vector {out} --coef 8 --prompt 'Hi!')")
    return 0


def add_parsers(sub: Any) -> None:
    _add_demo_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"demo": cmd_demo}
