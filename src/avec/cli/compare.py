"""``avec compare`` (a fair comparison of direction-finding methods) and ``avec pairs
generate`` (synthetic contrast pairs written by an instruct model)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float, int_arg, output_dir, output_file, seed_arg
from avec.cli.common import add_model_args, check_fit, emit_json, log
from avec.sae.feature import SAE_METHODS
from avec.studies.compare.settings import DEFAULT_METHODS

FINETUNE_METHODS = ("lora", "lora+mean_diff")  # = avec.studies.compare.finetuned's (tested)


def _add_compare_parser(sub: Any) -> None:
    """``avec compare``."""
    p = sub.add_parser("compare", help="fair method comparison: methods x pairs x seeds",
                       description="Compare direction-finding methods at equal norm: for every "
                       "method, number of pairs and seed, the best effect whose KL on neutral "
                       "prompts stays within the budget. Writes results.json, two plots and "
                       "report.html. The shortest form, `avec compare --concept TEXT -o DIR`, "
                       "has the model write synthetic pairs for the concept and scores greedy "
                       "completions of built-in everyday prompts with the embedding judge.")
    p.add_argument("--pairs", help="pool of contrast pairs (.jsonl or A/B .json); without it, "
                   "--concept pairs are generated (`avec pairs generate`) into DIR/pairs.jsonl")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--data", help="A/B test items (.json): the effect is p(match)")
    target.add_argument("--prompts", help="prompts to generate from: the effect is a concept "
                        "score (default: 8 built-in everyday prompts)")
    p.add_argument("--concept", help="concept description for the embedding judge")
    p.add_argument("--keywords", help="comma-separated keywords (keyword rate, if no --concept)")
    p.add_argument("--layer", type=int_arg, default=None,
                   help="block whose output is read and steered (default: a third of the depth, "
                        "10 on the default model)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(DEFAULT_METHODS)}, "
                        f"{' and '.join(SAE_METHODS)} (the SAE methods need --sae), and the "
                        f"fine-tuning rows lora (LoRA SFT on the positive side of the same "
                        f"pairs) and lora+mean_diff (that model, steered with the mean "
                        f"difference of the same pairs read on it, scale x coefficient); "
                        f"default: the first "
                        f"{len(DEFAULT_METHODS)}")
    p.add_argument("--n-pairs", default="1,3,8,32,128,256",
                   help="pair counts (values above the pool size are skipped)")
    p.add_argument("--seeds", type=count_arg, default=3)
    p.add_argument("--coefs", default="1,2,3,4,6",
                   help="multipliers of the common-norm direction (default 1,2,3,4,6)")
    p.add_argument("--kl-budget", type=finite_float, default=1.0)
    p.add_argument("--kl-prompts", help="neutral prompts for KL (default: 8 built-in prompts)")
    p.add_argument("--norm", type=finite_float, help="common norm (default: pool mean-diff norm)")
    p.add_argument("--limit", type=count_arg, help="use only the first N test items / prompts")
    p.add_argument("--pool", type=count_arg,
                   help="use only the first N pairs of --pairs as the pool")
    p.add_argument("--synthetic-pairs", type=count_arg, default=64,
                   help="pairs to generate when --pairs is not given (default 64)")
    p.add_argument("--contrast", help="with synthetic pairs: negatives about this opposite "
                   "concept instead of neutral topics (see `avec pairs generate --contrast`)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of synthetic pair generation")
    p.add_argument("--position", type=common.position, default=None,
                   help="token read for the directions: mean (default for sentence pairs: the "
                        "tokens after the first), last, or an int index (ab_letter for A/B "
                        "pools)")
    p.add_argument("--max-new-tokens", type=count_arg, default=32)
    p.add_argument("--sae", default=None,
                   help="SAE directory (`avec sae train`, or SAELens format) for the methods "
                        "'sae' (the latent that best marks the pairs, its decoder row added) "
                        "and 'sae_clamp' (that latent clamped to coef x the common norm inside "
                        "the SAE, error term kept)")
    p.add_argument("--sae-select", choices=["selective", "difference"], default="selective",
                   help="how the SAE methods rank latents: activation difference times "
                        "firing-rate difference (selective, default) or activation difference")
    ft = p.add_argument_group(
        "fine-tuning rows (--methods lora, lora+mean_diff)",
        "One LoRA fine-tune per pair count and seed on the cell's positive texts (A/B: the "
        "question -> the matching letter; sentence pairs: a neutral prompt -> the positive "
        "sentence), merged into a copy of the model. Its strength knob is the scale of the "
        "learned update, swept like a coefficient; KL is against the base model. "
        "lora+mean_diff sweeps scale x coefficient, the mean difference read on the "
        "fine-tuned model at each scale (scales over the budget on their own are skipped). "
        "Each row also records the seconds and peak memory it took to obtain (training, or "
        "reading the pairs and fitting).")
    ft.add_argument("--lora-steps", type=count_arg, default=16,
                    help="optimizer steps per fine-tune, the same for every pair count (at "
                         "least one epoch; default 16)")
    ft.add_argument("--lora-batch-size", type=count_arg, default=8,
                    help="examples per step (at most the number of pairs; default 8)")
    ft.add_argument("--lora-rank", type=count_arg, default=16, help="LoRA rank (default 16)")
    ft.add_argument("--lora-lr", type=finite_float, default=None,
                    help="learning rate (default: avec finetune's LoRA default, 1e-3)")
    ft.add_argument("--lora-scales", default="0.0625,0.125,0.25,0.5,1",
                    help="scales of the learned update W0 + s (W1 - W0) to sweep; 1 (as "
                         "trained) is always included (default 0.0625,0.125,0.25,0.5,1: a "
                         "fine-tune that memorises its pairs is far over a KL budget of 1 as "
                         "trained, and its KL grows about as the square of the scale)")
    p.add_argument("--name", default="", help="name of the behaviour or concept for the report")
    p.add_argument("--output-dir", "-o", required=True, type=output_dir)
    add_model_args(p)


def _add_pairs_parser(sub: Any) -> None:
    """``avec pairs generate``."""
    p = sub.add_parser("pairs", help="synthetic contrast pairs: `avec pairs generate`")
    psub = p.add_subparsers(dest="pairs_command", required=True, metavar="SUBCOMMAND")
    g = psub.add_parser("generate", help="an instruct model writes matched pairs for a concept",
                        description="Sample sentences about the concept and about neutral topics "
                        "from the same templates; drop malformed and duplicate outputs.")
    g.add_argument("--concept", required=True, help='e.g. "the ocean"')
    g.add_argument("--contrast", help='negatives about this opposite concept (e.g. "hatred and '
                   'anger" for --concept "love and kindness") instead of neutral topics')
    g.add_argument("-n", type=count_arg, default=32, help="number of pairs")
    g.add_argument("-o", "--output", required=True, type=output_file, help="output .jsonl")
    g.add_argument("--seed", type=seed_arg, default=0)
    g.add_argument("--temperature", type=finite_float, default=None,
                   help="sampling temperature (default 0.8)")
    g.add_argument("--max-attempts", type=count_arg, default=None, help="default 4 x n candidates")
    add_model_args(g)


def cmd_compare(args: argparse.Namespace) -> int:
    from avec.data import load_pairs, load_prompts
    from avec.data.demo import CONCEPT_PROMPTS, NEUTRAL_PROMPTS
    from avec.evaluate.ab import load_ab_items
    from avec.studies.compare import CompareSettings, Task, compare, default_layer, write_outputs

    if args.pairs is None and not args.concept:
        raise ValueError("give --pairs FILE, or --concept TEXT to have the model write synthetic "
                         "pairs for it")
    if args.data and args.pairs is None:
        raise ValueError("--data (A/B items) needs --pairs: the A/B pool to build vectors from")
    if args.data and (args.concept or args.keywords):
        raise ValueError("--concept/--keywords score generated text; with --data the effect is "
                         "A/B p(match): drop one of them")
    if args.contrast and args.pairs:
        raise ValueError("--contrast only shapes synthetic pairs; it cannot apply to --pairs")
    methods = _methods(args.methods)
    lora_scales = [float(x) for x in args.lora_scales.split(",") if x.strip()]
    if any(not (s > 0 and s < float("inf")) for s in lora_scales):
        raise ValueError(f"--lora-scales must be positive numbers, got {args.lora_scales!r}")
    if args.lora_lr is not None and args.lora_lr <= 0:
        raise ValueError(f"--lora-lr must be > 0, got {args.lora_lr}")
    keywords = [k.strip() for k in (args.keywords or "").split(",") if k.strip()]
    if not args.data and not args.concept and not keywords:
        raise ValueError("a concept comparison needs --concept and/or --keywords")
    lim = slice(None, args.limit)
    pairs = load_pairs(args.pairs)[: args.pool] if args.pairs else None
    if args.data:
        task = Task(items=load_ab_items(args.data)[lim], name=args.name)
    else:
        prompts = load_prompts(args.prompts) if args.prompts else CONCEPT_PROMPTS
        task = Task(prompts=list(prompts)[lim], concept=args.concept or "", keywords=keywords,
                    name=args.name or args.concept or "")
    kl_prompts = load_prompts(args.kl_prompts) if args.kl_prompts else NEUTRAL_PROMPTS
    model = common.load_model_for(args)
    if task.prompts:  # generated from: the prompt and its new tokens must fit
        check_fit(model, [(f"{args.prompts or 'built-in prompts'}: prompt {i}", text)
                          for i, text in enumerate(task.prompts, start=1)], None,
                  args.max_new_tokens)
    out_dir = Path(args.output_dir)
    if pairs is None:
        pairs, task.pairs_source = _synthetic_pool(model, args, out_dir)
    else:
        task.pairs_source = args.pairs
    is_ab = args.pairs is not None and Path(args.pairs).suffix == ".json"
    settings = CompareSettings(
        layer=default_layer(model) if args.layer is None else args.layer,
        methods=methods,
        n_pairs=[int(x) for x in args.n_pairs.split(",")], seeds=args.seeds,
        coefs=[float(x) for x in args.coefs.split(",")], kl_budget=args.kl_budget,
        norm=args.norm, chat=is_ab,
        position=args.position or ("ab_letter" if is_ab else "mean"),
        max_new_tokens=args.max_new_tokens, sae=args.sae, sae_select=args.sae_select,
        lora_steps=args.lora_steps, lora_batch_size=args.lora_batch_size,
        lora_rank=args.lora_rank, lora_lr=args.lora_lr, lora_scales=lora_scales)
    result = compare(model, pairs, task, settings, kl_prompts, progress=True)
    files = write_outputs(result, out_dir)
    summary = result.summary()
    if args.json:
        emit_json({"baseline": result.baseline, "common_norm": result.common_norm,
                  "layer": settings.layer, "summary": summary, "files": files})
        return 0
    print(f"layer {settings.layer}; baseline {result.baseline:.4f}; common norm "
          f"{result.common_norm:.3f}; best effect within KL <= {args.kl_budget:g} "
          f"(mean ± sd over {args.seeds} seeds)")
    ns = sorted({x["n_pairs"] for x in summary})
    width = max(10, *(len(x["method"]) + 2 for x in summary))
    print("method".ljust(width) + "".join(f"{n:>18}" for n in ns))
    for m in dict.fromkeys(x["method"] for x in summary):
        cells = {x["n_pairs"]: x for x in summary if x["method"] == m}
        print(m.ljust(width) + "".join(
            (f"{cells[n]['effect_mean']:+.3f} ± {cells[n]['effect_std']:.3f}" if n in cells
             else "-").rjust(18) for n in ns))
    print("cost to obtain the intervention: wall seconds / peak extra MB (mean over seeds)")
    for m in dict.fromkeys(x["method"] for x in summary):
        cells = {x["n_pairs"]: x for x in summary if x["method"] == m}
        print(m.ljust(width) + "".join(
            (f"{cells[n]['seconds_mean']:.2f} s / {cells[n]['peak_mb_mean']:.0f} MB"
             if n in cells and "seconds_mean" in cells[n] else "-").rjust(18) for n in ns))
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def _methods(text: str) -> list[str]:
    """``--methods`` as a list, every name checked before the model loads."""
    from avec.studies.compare import REGISTRY

    methods = [m.strip() for m in text.split(",") if m.strip()]
    valid = [*REGISTRY, *FINETUNE_METHODS]
    bad = [m for m in methods if m not in valid]
    if bad or not methods:
        what = f"unknown method {bad[0]!r}" if bad else "no method given"
        raise ValueError(f"--methods: {what}; choose from {', '.join(valid)}")
    if len(set(methods)) < len(methods):
        raise ValueError(f"--methods names a method twice: {text!r}")
    return methods


def _synthetic_pool(model: Any, args: argparse.Namespace, out_dir: Path) -> tuple[list[Any], str]:
    """Pairs for ``--concept`` written by the model itself, saved to DIR/pairs.jsonl."""
    from avec.generation.synthetic import DEFAULT_TEMPERATURE, generate_pairs, save_generated

    log(f"no --pairs: {model.name} writes {args.synthetic_pairs} synthetic pairs for "
        f"{args.concept!r} (seed {args.seed})")
    made = generate_pairs(model, args.concept, args.synthetic_pairs, contrast=args.contrast,
                          seed=args.seed, progress=True)
    if not made:
        raise ValueError(f"{model.name} produced no acceptable pairs for {args.concept!r}; "
                         f"pass --pairs FILE or use a stronger --model")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pairs.jsonl"
    save_generated(made, path, args.concept,
                   _generator_info(model, args.seed, DEFAULT_TEMPERATURE), args.contrast)
    if len(made) < args.synthetic_pairs:
        log(f"warning: only {len(made)} of {args.synthetic_pairs} synthetic pairs were usable")
    log(f"wrote {len(made)} pairs to {path}")
    return [g.pair for g in made], f"synthetic: {path} ({len(made)} pairs by {model.name}, " \
                                   f"seed {args.seed})"


def _generator_info(model: Any, seed: int, temperature: float) -> dict[str, Any]:
    return {"model": model.name, "source": model.source, "seed": seed,
            "temperature": temperature}


def cmd_pairs(args: argparse.Namespace) -> int:
    from avec.generation.synthetic import DEFAULT_TEMPERATURE, generate_pairs, save_generated

    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    model = common.load_model_for(args)
    pairs = generate_pairs(model, args.concept, args.n, contrast=args.contrast, seed=args.seed,
                           temperature=temperature, max_attempts=args.max_attempts,
                           progress=True)
    if not pairs:
        raise ValueError(f"{model.name} produced no acceptable pairs for {args.concept!r}; "
                         f"raise --max-attempts or use a stronger --model")
    generator = _generator_info(model, args.seed, temperature)
    save_generated(pairs, args.output, args.concept, generator, args.contrast)
    info = {"output": args.output, "pairs": len(pairs), "requested": args.n,
            "generator": generator}
    if args.json:
        emit_json(info)
    else:
        print(f"wrote {len(pairs)} of {args.n} requested pairs to {args.output} "
              f"(written by {model.name}, seed {args.seed})")
    return 0


def add_parsers(sub: Any) -> None:
    _add_compare_parser(sub)
    _add_pairs_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"compare": cmd_compare,
                                                            "pairs": cmd_pairs}
