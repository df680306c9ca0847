"""``avec tune``: the layer(s) and strength that maximise a behaviour score within a side-effect
budget, checked on held-out prompts, saved into the vector file as its ``recommended``
setting."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float, output_dir, seed_arg
from avec.cli.common import add_model_args, emit_json, log

DESCRIPTION = """Find the layer (or band of layers) and coefficient that maximise a behaviour
score while a side effect stays within a budget. Strengths are searched as doses (steering norm
over the residual stream's median norm at the layer): the budget is measured on a dose grid per
layer (batched, stopping at the first dose beyond the budget) and the boundary bisected; the
score is measured at each layer's boundary, at fractions of it for the best layers, and for a
band of layers around the best one. The choice is re-measured on held-out prompts (a seeded
split) with a bootstrap interval. Writes tune.json (every point), tune_budget.png,
tune_score.png, report.html and the vector with a `recommended` block, which `avec generate`,
`avec serve` and the playground use when no coefficient is given."""


def _add_tune_parser(sub: Any) -> None:
    p = sub.add_parser("tune", help="find the layer and strength for a behaviour under a "
                       "side-effect budget", description=DESCRIPTION)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vector", help="vector file to tune (.safetensors or .gguf)")
    src.add_argument("--pairs", help="contrast pairs: build a mean-difference vector at the "
                     "candidate layers first (.jsonl read at --position; A/B .json at the "
                     "answer letter)")
    p.add_argument("--position", type=common.position, default=None,
                   help="with --pairs: where activations are read (default: mean for .jsonl, "
                        "ab_letter for A/B .json)")
    p.add_argument("--score", required=True,
                   choices=["keywords", "concept", "refusal", "ab", "logit-diff"],
                   help="the behaviour: keyword rate, embedding similarity to --concept, or "
                        "refusal rate of greedy completions of --prompts; A/B p(match) on "
                        "--data; logit(A) - logit(B) after --prompts")
    p.add_argument("--prompts", help="prompts file (.txt one per line, .json, .jsonl) for the "
                   "generation scores and logit-diff (default: avec's 16 everyday prompts)")
    p.add_argument("--keywords", help="comma-separated keywords (--score keywords)")
    p.add_argument("--concept", help="concept description (--score concept)")
    p.add_argument("--data", help="A/B JSON (--score ab)")
    p.add_argument("--tokens", nargs=2, action="append", metavar=("A", "B"),
                   help="token pair for --score logit-diff (repeat)")
    p.add_argument("--budget", choices=["kl", "ppl", "mmlu"], default="kl",
                   help="side effect: kl (KL on neutral prompts, default), ppl (perplexity "
                        "ratio of --texts minus 1), mmlu (drop of p(correct) on --mmlu items)")
    p.add_argument("--max", type=finite_float, default=None, dest="limit",
                   help="the budget (default: kl 1.0, ppl 0.2, mmlu 0.05)")
    p.add_argument("--neutral", help="neutral prompts for the KL budget (default: avec's 8)")
    p.add_argument("--texts", nargs="+", help="text files for the ppl budget")
    p.add_argument("--mmlu", help="capability A/B JSON (prompt/correct/incorrect items) for the "
                   "mmlu budget")
    p.add_argument("--mmlu-limit", type=count_arg, default=40,
                   help="use the first N capability items (default 40)")
    p.add_argument("--layers", help="candidate layers: 14, 4,8,12 or 4-20[:step] (default: up "
                   "to --max-layers of the vector's, spread over 20%%-80%% of the depth)")
    p.add_argument("--max-layers", type=count_arg, default=8)
    p.add_argument("--doses", help="dose grid, comma-separated (default 0.0625,0.125,0.25,0.5,"
                   "1,2)")
    p.add_argument("--bands", default="3",
                   help="band widths tried around the best layer, comma-separated; 1 = none "
                        "(default 3)")
    p.add_argument("--refine", type=count_arg, default=4, help="bisection steps (default 4)")
    p.add_argument("--held-out", type=finite_float, default=1 / 3,
                   help="fraction of the prompts/items held out (default 1/3)")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--max-new-tokens", type=count_arg, default=32)
    p.add_argument("--no-chat", action="store_true", help="no chat template")
    p.add_argument("-o", "--output-dir", required=True, type=output_dir)
    add_model_args(p)


def _floats(text: str | None, flag: str) -> tuple[float, ...] | None:
    if not text:
        return None
    from avec.cli.args import finite_float as parse

    try:
        return tuple(parse(x) for x in text.split(","))
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise ValueError(f"{flag} {text[:60]!r}: {exc}") from None


def _score(args: argparse.Namespace, model: Any) -> Any:
    from avec.data import load_prompts
    from avec.data.demo import TUNE_PROMPTS
    from avec.tuning import ABScore, ConceptScore, KeywordScore, LogitDiffScore, RefusalScore

    chat = False if args.no_chat else None
    prompts = load_prompts(args.prompts) if args.prompts else list(TUNE_PROMPTS)
    gen = {"prompts": prompts, "max_new_tokens": args.max_new_tokens, "chat": chat}
    if args.score == "keywords":
        words = [k.strip() for k in (args.keywords or "").split(",") if k.strip()]
        if not words:
            raise ValueError("--score keywords needs --keywords a,b,c")
        return KeywordScore(keywords=words, **gen)
    if args.score == "concept":
        if not args.concept:
            raise ValueError("--score concept needs --concept TEXT")
        return ConceptScore(concept=args.concept, **gen)
    if args.score == "refusal":
        return RefusalScore(**gen)
    if args.score == "logit-diff":
        if not args.tokens:
            raise ValueError("--score logit-diff needs --tokens A B")
        return LogitDiffScore(prompts=prompts, token_pairs=[tuple(t) for t in args.tokens],
                              chat=chat)
    from avec.evaluate.ab import load_ab_items

    if not args.data:
        raise ValueError("--score ab needs --data FILE.json")
    return ABScore(items=load_ab_items(args.data), chat=not args.no_chat)


def _budget(args: argparse.Namespace) -> Any:
    from avec.data import load_prompts
    from avec.data.demo import NEUTRAL_PROMPTS
    from avec.data.textfile import check_text, read_text
    from avec.tuning import KLBudget, MMLUBudget, PerplexityBudget

    if args.budget == "kl":
        return KLBudget(prompts=load_prompts(args.neutral) if args.neutral
                        else list(NEUTRAL_PROMPTS),
                        limit=1.0 if args.limit is None else args.limit,
                        chat=False if args.no_chat else None)
    if args.budget == "ppl":
        if not args.texts:
            raise ValueError("--budget ppl needs --texts FILE [FILE ...]")
        return PerplexityBudget(texts=[check_text(read_text(t), t) for t in args.texts],
                                limit=0.2 if args.limit is None else args.limit)
    from avec.evaluate.ab import load_ab_items

    if not args.mmlu:
        raise ValueError("--budget mmlu needs --mmlu FILE.json")
    return MMLUBudget(items=load_ab_items(args.mmlu)[:args.mmlu_limit],
                      limit=0.05 if args.limit is None else args.limit,
                      chat=not args.no_chat)


def cmd_tune(args: argparse.Namespace) -> int:
    from avec.evaluate.sweep import parse_layers
    from avec.tuning import TuneConfig, tune
    from avec.tuning.report import write
    from avec.vector import load_vector

    layers = parse_layers(args.layers) if args.layers else None
    doses = _floats(args.doses, "--doses")
    bands = tuple(int(b) for b in _floats(args.bands, "--bands") or ())
    config = TuneConfig(layers=layers, max_layers=args.max_layers,
                        **({"doses": doses} if doses else {}), bands=bands, refine=args.refine,
                        held_out=args.held_out, seed=args.seed)
    model = common.load_model_for(args)
    score, budget = _score(args, model), _budget(args)
    if args.vector:
        vector = load_vector(args.vector, model)
        name = Path(args.vector).stem
    else:
        vector = _from_pairs(args, model, config)
        name = Path(args.pairs).stem
    result = tune(model, vector, score, budget, config)
    prompts = [score.prompts[i] for i in result.split["held_out"]] if score.generates else []
    files = write(result, vector, model, args.output_dir, prompts=prompts,
                  vector_name=f"{name}.tuned.safetensors")
    if args.json:
        emit_json({"layers": list(result.layers), "coef": result.layer_coef,
                   "dose": result.dose,
                   "budget": {**result.budget, "value": result.budget_value},
                   "score": {**result.score, "held_in": result.score_held_in,
                             "unsteered_held_in": result.unsteered_held_in},
                   "held_out": result.held_out.__dict__ if result.held_out else None,
                   "points": len(result.points), "seconds": round(result.seconds, 1),
                   "files": files})
        return 0
    held = result.held_out
    split = f", {result.coef:.4g} split over the band" if len(result.layers) > 1 else ""
    print(f"recommended: coef {result.layer_coef:.4g} at layer(s) {list(result.layers)} "
          f"(dose {result.dose:.3g}{split}); {budget.name} {result.budget_value:.3g} <= "
          f"{budget.limit:g}")
    print(f"held-in {score.name}: {result.score_held_in:.3g} (unsteered "
          f"{result.unsteered_held_in:.3g})")
    if held is not None:
        kept = f", {held.kept:.0%} of the held-in effect" if held.kept is not None else ""
        print(f"held-out {score.name} ({held.items} items): {held.steered:.3g} (unsteered "
              f"{held.unsteered:.3g}); effect {held.effect:+.3g} [{held.interval[0]:+.3g}, "
              f"{held.interval[1]:+.3g}]{kept}")
    print(f"{len(result.points)} points in {result.seconds:.0f} s")
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def _from_pairs(args: argparse.Namespace, model: Any, config: Any) -> Any:
    """A mean-difference vector at every layer the search may use: the candidates and the
    bands around them."""
    from avec.data import load_pairs
    from avec.directions.extract import extract
    from avec.tuning.search import band, pick_layers

    is_ab = Path(args.pairs).suffix == ".json"
    position = args.position or ("ab_letter" if is_ab else "mean")
    layers = pick_layers(list(range(model.n_layers)), model.n_layers, config)
    wanted = sorted({L for c in layers for w in (1, *config.bands)
                     for L in band(c, w, model.n_layers)})
    log(f"extracting a mean-difference vector at layers {wanted} (read at {position})")
    return extract(model, load_pairs(args.pairs), wanted, chat=is_ab, position=position,
                   progress=True)


def add_parsers(sub: Any) -> None:
    _add_tune_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"tune": cmd_tune}
