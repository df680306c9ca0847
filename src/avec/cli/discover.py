"""``avec discover``: unsupervised steering vectors (MELBO) and a report of what they do."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float, int_arg, nonneg_arg, output_dir, seed_arg
from avec.cli.common import add_model_args, emit_json, log

DESCRIPTION = """Learn K steering vectors with no labelled data (MELBO, Mack & Turner 2024): each
is a bias of norm --radius added at the output of --source-layer (every position), optimised to
maximally change --target-layer's activations on the prompts, each orthogonal to the earlier
ones. Writes every vector as an avec vector file, melbo.json (objectives vs random vectors of the
same norm, pairwise cosines, histories), and unless --no-summary their greedy completions,
clusters of what they do and behaviour scores in summary.json and report.html. With
--naturalness (with --from too: no retraining) it also measures how natural each vector's
behaviour is: the log-probability of its steered completions under the unsteered model (against
unsteered completions and random vectors of the same norm) and the closest a plain instruction
gets to them (naturalness.json, a table in report.html; docs/studies/naturalness.md)."""


def _temperature(text: str) -> float:
    """A sampling temperature: a finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a temperature must be > 0")
    return value


def add_parsers(sub: Any) -> None:
    from avec.discover.melbo import MelboConfig

    d = MelboConfig()
    p = sub.add_parser("discover", help="unsupervised steering vectors (MELBO) + an HTML report",
                       description=DESCRIPTION)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts", help="prompts file (.txt, .json, .jsonl); JSON objects may "
                     "carry an \"answer\" that is scored as accuracy")
    src.add_argument("--arithmetic", type=count_arg, metavar="N",
                     help="use N generated items 'a=x+y, b=z+w. What is a*b?' (with answers)")
    src.add_argument("--from", dest="from_dir", metavar="DIR",
                     help="no training: re-summarize the vectors of an earlier run (new "
                          "--eval-prompts, --behaviour or --cluster-threshold)")
    p.add_argument("--source-layer", type=int_arg, default=None,
                   help="block whose output gets the vector (default: a quarter of the depth; "
                        "7 on the default model)")
    p.add_argument("--target-layer", type=int_arg, default=None,
                   help="block whose change is maximised (default: 8 before the end; 22)")
    p.add_argument("--radius", type=finite_float, default=d.radius,
                   help=f"norm R of every vector (default {d.radius})")
    p.add_argument("--num-vectors", type=count_arg, default=d.num_vectors, help="K")
    p.add_argument("--steps", type=count_arg, default=d.steps, help="max steps per vector")
    p.add_argument("--lr", type=finite_float, default=d.lr,
                   help=f"Adam learning rate per unit of radius (default {d.lr})")
    p.add_argument("--p", type=finite_float, default=d.p, help="power of each position's distance")
    p.add_argument("--q", type=finite_float, default=d.q, help="root taken of each prompt's sum")
    p.add_argument("--positions", default=d.positions,
                   help="target positions: all, last:K or from:K (default all)")
    p.add_argument("--patience", type=nonneg_arg, default=d.patience,
                   help="stop a vector after this many steps without improvement")
    p.add_argument("--batch-size", type=count_arg, default=d.batch_size)
    p.add_argument("--seed", type=seed_arg, default=d.seed)
    chat = p.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default: if the model has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    p.add_argument("--eval-prompts", default=None,
                   help="prompts for the steered completions (default: the training prompts)")
    p.add_argument("--behaviour", action="append", default=[], metavar="NAME=W1,W2",
                   help="score completions for a keyword set (repeatable); 'refusal' uses the "
                        "refusal substrings")
    p.add_argument("--max-new-tokens", type=count_arg, default=48)
    p.add_argument("--cluster-threshold", type=finite_float, default=0.08,
                   help="cosine distance at which clusters stop merging")
    p.add_argument("--no-summary", action="store_true",
                   help="only train and save the vectors (no completions or report)")
    nat = p.add_argument_group("naturalness (--naturalness)")
    nat.add_argument("--naturalness", action="store_true",
                     help="measure how natural each vector's behaviour is: mean token "
                          "log-probability of its steered completions under the unsteered model,"
                          " and the best similarity a plain instruction reaches")
    nat.add_argument("--naturalness-prompts", type=count_arg, default=16, metavar="N",
                     help="use the first N evaluation prompts (at least 2: the best instruction "
                          "is chosen on the even ones and scored on the odd ones; default 16)")
    nat.add_argument("--random-vectors", type=count_arg, default=4, metavar="N",
                     help="random vectors of the same norm as the likelihood reference "
                          "(default 4)")
    nat.add_argument("--temperature", type=_temperature, default=0.7,
                     help="sampling temperature of each vector's resample, whose similarity to "
                          "its greedy completions is the bar an instruction must reach "
                          "(default 0.7)")
    nat.add_argument("--suggestions", type=nonneg_arg, default=1, metavar="N",
                     help="instructions the model suggests per vector when shown its steered "
                          "text, added to the candidates (default 1)")
    nat.add_argument("--instructions", default=None, metavar="FILE",
                     help="candidate instructions, one per line (default: the built-in pool of "
                          "72)")
    p.add_argument("--output", "-o", required=True, type=output_dir, help="output directory")
    add_model_args(p)


def _prompts_and_answers(path: str | None, arithmetic: int | None,
                         seed: int) -> tuple[list[str], list[str] | None]:
    from avec.data import load_prompts
    from avec.discover.report import arithmetic_prompts

    if arithmetic is not None:
        items = arithmetic_prompts(arithmetic, seed)
        return [i["prompt"] for i in items], [i["answer"] for i in items]
    assert path is not None
    prompts = load_prompts(path)
    answers = None
    if Path(path).suffix in (".json", ".jsonl"):
        from avec.data.pairs import iter_jsonl
        from avec.data.textfile import parse_json_document, read_text

        items = (parse_json_document(Path(path), read_text(path)) if Path(path).suffix == ".json"
                 else [obj for _where, obj in iter_jsonl(path)])
        found = [str(i["answer"]) for i in items if isinstance(i, dict) and "answer" in i]
        answers = found if len(found) == len(prompts) else None
    return prompts, answers


def _earlier_run(args: argparse.Namespace) -> tuple[Any, list[str], list[str], Any]:
    """(result, training prompts, evaluation prompts, their answers) of the run in --from."""
    from avec.discover.report import load_run

    result, prompts = load_run(args.from_dir)
    if args.eval_prompts:
        return (result, prompts, *_prompts_and_answers(args.eval_prompts, None, args.seed))
    old = Path(args.from_dir) / "summary.json"
    saved = json.loads(old.read_text()) if old.is_file() else {}
    if not (saved.get("prompts") or prompts):
        raise ValueError(f"{args.from_dir} records no prompts; pass --eval-prompts")
    if saved.get("prompts"):
        return result, prompts, saved["prompts"], saved.get("answers")
    return result, prompts, prompts, None


def _train(args: argparse.Namespace, model: Any, prompts: list[str]) -> Any:
    from avec.discover.melbo import MelboConfig, MelboTrainer

    config = MelboConfig(source_layer=args.source_layer, target_layer=args.target_layer,
                         radius=args.radius, num_vectors=args.num_vectors, steps=args.steps,
                         lr=args.lr, p=args.p, q=args.q, positions=args.positions,
                         batch_size=args.batch_size, patience=args.patience, chat=args.chat,
                         seed=args.seed)
    trainer = MelboTrainer(model, prompts, config)
    log(f"MELBO: {config.num_vectors} vectors, layer {trainer.source} -> {trainer.target}, "
        f"radius {config.radius}, {len(prompts)} prompts")
    return trainer.train(progress=True, on_vector=lambda v: log(
        f"vector {v.index}: objective {v.objective:.4g} after {v.steps} steps"))


def _naturalness_config(args: argparse.Namespace) -> Any:
    """The naturalness settings the arguments give (checked before any model is loaded)."""
    from avec.discover.naturalness import INSTRUCTIONS, NaturalnessConfig

    if not args.naturalness:
        return None
    if args.no_summary:
        raise ValueError("--naturalness scores the summary's completions; drop --no-summary")
    if args.naturalness_prompts < 2:
        raise ValueError("--naturalness-prompts must be at least 2 (one prompt per half)")
    instructions = INSTRUCTIONS
    if args.instructions:
        from avec.data.textfile import read_text

        instructions = tuple(dict.fromkeys(line.strip() for line in
                                           read_text(args.instructions).splitlines()
                                           if line.strip()))
        if not instructions:
            raise ValueError(f"{args.instructions} holds no instruction (one per line)")
    return NaturalnessConfig(n_random=args.random_vectors, temperature=args.temperature,
                             suggestions=args.suggestions, instructions=instructions,
                             max_new_tokens=args.max_new_tokens, chat=args.chat,
                             seed=args.seed)


def _naturalness(args: argparse.Namespace, model: Any, result: Any, summary: Any,
                 config: Any) -> Any:
    """Both measures on the first --naturalness-prompts evaluation prompts, reusing the
    summary's greedy completions."""
    from avec.discover.naturalness import score_naturalness, steered_by_vectors

    n = args.naturalness_prompts
    prompts = summary.prompts[:n]
    if len(prompts) < 2:
        raise ValueError(f"--naturalness needs at least 2 evaluation prompts, the run has "
                         f"{len(prompts)}")
    vectors = [v.vector for v in result.vectors]
    steered = steered_by_vectors(model, prompts, vectors, config,
                                 greedy=[texts[:n] for texts in summary.completions[1:]])
    return score_naturalness(model, prompts, steered, vectors[0], config,
                             unsteered=summary.completions[0][:n], progress=True, log=log)


def cmd_discover(args: argparse.Namespace) -> int:
    from avec.discover.report import parse_behaviour, summarize, write_run

    behaviours = [parse_behaviour(b) for b in args.behaviour]
    nat_config = _naturalness_config(args)
    if args.from_dir:  # no training: the vectors of an earlier run
        result, prompts, eval_prompts, eval_answers = _earlier_run(args)
        model = common.load_model_for(args)
    else:
        prompts, answers = _prompts_and_answers(args.prompts, args.arithmetic, args.seed)
        if args.eval_prompts:
            eval_prompts, eval_answers = _prompts_and_answers(args.eval_prompts, None,
                                                              args.seed)
        elif args.arithmetic is not None:  # held-out items for accuracy, other seed
            eval_prompts, eval_answers = _prompts_and_answers(None, 32, args.seed + 1)
        else:
            eval_prompts, eval_answers = prompts, answers
        model = common.load_model_for(args)
        result = _train(args, model, prompts)
    summary = None
    if not args.no_summary:
        summary = summarize(model, result, eval_prompts, answers=eval_answers,
                            behaviours=behaviours, max_new_tokens=args.max_new_tokens,
                            threshold=args.cluster_threshold, chat=args.chat, progress=True)
    natural = (_naturalness(args, model, result, summary, nat_config)
               if nat_config is not None else None)
    paths = write_run(Path(args.output), result, summary, prompts, natural)
    return _finish(args, result, summary, paths, natural)


def _finish(args: argparse.Namespace, result: Any, summary: Any, paths: list[Path],
            natural: Any = None) -> int:
    mean_random = sum(result.random_objectives) / len(result.random_objectives)
    out = {"source_layer": result.source_layer, "target_layer": result.target_layer,
           "seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
           "mean_random_objective": mean_random,
           "vectors": summary.rows if summary else
           [{"index": v.index, "objective": v.objective} for v in result.vectors],
           "files": [str(p) for p in paths]}
    if natural is not None:
        doc = natural.to_json()
        out["naturalness"] = {k: doc[k] for k in ("unsteered_logprob", "random_logprob",
                                                  "instructed_logprob", "rows", "seconds")}
    if args.json:
        emit_json(out)
        return 0
    print(f"{len(result.vectors)} vectors, layer {result.source_layer} -> "
          f"{result.target_layer}, {result.seconds:.0f} s ({result.seconds_per_step:.3f} s/step);"
          f" random vectors of the same norm: objective {mean_random:.4g}")
    for row in out["vectors"]:
        extra = "".join(f"  {k} {v}" for k, v in row.items() if k not in ("index", "objective"))
        print(f"  vector {row['index']}: objective {row['objective']:.4g} "
              f"({row['objective'] / mean_random:.1f}x random){extra}")
    if summary:
        print(f"  unsteered: {summary.unsteered}")
    if natural is not None:
        print(natural_table(natural))
    print(f"wrote {args.output}/ ({len(paths)} files; open report.html)", file=sys.stderr)
    return 0


def natural_table(natural: Any) -> str:
    """The naturalness measures as text lines (one per vector, then the references)."""
    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [f"naturalness on {len(natural.prompts)} prompts (log-prob: mean per token under "
             f"the unsteered model; similarity on the held-out half):",
             f"  {'':10} {'log-prob':>9} {'reached':>8} {'unsteered':>9} {'ceiling':>8} "
             f"natural  best instruction"]
    for row in natural.rows:
        lines.append(f"  {row['name']:10} {f(row['logprob']):>9} {f(row['similarity']):>8} "
                     f"{f(row['unsteered']):>9} {f(row['ceiling']):>8} "
                     f"{'yes' if row['natural'] else 'no':7}  {row['instruction'] or '(plain)'!r}")
    lines.append(f"  references: unsteered {f(natural.unsteered_logprob)}, random same-norm "
                 f"vectors {f(natural.random_logprob)}, instructed {f(natural.instructed_logprob)}")
    return "\n".join(lines)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"discover": cmd_discover}
