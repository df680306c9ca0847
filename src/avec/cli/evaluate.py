"""``avec eval|sweep|top-examples``: a metric unsteered and steered, over layers x
coefficients, and the texts and tokens that project most on a direction."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float, int_arg, output_dir, output_file
from avec.cli.common import add_model_args, check_fit, emit_json

EVAL_DESCRIPTION = """Metrics: ab (CAA A/B p(matching letter), steering the tokens after the
question), mmlu (the same on prompt/correct/incorrect items: p(correct)), kl (KL of next-token
distributions on prompts vs the unsteered model, last position), ppl (perplexity of text files,
read as given, steered at every position), logit-diff (logit(A) - logit(B) after each prompt),
concept (greedy completions scored by keyword rate or embedding similarity to --concept)."""


def _add_eval_parsers(sub: Any) -> None:
    """``avec eval`` and ``avec sweep``: one parser each, the same options."""
    for name, helptext in (("eval", "measure a metric, unsteered and steered"),
                           ("sweep", "a metric over layers x coefficients: JSON, CSV, heatmap")):
        p = sub.add_parser(name, help=helptext, description=EVAL_DESCRIPTION)
        p.add_argument("metric", choices=["ab", "mmlu", "kl", "ppl", "logit-diff", "concept"])
        vec = p.add_mutually_exclusive_group()
        vec.add_argument("--vector", help="steering vector file (.safetensors or .gguf)")
        vec.add_argument("--pairs", help="build a mean-difference vector from these pairs first "
                         "(A/B .json: chat template, answer letter; .jsonl: last token)")
        p.add_argument("--layers", default=None,
                       help="layers to steer: 14, 4,8,12 or 4-20[:step] (default: the vector's)")
        p.add_argument("--coef", type=finite_float, action="append",
                       help="coefficient (repeat; default 0 and 1)")
        p.add_argument("--data", help="A/B JSON (ab, mmlu): CAA behaviour or prompt/correct items")
        p.add_argument("--prompts", help="prompts file for kl, logit-diff, concept")
        p.add_argument("--texts", nargs="+", help="text files whose perplexity is measured (ppl)")
        p.add_argument("--tokens", nargs=2, action="append", metavar=("A", "B"),
                       help="logit-diff token pair (repeat), e.g. --tokens ' love' ' hate'")
        p.add_argument("--keywords", help="comma-separated keywords (concept: keyword rate)")
        p.add_argument("--concept", help="concept description (concept: embedding judge)")
        p.add_argument("--limit", type=count_arg, help="use only the first N items/prompts")
        p.add_argument("--max-new-tokens", type=count_arg, default=48)
        p.add_argument("--no-chat", action="store_true", help="no chat template for A/B prompts")
        if name == "sweep":
            p.add_argument("--output-dir", "-o", required=True, type=output_dir,
                           help="directory for sweep_<metric>.json/.csv/.png")
        add_model_args(p)


def _add_top_examples_parser(sub: Any) -> None:
    """``avec top-examples``."""
    p = sub.add_parser("top-examples", help="texts and tokens that project most on a direction",
                       description="Rank the texts of a corpus by the largest projection of any "
                       "of their tokens (after the first) on the vector's direction at one layer, "
                       "and write highlighted HTML.")
    p.add_argument("--vector", required=True,
                   help="steering vector file (.safetensors or .gguf)")
    p.add_argument("--layer", type=int_arg, help="layer of the vector (default: its only layer)")
    p.add_argument("--texts", nargs="+", required=True,
                   help=".txt files (split at blank lines) or .json/.jsonl prompt files")
    p.add_argument("-k", type=count_arg, default=20)
    p.add_argument("--max-tokens", type=count_arg, default=128)
    p.add_argument("--html", type=output_file,
                   help="write the highlighted examples to this HTML file")
    add_model_args(p)


def _eval_inputs(args: argparse.Namespace) -> dict[str, Any]:
    from avec.data import load_prompts
    from avec.data.textfile import check_text, read_text
    from avec.evaluate.ab import load_ab_items

    lim = slice(None, args.limit)
    inputs: dict[str, Any] = {"chat": not args.no_chat}
    if args.metric in ("ab", "mmlu"):
        if not args.data:
            raise ValueError(f"metric {args.metric} needs --data FILE.json")
        inputs["items"] = load_ab_items(args.data)[lim]
    if args.metric in ("kl", "logit-diff", "concept"):
        if not args.prompts:
            raise ValueError(f"metric {args.metric} needs --prompts FILE")
        inputs["prompts"] = load_prompts(args.prompts)[lim]
    if args.metric == "ppl":
        if not args.texts:
            raise ValueError("metric ppl needs --texts FILE [FILE ...]")
        inputs["texts"] = [check_text(read_text(t), t) for t in args.texts][lim]
    if args.metric == "logit-diff":
        if not args.tokens:
            raise ValueError("metric logit-diff needs --tokens A B")
        inputs["token_pairs"] = [tuple(t) for t in args.tokens]
    if args.metric == "concept":
        inputs["keywords"] = [k.strip() for k in (args.keywords or "").split(",") if k.strip()]
        inputs["concept"] = args.concept or ""
        inputs["max_new_tokens"] = args.max_new_tokens
    return inputs


def cmd_eval(args: argparse.Namespace) -> int:
    from avec.data import load_pairs
    from avec.evaluate.sweep import parse_layers, run_sweep
    from avec.directions.extract import extract
    from avec.vector import load_vector

    model = common.load_model_for(args)
    layers = parse_layers(args.layers) if args.layers else None
    if args.vector:
        vector = load_vector(args.vector, model)
    elif args.pairs:
        if layers is None:
            raise ValueError("--pairs needs --layers")
        is_ab = Path(args.pairs).suffix == ".json"
        vector = extract(model, load_pairs(args.pairs), layers, chat=is_ab,
                         position="ab_letter" if is_ab else "last", progress=True)
    else:
        vector = None
    if vector is None and args.coef and any(c != 0 for c in args.coef):
        raise ValueError("nonzero --coef needs --vector or --pairs")
    coefs = args.coef or ([0.0, 1.0] if vector is not None else [0.0])
    if vector is not None:
        layers = layers or vector.layers
    else:
        layers = [0]  # unsteered: any layer, all coefficients are 0
    metric = {"mmlu": "ab", "logit-diff": "logit_diff"}.get(args.metric, args.metric)
    inputs = _eval_inputs(args)
    if args.metric == "concept":  # generates: the prompt and its new tokens must fit
        check_fit(model, [(f"{args.prompts}: prompt {i}", text) for i, text in
                          enumerate(inputs["prompts"], start=1)], inputs["chat"],
                  args.max_new_tokens)
    result = run_sweep(model, metric, vector, layers, coefs, progress=True, **inputs)
    result.extra.update({"model": model.name, "metric_name": args.metric,
                         "vector": args.vector or args.pairs})
    files = result.write(args.output_dir, f"{args.metric} on {model.name}") \
        if getattr(args, "output_dir", None) else {}
    if args.json:
        out = {"metric": args.metric, "layers": result.layers, "coefs": result.coefs,
               "values": result.values, "files": files,
               **{k: v for k, v in result.extra.items() if k != "samples"}}
        emit_json(out)
        return 0
    width = max(8, *(len(f"{c:g}") + 2 for c in result.coefs))
    print(f"{args.metric} on {model.name}" + (f" (vector {result.extra['vector']})"
                                              if vector is not None else " (unsteered)"))
    print("layer".rjust(6) + "".join(f"coef {c:g}".rjust(width + 5) for c in result.coefs))
    for L, row in zip(result.layers, result.values):
        print(str(L if vector is not None else "-").rjust(6)
              + "".join(f"{v:.4f}".rjust(width + 5) for v in row))
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def cmd_top_examples(args: argparse.Namespace) -> int:
    from avec.evaluate.top_examples import load_corpus, render_html, top_examples
    from avec.vector import load_vector

    texts = load_corpus(args.texts)
    model = common.load_model_for(args)
    vec = load_vector(args.vector, model)
    if args.layer is None:
        if len(vec.layers) != 1:
            raise ValueError(f"the vector has layers {vec.layers}; choose one with --layer")
        args.layer = vec.layers[0]
    if args.layer not in vec.directions:
        raise ValueError(f"the vector has no layer {args.layer}; it has {vec.layers}")
    examples = top_examples(model, texts, vec[args.layer], args.layer, k=args.k,
                            max_tokens=args.max_tokens, progress=True)
    if args.html:
        Path(args.html).parent.mkdir(parents=True, exist_ok=True)
        Path(args.html).write_text(render_html(
            examples, f"Top {len(examples)} examples of {Path(args.vector).name} at layer "
            f"{args.layer}", f"{len(texts)} texts from {', '.join(args.texts)}; model "
            f"{model.name}"), encoding="utf-8")
    if args.json:
        emit_json([{"rank": r, "text": "".join(e.tokens), "token": e.tokens[e.token_index],
                    "token_index": e.token_index, "score": round(e.score, 4)}
                   for r, e in enumerate(examples, start=1)])
    else:
        for r, e in enumerate(examples, start=1):
            snippet = " ".join("".join(e.tokens).split())[:90]
            print(f"{r:>3} {e.score:8.2f}  [{e.tokens[e.token_index].strip()}]  {snippet}")
        if args.html:
            print(f"wrote {args.html}")
    return 0


def add_parsers(sub: Any) -> None:
    _add_eval_parsers(sub)
    _add_top_examples_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "eval": cmd_eval, "sweep": cmd_eval, "top-examples": cmd_top_examples}
