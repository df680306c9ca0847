"""``avec sae train|features|steer``: train a TopK sparse autoencoder on one layer's
activations, find the latents a concept moves, and steer generation with a latent."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from avec.cli import common
from avec.cli.args import count_arg, finite_float, int_arg, output_dir, seed_arg
from avec.report import write_json
from avec.cli.common import add_model_args, emit_json, log

DESCRIPTION = """Sparse autoencoders (SAEs) on the output of one decoder block (avec's layer L),
saved in the SAELens layout (cfg.json + sae_weights.safetensors). `train` reads activations of
a corpus (text files, or texts the model samples itself) and trains a TopK SAE; `features`
ranks latents on contrast pairs or texts and writes their top-activating examples; `steer`
shows greedy completions with one latent clamped or added."""


def _train_parser(ssub: Any) -> None:
    from types import SimpleNamespace

    from avec.sae.train import SAETrainConfig

    d = SimpleNamespace(**{f.name: f.default for f in fields(SAETrainConfig)})
    q = ssub.add_parser("train", help="train a TopK SAE on one layer's activations",
                        description="Collect block --layer's output at every token of a corpus "
                        "(after the first, and after the chat template's shared head in "
                        "templated texts), train a TopK SAE on it, and save it with "
                        "train.json (settings, corpus, FVE, L0, dead latents, and the model's "
                        "loss with the SAE spliced in on a held-out slice of the texts).")
    q.add_argument("--layer", type=int_arg, required=True, help="block whose output is read")
    q.add_argument("--texts", nargs="+", metavar="FILE",
                   help=".txt files (one document per blank-line-separated paragraph) or "
                        ".json/.jsonl prompt files")
    q.add_argument("--sample", type=count_arg, metavar="N",
                   help="have the model write N texts (seeded, temperature 1), saved as "
                        "DIR/corpus.jsonl; with --texts, the corpus is both")
    q.add_argument("--prompts", nargs="+", metavar="FILE", default=None,
                   help="seed prompts for --sample (.json/.jsonl/.txt, e.g. an instruction "
                        "set; default: 40 built-in openers and requests)")
    q.add_argument("--sample-tokens", type=count_arg, default=128,
                   help="new tokens per sampled text (default 128)")
    q.add_argument("--latents", type=count_arg, default=None,
                   help="number of latents d_sae (default 8 x d_model)")
    q.add_argument("--k", type=count_arg, default=d.k,
                   help=f"latents kept per token (default {d.k})")
    length = q.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=count_arg, default=d.epochs,
                        help=f"passes over the activations (default {d.epochs})")
    length.add_argument("--steps", type=count_arg, default=None,
                        help="optimiser steps (instead of --epochs)")
    q.add_argument("--lr", type=finite_float, default=d.lr, help=f"Adam learning rate ({d.lr})")
    q.add_argument("--batch-size", type=count_arg, default=d.batch_size,
                   help=f"activation rows per step ({d.batch_size})")
    q.add_argument("--max-tokens", type=count_arg, default=128,
                   help="tokens read per text (default 128)")
    q.add_argument("--holdout", type=finite_float, default=0.1,
                   help="fraction of the texts held out for the evaluation (default 0.1; 0 "
                        "skips the loss evaluation)")
    q.add_argument("--seed", type=seed_arg, default=d.seed,
                   help="seeds the sampled corpus, the held-out split and the training")
    q.add_argument("--output", "-o", required=True, type=output_dir, help="SAE directory to write")
    add_model_args(q)


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: train, features, steer",
                       description=DESCRIPTION)
    ssub = p.add_subparsers(dest="sae_command", required=True, metavar="STEP")
    _train_parser(ssub)

    q = ssub.add_parser("features", help="rank SAE latents for a concept; top examples HTML",
                        description="Rank latents by mean activation on the positive minus the "
                        "negative texts of contrast pairs (or on texts alone), and write "
                        "features.json and latent_<i>.html with the texts and tokens where each "
                        "top latent fires most.")
    _sae_args(q)
    src = q.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", help="contrast pairs (.jsonl, or CAA-style A/B .json)")
    src.add_argument("--texts", nargs="+", metavar="FILE",
                     help="positive texts only (.txt split at blank lines, .json/.jsonl)")
    q.add_argument("--top", type=count_arg, default=10, help="latents reported (default 10)")
    q.add_argument("--rank", choices=["selective", "difference"], default="selective",
                   help="with --pairs: activation difference times firing-rate difference "
                        "(selective, default; demotes latents that fire on most texts) or "
                        "activation difference")
    q.add_argument("--position", choices=["mean", "last"], default="mean",
                   help="per-text value: mean over tokens after the first, or the last token")
    q.add_argument("--corpus", nargs="+", metavar="FILE", default=None,
                   help="texts searched for top examples (default: the ranked texts)")
    q.add_argument("--examples", type=count_arg, default=10,
                   help="examples per latent (default 10)")
    q.add_argument("--max-tokens", type=count_arg, default=128)
    q.add_argument("--output", "-o", required=True, type=output_dir, help="output directory")
    add_model_args(q)

    q = ssub.add_parser("steer", help="unsteered vs steered greedy completions with one latent",
                        description="Clamp a latent to a value (keeping the SAE's error) or add "
                        "its decoder direction, at every position of block --layer's output.")
    _sae_args(q)
    q.add_argument("--latent", type=int_arg, required=True)
    how = q.add_mutually_exclusive_group(required=True)
    how.add_argument("--clamp", type=finite_float, metavar="V", help="set the latent to V")
    how.add_argument("--add", type=finite_float, metavar="C", help="add C x its decoder row")
    q.add_argument("--prompt", action="append", required=True, help="repeatable")
    q.add_argument("--max-new-tokens", type=count_arg, default=48)
    chat = q.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="apply the chat template (default: if the model has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false")
    add_model_args(q)


def _sae_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--sae", required=True, help="SAE directory (SAELens layout)")
    q.add_argument("--layer", type=int_arg, default=None,
                   help="block whose output the SAE reads (default: the one it was trained on)")


def _load_sae_and_model(args: argparse.Namespace) -> tuple[Any, Any, int, bool]:
    """``(sae, model, layer, check_site)``; warns when the SAE names another model."""
    from avec.sae import SAEError, load_sae

    sae = load_sae(args.sae)
    model = common.load_model_for(args)
    layer = args.layer if args.layer is not None else sae.cfg.avec_layer
    if layer is None:
        raise SAEError(f"{args.sae}: the SAE does not say which block output it reads "
                       f"(hook {sae.cfg.hook_name!r}); pass --layer")
    if sae.cfg.model_name and sae.cfg.model_name != model.name:
        log(f"warning: the SAE was trained on {sae.cfg.model_name}, not {model.name}")
    return sae, model, layer, args.layer is None


def cmd_train(args: argparse.Namespace) -> int:
    from avec.sae.pipeline import (CorpusConfig, SAEPipelineConfig, read_corpus,
                                   train_sae_on_corpus)

    started = time.perf_counter()
    corpus = CorpusConfig(files=args.texts or (), sample=args.sample, prompts=args.prompts,
                          sample_tokens=args.sample_tokens, max_tokens=args.max_tokens,
                          holdout=args.holdout)
    read = read_corpus(corpus)
    model = common.load_model_for(args)
    config = SAEPipelineConfig(layer=args.layer, corpus=corpus, d_sae=args.latents, k=args.k,
                               lr=args.lr, batch_size=args.batch_size, epochs=args.epochs,
                               steps=args.steps, seed=args.seed)
    result = train_sae_on_corpus(model, config, args.output, read=read, log=log,
                                 started=started)
    summary = result.summary
    if args.json:
        emit_json(summary)
        return 0
    _print_training(summary)
    return 0


def _print_training(summary: dict[str, Any]) -> None:
    m, heldout, ce = (summary["metrics"][key] for key in ("train", "heldout", "ce_loss"))
    print(f"SAE: {summary['d_sae']} latents, k={summary['k']}, layer {summary['layer']}, "
          f"{summary['n_tokens']} tokens, {summary['steps']} steps in "
          f"{summary['seconds']['train']:.1f} s")
    print(f"  train:    FVE {m['fve']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_latents']}")
    if heldout is not None and ce is not None and "error" not in ce:
        recovered = ce["fraction_recovered"]
        print(f"  held-out: FVE {heldout['fve']:.3f}  L0 {heldout['l0']:.1f}  CE "
              f"{ce['ce_clean']:.4f} -> {ce['ce_sae']:.4f} ({ce['ce_increase']:+.4f}; zero "
              f"ablation {ce['ce_zero_ablation']:.4f}, mean ablation "
              f"{ce['ce_mean_ablation']:.4f}; recovered "
              f"{'n/a' if recovered is None else f'{recovered:.3f}'})")
    print(f"wrote {summary['output']}/ (cfg.json, sae_weights.safetensors, train.json)")


_RANKED_BY = {"difference": "mean_positive - mean_negative",
              "selective": "(mean_positive - mean_negative) x max(0, fire_rate_positive - "
                           "fire_rate_negative)"}


def cmd_features(args: argparse.Namespace) -> int:
    from avec.data import load_pairs, pair_texts
    from avec.evaluate.top_examples import render_html
    from avec.sae.corpus import load_texts
    from avec.sae.evaluate import latent_top_examples, rank_latents

    if args.pairs:
        positive, negative = pair_texts(load_pairs(args.pairs))
        source: dict[str, Any] = {"pairs": args.pairs, "n_pairs": len(positive)}
    else:
        positive, negative = load_texts(args.texts), []
        source = {"texts": args.texts, "n_texts": len(positive)}
    corpus = load_texts(args.corpus) if args.corpus else positive + negative
    sae, model, layer, check = _load_sae_and_model(args)
    rows = rank_latents(model, sae, layer, positive, negative or None, args.position,
                        by=args.rank, top=args.top, max_tokens=args.max_tokens, check_site=check)
    examples = latent_top_examples(model, sae, layer, corpus, [r["latent"] for r in rows],
                                   k=args.examples, max_tokens=args.max_tokens,
                                   check_site=check)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    label = "corpus" if args.corpus else "text"
    for row in rows:
        latent = row["latent"]
        page = out / f"latent_{latent}.html"
        page.write_text(render_html(
            examples[latent], f"Latent {latent} at layer {layer}",
            f"SAE {args.sae}; model {model.name}; {len(corpus)} texts searched; activation of "
            f"the latent at every token"), encoding="utf-8")
        row["html"] = page.name
        row["top_examples"] = [
            {f"{label}_index": e.text_index, "score": e.score, "token": e.tokens[e.token_index],
             "token_index": e.token_index,
             **({} if args.corpus else {"positive": e.text_index < len(positive)})}
            for e in examples[latent]]
    result = {"sae": args.sae, "layer": layer, "model": model.name, "position": args.position,
              "source": source, "ranked_by": _RANKED_BY[args.rank] if negative
              else "mean_positive", "latents": rows}
    write_json(out / "features.json", result)
    if args.json:
        emit_json(result)
        return 0
    print(f"top {len(rows)} latents at layer {layer} ({result['ranked_by']}):")
    for row in rows:
        neg = "" if row["mean_negative"] is None else f"  negative {row['mean_negative']:.3f}"
        first = row["top_examples"][0]["token"].strip() if row["top_examples"] else "-"
        print(f"  latent {row['latent']:>6}  score {row['score']:8.3f}  positive "
              f"{row['mean_positive']:.3f}{neg}  top token [{first}]")
    print(f"wrote {out}/features.json and {len(rows)} latent_<i>.html", file=sys.stderr)
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    from avec.generation.hf import variant_completions
    from avec.sae import steer_features

    sae, model, layer, check = _load_sae_and_model(args)
    setting = {args.latent: args.clamp if args.clamp is not None else args.add}
    kind = "clamp" if args.clamp is not None else "add"

    def complete() -> list[str]:  # greedy, under whatever steering is in force
        return variant_completions(model, args.prompt, [(None, 0.0)],
                                   max_new_tokens=args.max_new_tokens, chat=args.chat)[0]

    with steer_features(model, sae, layer, check_site=check, **{kind: setting}):
        steered = complete()
    plain = complete()
    result = {"latent": args.latent, "op": kind, "value": setting[args.latent], "layer": layer,
              "completions": [{"prompt": p, "unsteered": u, "steered": s}
                              for p, u, s in zip(args.prompt, plain, steered)]}
    if args.json:
        emit_json(result)
        return 0
    for row in result["completions"]:
        print(f"prompt:    {row['prompt']}\nunsteered: {row['unsteered']}\n"
              f"steered:   {row['steered']}  ({kind} latent {args.latent} = "
              f"{result['value']:g})\n")
    return 0


_STEPS = {"train": cmd_train, "features": cmd_features, "steer": cmd_steer}


def cmd_sae(args: argparse.Namespace) -> int:
    return _STEPS[args.sae_command](args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"sae": cmd_sae}
