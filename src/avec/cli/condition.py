"""``avec condition fit``: the condition vector for conditional steering (CAST)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import finite_float, output_dir, seed_arg
from avec.cli.common import add_model_args, emit_json

DESCRIPTION = """Build a condition for conditional steering: the mean difference of two prompt
sets' mean hidden states (each prompt read as a request is: chat template, tokens after the
first) at each scanned layer, and the comparator and threshold that best separate held-in
prompts (F1). The layer with the best 4-fold cross-validated F1 within the held-in prompts
wins; precision, recall, F1 and the ROC curve are reported on held-out prompts. Writes
NAME.safetensors (the condition vector, its rule in the metadata: a steering entry's "when":
{"vector": NAME} uses it), condition.json, roc.png and scan.png."""


def _add_parsers(sub: Any) -> None:
    p = sub.add_parser("condition", help="conditions for conditional steering (CAST): fit",
                       description="Conditions for conditional steering (CAST).")
    inner = p.add_subparsers(dest="condition_command", required=True, metavar="COMMAND")
    f = inner.add_parser("fit", help="fit a condition separating two prompt sets",
                         description=DESCRIPTION)
    f.add_argument("--positive", required=True,
                   help="prompts the condition holds for (.txt one per line, .json, .jsonl)")
    f.add_argument("--negative", required=True, help="prompts it does not hold for")
    scan = f.add_mutually_exclusive_group()
    scan.add_argument("--layer", type=int, help="one layer")
    scan.add_argument("--layers", help="layers to scan: 14, 4,8,12 or 4-20[:step] (default: "
                      "every other layer from 20%% to 80%% of the depth)")
    f.add_argument("--metric", choices=["cosine", "projection"], default="cosine")
    f.add_argument("--held-out", type=finite_float, default=0.25,
                   help="fraction of each set held out (default 0.25)")
    f.add_argument("--seed", type=seed_arg, default=0)
    f.add_argument("--name", default="condition", help="file name of the condition vector")
    f.add_argument("--no-chat", action="store_true", help="read prompts without the template")
    f.add_argument("-o", "--output-dir", required=True, type=output_dir)
    add_model_args(f)


def cmd_condition(args: argparse.Namespace) -> int:
    from avec.data import load_prompts
    from avec.evaluate.sweep import parse_layers
    from avec.intervene.condition_fit import fit
    from avec.report import heatmap, pyplot, save_figure, write_json
    from avec.serve.registry import VectorRegistry

    VectorRegistry.check_name(args.name)
    positive, negative = load_prompts(args.positive), load_prompts(args.negative)
    model = common.load_model_for(args)
    if args.layer is not None:
        layers = [args.layer]
    elif args.layers:
        layers = parse_layers(args.layers)
    else:
        n = model.n_layers
        layers = list(range(max(0, round(0.2 * n)), round(0.8 * n) + 1, 2))
    result = fit(model, positive, negative, layers, metric=args.metric,
                 held_out=args.held_out, seed=args.seed, chat=False if args.no_chat else None,
                 progress=True)
    out = Path(args.output_dir)
    files = {"vector": result.vector(model).save(out / f"{args.name}.safetensors"),
             "json": write_json(out / "condition.json", {
                 **result.to_dict(), "model": model.name, "positive": args.positive,
                 "negative": args.negative})}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    xs, ys = zip(*result.roc_held_out)
    ax.plot(xs, ys, marker=".")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("false-positive rate (held-out)")
    ax.set_ylabel("true-positive rate (held-out)")
    ax.set_title(f"layer {result.layer}: AUC {result.auc_held_out:.3f}")
    files["roc"] = save_figure(fig, out / "roc.png")
    files["scan"] = heatmap(
        [[s.held_in.f1, s.cv_f1, s.held_out.f1, s.held_out.precision, s.held_out.recall,
          s.auc_held_out] for s in result.scan], out / "scan.png",
        rows=[s.layer for s in result.scan],
        cols=["F1 in", "F1 cv", "F1 out", "precision out", "recall out", "AUC out"],
        title=f"condition fit; chosen layer {result.layer}", ylabel="layer", colorbar="score",
        star=(next(i for i, s in enumerate(result.scan) if s.layer == result.layer), 0))
    if args.json:
        emit_json({"layer": result.layer, "metric": result.metric, "op": result.held_in.op,
                   "threshold": result.held_in.threshold, "held_in_f1": result.held_in.f1,
                   "cv_f1": result.cv_f1,
                   "held_out": {"f1": result.held_out.f1,
                                "precision": result.held_out.precision,
                                "recall": result.held_out.recall,
                                "auc": result.auc_held_out},
                   "files": {k: str(v) for k, v in files.items()}})
        return 0
    h = result.held_out
    print(f"condition: {result.metric} at layer {result.layer} {result.held_in.op} "
          f"{result.held_in.threshold:.4g} (held-in F1 {result.held_in.f1:.3f}, "
          f"cross-validated {result.cv_f1:.3f})")
    print(f"held-out: precision {h.precision:.3f}, recall {h.recall:.3f}, F1 {h.f1:.3f}, "
          f"AUC {result.auc_held_out:.3f}")
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def add_parsers(sub: Any) -> None:
    _add_parsers(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"condition": cmd_condition}
