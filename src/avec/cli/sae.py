"""``avec sae train|features|steer``: train a TopK sparse autoencoder on one layer's
activations, find the latents a concept moves, and steer generation with a latent."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from avec.cli.args import count_arg, finite_float, int_arg, output_dir, seed_arg

DESCRIPTION = """Sparse autoencoders (SAEs) on the output of one decoder block (avec's layer L),
saved in the SAELens layout (cfg.json + sae_weights.safetensors). `train` reads activations of
a corpus (text files, or texts the model samples itself) and trains a TopK SAE; `features`
ranks latents on contrast pairs or texts and writes their top-activating examples; `steer`
shows greedy completions with one latent clamped or added."""


def _train_parser(ssub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
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


def add_parsers(sub: Any, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("sae", help="sparse autoencoders: train, features, steer",
                       description=DESCRIPTION)
    ssub = p.add_subparsers(dest="sae_command", required=True, metavar="STEP")
    _train_parser(ssub, add_model_args)

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
    from avec.cli.common import load_model_for as _load, log as _log
    from avec.sae import SAEError, load_sae

    sae = load_sae(args.sae)
    model = _load(args)
    layer = args.layer if args.layer is not None else sae.cfg.avec_layer
    if layer is None:
        raise SAEError(f"{args.sae}: the SAE does not say which block output it reads "
                       f"(hook {sae.cfg.hook_name!r}); pass --layer")
    if sae.cfg.model_name and sae.cfg.model_name != model.name:
        _log(f"warning: the SAE was trained on {sae.cfg.model_name}, not {model.name}")
    return sae, model, layer, args.layer is None


def _split(texts: list[str], holdout: float, seed: int) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): a seeded random ``holdout`` fraction held out."""
    if not 0 <= holdout < 1:
        raise ValueError(f"--holdout must be in [0, 1), got {holdout}")
    if holdout == 0:
        return texts, []
    if len(texts) < 2:
        raise ValueError(f"a held-out slice needs at least 2 texts, got {len(texts)}; pass more "
                         f"texts or --holdout 0")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_held = min(len(texts) - 1, max(1, round(holdout * len(texts))))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [texts[i] for i in train], [texts[i] for i in held]


def _tqdm_progress() -> tuple[Callable[[int, int, float], None], Callable[[], None]]:
    """A ``train_sae`` progress callback drawing a tqdm bar, and a function closing it."""
    from tqdm.auto import tqdm

    bar: list[Any] = []

    def progress(step: int, total: int, loss: float) -> None:
        if not bar:
            bar.append(tqdm(total=total, desc="train SAE", unit="step", leave=False))
        bar[0].update(1)
        if step % 20 == 0 or step == total:
            bar[0].set_postfix(loss=f"{loss:.4g}")

    return progress, lambda: bar[0].close() if bar else None


def cmd_train(args: argparse.Namespace) -> int:
    from avec._version import __version__
    from avec.cli.common import emit_json as _emit_json, load_model_for as _load, log as _log
    from avec.sae import SAEError, SAETrainConfig, sae_metrics, save_sae, train_sae
    from avec.sae.corpus import (collect_activations, load_texts, sample_corpus,
                                 template_skips)
    from avec.sae.evaluate import reconstruction_loss_increase

    started = time.perf_counter()
    if not args.texts and not args.sample:
        raise SAEError("give a corpus: --texts FILE..., --sample N, or both")
    if args.prompts and not args.sample:
        raise SAEError("--prompts are seeds for --sample N; pass --sample too")
    texts = load_texts(args.texts) if args.texts else []
    seeds = load_texts(args.prompts) if args.prompts else None
    model = _load(args)
    (layer,) = model.check_layers([args.layer])
    config = SAETrainConfig(d_sae=args.latents or 8 * model.d_model, k=args.k, lr=args.lr,
                            batch_size=args.batch_size, epochs=args.epochs, steps=args.steps,
                            seed=args.seed)
    corpus: dict[str, Any] = {"source": "+".join(
        s for s, on in (("files", args.texts), ("sampled", args.sample)) if on)}
    if args.texts:
        corpus.update(files=[str(p) for p in args.texts], n_file_texts=len(texts))
    sampled: list[str] = []
    sample_seconds = 0.0
    if args.sample:
        _log(f"sampling {args.sample} texts of up to {args.sample_tokens} tokens (seed "
             f"{args.seed})")
        t0 = time.perf_counter()
        sampled = sample_corpus(model, args.sample, args.sample_tokens, args.seed, seeds,
                                progress=True)
        sample_seconds = time.perf_counter() - t0
        corpus.update(seed=args.seed, temperature=1.0, max_new_tokens=args.sample_tokens,
                      n_sampled=len(sampled), file="corpus.jsonl",
                      prompts=[str(p) for p in args.prompts] if args.prompts else "built-in")
        texts = texts + sampled
    train_texts, held_texts = _split(texts, args.holdout, args.seed)
    corpus.update(n_texts=len(texts), n_train=len(train_texts), n_heldout=len(held_texts))
    t0 = time.perf_counter()
    acts = collect_activations(model, train_texts, layer, args.max_tokens,
                               skip_first=template_skips(model, train_texts), progress=True)
    collect_seconds = time.perf_counter() - t0
    _log(f"{acts.shape[0]} tokens of {len(train_texts)} texts at layer {layer}; training "
         f"{config.d_sae} latents, k={config.k}")
    progress, close = _tqdm_progress()
    try:
        sae, record = train_sae(acts.to(model.device), config, progress)
    finally:
        close()
    sae.cfg.hook_layer, sae.cfg.hook_name = layer, f"blocks.{layer}.hook_resid_post"
    sae.cfg.model_name = model.name
    sae.cfg.metadata["corpus"] = corpus
    out = Path(args.output)
    save_sae(sae, out)  # before the evaluation, so a failing evaluation loses no training
    if sampled:
        with open(out / "corpus.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in sampled)
    t0 = time.perf_counter()
    heldout: dict[str, Any] | None = None
    ce: dict[str, Any] | None = None
    if held_texts:
        try:
            held_skips = template_skips(model, held_texts)
            held_acts = collect_activations(model, held_texts, layer, args.max_tokens,
                                            skip_first=held_skips)
            heldout = sae_metrics(sae, held_acts.to(model.device))
            ce = reconstruction_loss_increase(model, sae, layer, held_texts, args.max_tokens,
                                              skip_first=held_skips, progress=True)
        except SAEError as err:  # e.g. held-out texts too short to predict a token
            _log(f"warning: no held-out evaluation: {err}")
            heldout = heldout or {"error": str(err)}
            ce = {"error": str(err)}
    summary = {"output": str(out), "layer": layer, "model": model.identity(),
               "d_sae": config.d_sae, "k": config.k, "corpus": corpus,
               "n_tokens": int(acts.shape[0]), "max_tokens": args.max_tokens,
               "skip_first": "1, or the chat template's shared head in templated texts",
               "steps": record["steps"], "epochs": record["epochs"],
               "metrics": {"train": record["metrics"], "heldout": heldout, "ce_loss": ce},
               "seconds": {"sample": sample_seconds, "collect": collect_seconds,
                           "train": record["seconds"],
                           "evaluate": time.perf_counter() - t0,
                           "total": time.perf_counter() - started}}
    document = {**summary, "config": record["config"], "history": record["history"],
                "epoch_losses": record["epoch_losses"], "avec_version": __version__}
    (out / "train.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.json:
        _emit_json(summary)
        return 0
    m = record["metrics"]
    print(f"SAE: {config.d_sae} latents, k={config.k}, layer {layer}, {acts.shape[0]} tokens, "
          f"{record['steps']} steps in {record['seconds']:.1f} s")
    print(f"  train:    FVE {m['fve']:.3f}  L0 {m['l0']:.1f}  dead {m['dead_latents']}")
    if heldout is not None and ce is not None and "error" not in ce:
        recovered = ce["fraction_recovered"]
        print(f"  held-out: FVE {heldout['fve']:.3f}  L0 {heldout['l0']:.1f}  CE "
              f"{ce['ce_clean']:.4f} -> {ce['ce_sae']:.4f} ({ce['ce_increase']:+.4f}; zero "
              f"ablation {ce['ce_zero_ablation']:.4f}, mean ablation "
              f"{ce['ce_mean_ablation']:.4f}; recovered "
              f"{'n/a' if recovered is None else f'{recovered:.3f}'})")
    print(f"wrote {out}/ (cfg.json, sae_weights.safetensors, train.json)")
    return 0


_RANKED_BY = {"difference": "mean_positive - mean_negative",
              "selective": "(mean_positive - mean_negative) x max(0, fire_rate_positive - "
                           "fire_rate_negative)"}


def cmd_features(args: argparse.Namespace) -> int:
    from avec.cli.common import emit_json as _emit_json
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
    (out / "features.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    if args.json:
        _emit_json(result)
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
    from avec.cli.common import emit_json as _emit_json
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
        _emit_json(result)
        return 0
    for row in result["completions"]:
        print(f"prompt:    {row['prompt']}\nunsteered: {row['unsteered']}\n"
              f"steered:   {row['steered']}  ({kind} latent {args.latent} = "
              f"{result['value']:g})\n")
    return 0


_STEPS = {"train": cmd_train, "features": cmd_features, "steer": cmd_steer}


def cmd_sae(args: argparse.Namespace) -> int:
    return _STEPS[args.sae_command](args)


COMMANDS = {"sae": cmd_sae}
