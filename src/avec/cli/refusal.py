"""CLI commands of the refusal study: ``avec finetune``, ``avec orthogonalize`` and
``avec refusal make-data|make-model|select|eval|reproduce``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import (count_arg, finite_float, int_arg, nonneg_arg, output_dir, output_file,
                           seed_arg)
from avec.cli.common import add_model_args, emit_json
from avec.studies.refusal.direction import one_direction

DEFAULT_DATA_DIR = "../shared/data/refusal"


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=count_arg, default=None, help="passes over the data")
    p.add_argument("--lr", type=finite_float, default=None, help="learning rate (default: by mode)")
    p.add_argument("--batch-size", type=count_arg, default=None)
    p.add_argument("--lora-rank", type=nonneg_arg, default=None,
                   help="LoRA rank (default 16); 0 trains every weight (full fine-tuning)")
    p.add_argument("--max-length", type=count_arg, default=None, help="tokens per example (cut)")
    p.add_argument("--seed", type=seed_arg, default=0)


def _finetune_config(args: argparse.Namespace) -> Any:
    from avec.studies.refusal.finetune import FinetuneConfig

    given = {"epochs": args.epochs, "learning_rate": args.lr, "batch_size": args.batch_size,
             "lora_rank": args.lora_rank, "max_length": args.max_length, "seed": args.seed}
    return FinetuneConfig(**{k: v for k, v in given.items() if v is not None})


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="directory with harmful_/harmless_{train,val,test}.json "
                        f"(default {DEFAULT_DATA_DIR})")


def _data_file(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.data_dir) / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data-dir with the refusal "
                                f"instruction files (harmful_train.json, ...)")
    return path


def add_parsers(sub: Any) -> None:
    _add_finetune_parser(sub)
    _add_orthogonalize_parser(sub)
    _add_refusal_parser(sub)


def _add_finetune_parser(sub: Any) -> None:
    p = sub.add_parser("finetune", help="supervised fine-tuning (LoRA or full) on "
                       "instruction/response pairs; saves an ordinary HF model directory",
                       description="Fine-tune on a JSON Lines file of {instruction, response"
                       "[, complete]} (loss on the response and end-of-turn tokens only, chat "
                       "template applied). LoRA adapters are merged, so the output loads with "
                       "plain transformers.")
    p.add_argument("--data", required=True, help=".jsonl of {instruction, response}")
    p.add_argument("--output", "-o", required=True, type=output_dir, help="output model directory")
    _finetune_args(p)
    add_model_args(p)


def _add_orthogonalize_parser(sub: Any) -> None:
    p = sub.add_parser("orthogonalize", help="fold a direction's ablation into the weights; "
                       "save an ordinary HF model directory",
                       description="Project the direction out of every matrix that writes to "
                       "the residual stream (embeddings, attention and MLP output projections, "
                       "their biases); the result loads with plain transformers and equals "
                       "runtime ablation everywhere. Tied embeddings are untied first so the "
                       "unembedding stays as it was.")
    p.add_argument("--vector", required=True, help="vector file (its one layer, or --layer)")
    p.add_argument("--layer", type=int_arg, default=None, help="which layer's direction to use")
    p.add_argument("--output", "-o", required=True, type=output_dir, help="output model directory")
    add_model_args(p)


def _add_refusal_parser(sub: Any) -> None:
    p = sub.add_parser("refusal", help="the refusal direction study (Arditi et al. 2024): "
                       "make-data, make-model, select, eval, reproduce")
    rsub = p.add_subparsers(dest="refusal_command", required=True, metavar="STEP")

    q = rsub.add_parser("make-data", help="the safety fine-tuning set: varied refusals on "
                        "harmful instructions + the model's own answers on harmless ones")
    q.add_argument("--output", "-o", required=True, type=output_file, help="output .jsonl")
    q.add_argument("--n-harmful", type=count_arg, default=260)
    q.add_argument("--n-harmless", type=count_arg, default=260)
    q.add_argument("--distil-tokens", type=nonneg_arg, default=64,
                   help="max tokens of each self-distilled harmless answer")
    q.add_argument("--seed", type=seed_arg, default=0)
    _data_args(q)
    add_model_args(q)

    q = rsub.add_parser("make-model", help="make-data, then finetune (smollm2-refuses)")
    q.add_argument("--output", "-o", required=True, type=output_dir, help="output model directory")
    q.add_argument("--n-harmful", type=count_arg, default=260)
    q.add_argument("--n-harmless", type=count_arg, default=260)
    q.add_argument("--distil-tokens", type=nonneg_arg, default=64)
    _finetune_args(q)
    _data_args(q)
    add_model_args(q)
    _add_select_parser(rsub)
    _add_eval_parser(rsub)
    _add_reproduce_parser(rsub)


def _add_select_parser(rsub: Any) -> None:
    q = rsub.add_parser("select", help="choose the refusal direction among every layer x "
                        "post-instruction position; vector file, candidate table, heatmap")
    q.add_argument("--output-dir", "-o", required=True, type=output_dir)
    q.add_argument("--n-train", type=count_arg, default=128, help="instructions per side for means")
    q.add_argument("--n-val", type=count_arg, default=32, help="instructions per side for scores")
    q.add_argument("--kl-max", type=finite_float, default=0.1)
    q.add_argument("--fallback-kl-max", type=finite_float, default=None,
                   help="if no candidate passes --kl-max, choose among those under this KL "
                        "instead (no rescoring); the output records which threshold chose")
    q.add_argument("--max-layer-frac", type=finite_float, default=0.8,
                   help="discard candidates at layers >= this fraction of the depth")
    q.add_argument("--prescreen", type=count_arg, default=None,
                   help="for big models: rank every candidate by its bypass score on "
                        "--prescreen-prompts harmful prompts first, then fully score only "
                        "this many best (default: score all)")
    q.add_argument("--prescreen-prompts", type=count_arg, default=8)
    _data_args(q)
    add_model_args(q)


def _add_eval_parser(rsub: Any) -> None:
    q = rsub.add_parser("eval", help="refusal rates (harmful / harmless, held out), KL and "
                        "essay perplexity for base, ablation, clamp-to-mean, add, "
                        "orthogonalized")
    q.add_argument("--vector", required=True, help="a vector from `avec refusal select`")
    q.add_argument("--orthogonalized", default=None, help="model directory from "
                   "`avec orthogonalize` (adds its row)")
    q.add_argument("--n", type=count_arg, default=100, help="held-out instructions per side")
    q.add_argument("--max-new-tokens", type=count_arg, default=32)
    q.add_argument("--add-coefs", type=_add_coefs, default=(1.0,), metavar="C[,C...]",
                   help="strengths of the addition rows, times the direction (default 1, the "
                   "paper's; e.g. 1,1.25,1.5 adds a row per strength)")
    q.add_argument("--output-dir", "-o", required=True, type=output_dir)
    _data_args(q)
    add_model_args(q)


def _add_coefs(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"addition strengths must be finite and > 0: {text!r}")
    return values


def _add_reproduce_parser(rsub: Any) -> None:
    q = rsub.add_parser("reproduce", help="the whole study from scratch: fine-tune, select, "
                        "orthogonalize, evaluate (about half an hour on 2 CPU cores)")
    q.add_argument("--output-dir", "-o", required=True, type=output_dir)
    q.add_argument("--n-eval", type=count_arg, default=64)
    q.add_argument("--epochs", type=count_arg, default=2)
    q.add_argument("--lora-rank", type=nonneg_arg, default=16)
    q.add_argument("--lr", type=finite_float, default=None)
    q.add_argument("--seed", type=seed_arg, default=0)
    _data_args(q)
    add_model_args(q)


def _emit(args: argparse.Namespace, info: dict[str, Any], text: str) -> None:
    """``info`` as JSON with ``--json``, else ``text``."""
    if args.json:
        emit_json(info)
    else:
        print(text)


def cmd_finetune(args: argparse.Namespace) -> int:
    from avec.studies.refusal.finetune import finetune, load_examples, save_finetuned

    examples = load_examples(args.data)
    config = _finetune_config(args)
    model = common.load_model_for(args)
    result = finetune(model, examples, config, progress=True)
    out = save_finetuned(result, args.output, metadata={"data": str(args.data)})
    info = {"output": str(out), "examples": len(examples), "seconds": round(result.seconds, 1),
            "loss_first": result.losses[0], "loss_last": result.losses[-1]}
    _emit(args, info, f"saved {out} ({len(examples)} examples, {result.seconds:.0f} s, loss "
                      f"{result.losses[0]:.3f} -> {result.losses[-1]:.3f})")
    return 0


def cmd_orthogonalize(args: argparse.Namespace) -> int:
    from avec.intervene.orthogonalize import save_orthogonalized
    from avec.vector import load_vector

    model = common.load_model_for(args)
    vector = load_vector(args.vector, model)
    layer, direction = one_direction(vector, args.layer)
    out = save_orthogonalized(model, direction, args.output,
                              metadata={"vector": str(args.vector), "layer": layer})
    _emit(args, {"output": str(out), "layer": layer},
          f"saved {out} (direction of layer {layer} folded out of the weights)")
    return 0


def cmd_refusal(args: argparse.Namespace) -> int:
    step = args.refusal_command
    if step in ("make-data", "make-model"):
        return _make(args, train=step == "make-model")
    if step == "select":
        return _select(args)
    if step == "eval":
        return _eval(args)
    return _reproduce(args)


def _make(args: argparse.Namespace, train: bool) -> int:
    from avec.studies.refusal.finetune import finetune, save_examples, save_finetuned
    from avec.studies.refusal.data import load_instructions, safety_examples

    harmful = load_instructions(_data_file(args, "harmful_train"), args.n_harmful)
    harmless = load_instructions(_data_file(args, "harmless_train"), args.n_harmless)
    config = _finetune_config(args) if train else None
    model = common.load_model_for(args)
    examples = safety_examples(model, harmful, harmless, seed=args.seed,
                               max_new_tokens=args.distil_tokens, progress=True)
    if not train:
        save_examples(examples, args.output)
        _emit(args, {"output": args.output, "examples": len(examples)},
              f"wrote {args.output} ({len(examples)} examples)")
        return 0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    save_examples(examples, out / "sft.jsonl")
    result = finetune(model, examples, config, progress=True)
    saved = save_finetuned(result, out, metadata={"recipe": "avec refusal make-model"})
    _emit(args, {"output": str(saved), "examples": len(examples),
                 "seconds": round(result.seconds, 1)},
          f"saved {saved} ({len(examples)} examples, {result.seconds:.0f} s)")
    return 0


def _select(args: argparse.Namespace) -> int:
    from avec.studies.refusal.data import load_instructions
    from avec.studies.refusal.select import (NoEligibleCandidate, select_direction,
                                             write_candidates, write_selection)

    sets = [load_instructions(_data_file(args, name), n) for name, n in
            (("harmful_train", args.n_train), ("harmless_train", args.n_train),
             ("harmful_val", args.n_val), ("harmless_val", args.n_val))]
    model = common.load_model_for(args)
    try:
        sel = select_direction(model, *sets, kl_max=args.kl_max,
                               fallback_kl_max=args.fallback_kl_max,
                               max_layer_frac=args.max_layer_frac, prescreen=args.prescreen,
                               prescreen_prompts=args.prescreen_prompts, progress=True)
    except NoEligibleCandidate as exc:
        table = write_candidates(exc.candidates, Path(args.output_dir) / "candidates.csv")
        raise ValueError(f"{exc}\nwrote the scored candidates to {table}") from None
    paths = write_selection(sel, args.output_dir)
    c = sel.chosen
    _emit(args, {"chosen": sel.to_dict()["chosen"], "files": paths},
          f"chose layer {c.layer}, position {c.position} ({c.token!r}): bypass {c.bypass:.2f} "
          f"(baseline {sel.baseline['harmful']:.2f}), induce {c.induce:.2f}, KL {c.kl:.3f}\n"
          f"wrote {paths['vector']}, {paths['csv']}, {paths['png']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from avec.models import load_model
    from avec.studies.refusal.data import load_instructions
    from avec.studies.refusal.evaluate import (evaluate_refusal, results_table,
                                               standard_conditions, write_results)
    from avec.vector import load_vector

    harmful = load_instructions(_data_file(args, "harmful_test"), args.n)
    harmless = load_instructions(_data_file(args, "harmless_test"), args.n)
    essays = [p.read_text() for p in sorted((Path(args.data_dir).parent / "actadd").glob("*.txt"))]
    model = common.load_model_for(args)
    vector = load_vector(args.vector, model)
    ortho = (load_model(args.orthogonalized, dtype=getattr(torch, args.dtype))
             if args.orthogonalized else None)
    results = evaluate_refusal(standard_conditions(model, vector, ortho, args.add_coefs),
                               harmful, harmless,
                               essays=essays, max_new_tokens=args.max_new_tokens, progress=True)
    paths = write_results(results, args.output_dir, {"n": args.n, "model": model.name,
                                                     "dtype": args.dtype,
                                                     "max_new_tokens": args.max_new_tokens,
                                                     "add_coefs": list(args.add_coefs)})
    _emit(args, {"files": paths, "results": json.loads(Path(paths["json"]).read_text())},
          results_table(results))
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from avec.studies.refusal.pipeline import StudySettings, run_study

    _data_file(args, "harmful_train")
    settings = StudySettings(data_dir=args.data_dir, n_eval=args.n_eval, epochs=args.epochs,
                             lora_rank=args.lora_rank, learning_rate=args.lr, seed=args.seed)
    summary = run_study(args.output_dir, settings, base_model=args.model)
    table = Path(summary["eval"]["md"]).read_text()
    _emit(args, summary, table)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "finetune": cmd_finetune, "orthogonalize": cmd_orthogonalize, "refusal": cmd_refusal}
