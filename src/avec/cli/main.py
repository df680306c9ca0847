"""The ``avec`` command: a thin layer over the library. Every command takes ``--json``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

from avec.cli import discover as cli_discover
from avec.cli import maze as cli_maze
from avec.cli import refusal as cli_refusal
from avec.cli import sae as cli_sae
from avec.cli.common import emit_json as _emit_json
from avec.cli.common import load_model_for as _load
from avec.cli.common import log as _log
from avec._version import __version__
from avec.cli.args import (check_text_args, count_arg, finite_float, int_arg, output_dir,
                           output_file, seed_arg, steer_positions)

DEFAULT_DEMO_OUTPUT = "avec-demo-vector.safetensors"


def _position(value: str) -> str | int:
    try:
        return int(value)
    except ValueError:
        return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="HF directory, hub id (offline if cached) or .gguf file "
                        "(default: the packaged SmolLM2-135M-Instruct)")
    p.add_argument("--block-path", default=None,
                   help="dotted path of the decoder blocks, for architectures avec does not know")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def _add_vector_io_args(p: argparse.ArgumentParser) -> None:
    """Arguments shared by `convert` and `export`."""
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, type=output_file)
    p.add_argument("--layers", default=None,
                   help="keep only these layers: 14, 4,8,12 or 4-20[:step]")
    p.add_argument("--model-hint", default=None,
                   help="GGUF model hint (default: the model type the vector was made on)")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avec", description="Activation engineering: build steering vectors from contrast "
        "pairs and apply them to language models. Layer L means the output of decoder block L "
        "(0-based), for reading and for steering.")
    parser.add_argument("--version", action="version", version=f"avec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="build a steering vector from contrast pairs",
                       description="Read activations of positive and negative texts and save "
                       "their direction (mean difference by default) as a safetensors file.")
    p.add_argument("--pairs", required=True,
                   help='.jsonl with {"positive", "negative"[, "prompt"]} per line, or CAA-style '
                        'A/B .json (question, answer_matching_behavior, answer_not_matching_behavior)')
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "ab"],
                   help="pair file format (auto: .json is A/B, anything else JSONL)")
    p.add_argument("--layer", type=int_arg, action="append", required=True,
                   help="0-based block whose output is read (repeat for several layers)")
    p.add_argument("--method", default="mean_diff",
                   choices=["mean_diff", "pca", "probe", "random", "actadd"],
                   help="direction method (default mean_diff; actadd takes exactly one pair)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the random control direction")
    p.add_argument("--position", type=_position, default=None,
                   help="token read: last (default; ab_letter for A/B data), mean, ab_letter or "
                        "an int index")
    p.add_argument("--chat", action="store_true",
                   help="wrap texts in the model's chat template (default: texts as given)")
    p.add_argument("--batch-size", type=count_arg, default=32)
    p.add_argument("--output", "-o", required=True, type=output_file,
                   help="output .safetensors file")
    _add_model_args(p)

    p = sub.add_parser("generate", help="greedy completions, unsteered and steered side by side",
                       description="Generate greedily for each prompt (chat template applied "
                       "when the model has one) without steering and at each coefficient.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help=".txt (one per line), .json or .jsonl prompts")
    p.add_argument("--vector", help="steering vector file (.safetensors, or a llama.cpp/repeng "
                   ".gguf control vector)")
    p.add_argument("--coef", type=finite_float, action="append",
                   help="coefficient multiplying the vector as extracted (repeat; default 1)")
    p.add_argument("--layer", type=int_arg, action="append",
                   help="steer only these layers of the vector (default: all its layers)")
    p.add_argument("--positions", type=steer_positions, default="all",
                   help="all (default), prompt, generated, or from:K / K (token index >= K)")
    p.add_argument("--op", default="add", choices=["add", "ablate", "clamp"])
    p.add_argument("--clamp-value", type=finite_float, default=None,
                   help="projection that --op clamp sets (default: the vector's clamp_value "
                        "metadata, e.g. the harmful-prompt mean of a refusal direction, else 0)")
    p.add_argument("--everywhere", action="store_true",
                   help="with --op ablate: project the direction out of the residual stream "
                        "everywhere (input of block 0 and every attention and MLP output), as "
                        "Arditi et al. do, instead of at the vector's own layers")
    p.add_argument("--max-new-tokens", type=count_arg, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--batch-size", type=count_arg, default=16)
    p.add_argument("--backend", choices=["hf", "llama.cpp"], default="hf",
                   help="hf: transformers (every op); llama.cpp: the .gguf model run by "
                        "llama-cpp-python, steered by its control vectors (op add only, layers "
                        ">= 1)")
    _add_model_args(p)

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
        _add_model_args(p)

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
    _add_model_args(p)

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
    p.add_argument("--methods", default=",".join(["mean_diff", "pca", "probe", "actadd", "random"]),
                   help="comma-separated, from mean_diff, pca, probe, actadd, random, sae and "
                        "sae_clamp (the SAE methods need --sae; default: the first five)")
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
    p.add_argument("--position", type=_position, default=None,
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
    p.add_argument("--name", default="", help="name of the behaviour or concept for the report")
    p.add_argument("--output-dir", "-o", required=True, type=output_dir)
    _add_model_args(p)

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
    _add_model_args(g)

    p = sub.add_parser("info", help="show the metadata of a vector file (.safetensors or .gguf)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("convert", help="convert a vector between avec's safetensors format and "
                       "llama.cpp/repeng control-vector GGUF (chosen by the file suffixes)",
                       description="Convert a vector file. INPUT and OUTPUT are .safetensors "
                       "(avec) or .gguf (llama.cpp --control-vector, repeng export_gguf). Layer "
                       "L stays layer L: the output of block L in all three tools.")
    _add_vector_io_args(p)

    p = sub.add_parser("export", help="export a vector for another engine: --format gguf writes "
                       "a llama.cpp control vector",
                       description="Export a vector file for another engine. --format gguf "
                       "writes a llama.cpp control vector (general.architecture "
                       "'controlvector', float32 tensors direction.N added at the output of "
                       "0-based block N, as `llama-cli --control-vector FILE` applies them). "
                       "llama.cpp cannot steer block 0, so a vector on layer 0 is refused: "
                       "pass --layers without 0.")
    _add_vector_io_args(p)
    p.add_argument("--format", choices=["gguf"], default="gguf")

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request steering",
                       description="Serve the model over an OpenAI-compatible API "
                       "(/v1/models, /v1/chat/completions, /v1/vectors; OpenAPI at "
                       "/openapi.json). A request may carry `steering`: a list of {vector, coef, "
                       "layers?, op?, positions?}, where vector names a registered vector (files "
                       "in --vectors DIR are named by their stem). Requests that arrive together "
                       "run as one batch, each row with its own steering. Greedy by default; temperature "
                       "> 0 samples, reproducibly with seed (top_p is not supported). The web "
                       "playground (unsteered vs steered, streamed) is at /.")
    _add_model_args(p)
    p.add_argument("--vectors", default=None, help="directory of vector files to register")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["hf", "llama.cpp"], default="hf",
                   help="hf: transformers, batched, every op; llama.cpp: the .gguf model run "
                        "by llama-cpp-python, one request at a time, op add only, layers >= 1")
    p.add_argument("--api-key", default=os.environ.get("AVEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $AVEC_API_KEY, or none); "
                        "an empty key is refused")
    p.add_argument("--skip-bad-vectors", action="store_true",
                   help="skip (and log) bad files in --vectors DIR instead of refusing to start")
    p.add_argument("--max-tokens", type=count_arg, default=512,
                   help="cap on max_tokens per request (default 512)")
    p.add_argument("--max-queue", type=count_arg, default=64,
                   help="requests waiting to start; beyond it a 429 with Retry-After (default 64)")
    p.add_argument("--request-timeout", type=finite_float, default=300.0, metavar="S",
                   help="seconds from arrival to the last token; the request's work stops then "
                        "and it gets a 504 (default 300)")
    p.add_argument("--max-abs-coef", type=finite_float, default=1000.0,
                   help="cap on |coef| of a steering entry (default 1000)")
    p.add_argument("--max-abs-value", type=finite_float, default=1.0e4,
                   help="cap on |value| of a clamp entry (default 10000)")
    p.add_argument("--max-vectors", type=count_arg, default=256,
                   help="cap on the number of vectors in the store (default 256)")
    p.add_argument("--max-store-mb", type=finite_float, default=1024.0,
                   help="cap on the vector store's total tensor size in MiB (default 1024)")
    p.add_argument("--idle-timeout", type=count_arg, default=5, metavar="S",
                   help="close a connection that sends no complete request for S seconds "
                        "(default 5)")
    p.add_argument("--body-timeout", type=finite_float, default=60.0, metavar="S",
                   help="close a connection whose request body is not complete S seconds "
                        "after its headers (default 60)")
    p.add_argument("--max-connections", type=count_arg, default=256,
                   help="open connections beyond which uvicorn answers 503 (default 256)")

    cli_refusal.add_parsers(sub, _add_model_args)
    cli_maze.add_parsers(sub)
    cli_discover.add_parsers(sub, _add_model_args)
    cli_sae.add_parsers(sub, _add_model_args)

    p = sub.add_parser("demo", help="build an 'ocean' vector from 36 built-in pairs and show "
                       "unsteered vs steered completions on the default model")
    p.add_argument("--layer", type=int_arg, default=14)
    p.add_argument("--coef", type=finite_float, default=8.0)
    p.add_argument("--max-new-tokens", type=count_arg, default=48)
    p.add_argument("--output", "-o", default=DEFAULT_DEMO_OUTPUT, type=output_file,
                   help=f"where to save the vector (default {DEFAULT_DEMO_OUTPUT})")
    _add_model_args(p)
    return parser


def cmd_extract(args: argparse.Namespace) -> int:
    from avec.data import load_pairs
    from avec.directions.extract import extract

    pairs = load_pairs(args.pairs, args.format)
    is_ab = args.format == "ab" or (args.format == "auto" and Path(args.pairs).suffix == ".json")
    position = args.position if args.position is not None else ("ab_letter" if is_ab else "last")
    model = _load(args)
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
        _emit_json(info)
    else:
        norms = ", ".join(f"L{k}: {v:.2f}" for k, v in vec.norms().items())
        print(f"saved {out} ({len(pairs)} pairs, {args.method}, read at {position}; norms {norms})")
    return 0


def _columns(headers: list[str], bodies: list[str]) -> str:
    width = max(40, shutil.get_terminal_size((160, 24)).columns)
    col = max(20, (width - 3 * (len(headers) - 1)) // len(headers))
    wrapped = [textwrap.wrap(" ".join(b.split()), col) or [""] for b in bodies]
    lines = [" | ".join(h.ljust(col) for h in headers), "-+-".join("-" * col for _ in headers)]
    for i in range(max(len(w) for w in wrapped)):
        lines.append(" | ".join((w[i] if i < len(w) else "").ljust(col) for w in wrapped))
    return "\n".join(line.rstrip() for line in lines)


def cmd_generate(args: argparse.Namespace) -> int:
    from avec.data.pairs import load_located_prompts
    from avec.generation.hf import steered_completions
    from avec.vector import load_vector

    located = _located_args(args.prompt, "--prompt") if args.prompt else \
        load_located_prompts(args.prompts_file)
    prompts = [text for _where, text in located]
    if args.vector is None and args.coef and any(c != 0 for c in args.coef):
        raise ValueError("--coef needs --vector")
    if args.vector is None and (args.layer or args.op != "add"):
        raise ValueError("--layer and --op need --vector")
    if args.everywhere and (args.op != "ablate" or args.backend != "hf"):
        raise ValueError("--everywhere goes with --op ablate on the hf backend")
    coefs = args.coef if args.coef else ([1.0] if args.vector else [0.0])
    model = _load(args)
    chat = False if args.no_chat else None
    _check_fit(model, located, chat, args.max_new_tokens)
    vector = load_vector(args.vector, model) if args.vector else None
    run_coefs = list(dict.fromkeys([0.0, *coefs]))  # unsteered first, for side-by-side display
    clamp = args.clamp_value
    if clamp is None:
        clamp = float(vector.metadata.get("clamp_value", 0.0)) if vector is not None else 0.0
    if args.everywhere:
        results = _ablate_everywhere(model, prompts, vector, run_coefs, args, chat)
    elif args.backend == "llama.cpp":
        from avec.generation import llamacpp

        results = llamacpp.steered_completions(
            model, prompts, vector, run_coefs, layers=args.layer, positions=args.positions,
            op=args.op, max_new_tokens=args.max_new_tokens, chat=chat, progress=True)
    else:
        results = steered_completions(
            model, prompts, vector, run_coefs, layers=args.layer, positions=args.positions,
            op=args.op, value=clamp, max_new_tokens=args.max_new_tokens, chat=chat,
            batch_size=args.batch_size, progress=True)
    if args.json:
        wanted = [r for r in results if r.coef in coefs]
        _emit_json([r.to_dict() for r in wanted])
        return 0
    for prompt in dict.fromkeys(prompts):
        row = [r for r in results if r.prompt == prompt]
        headers = ["unsteered" if r.coef == 0 else f"coef {r.coef:+g}" for r in row]
        print(f"\n>>> {prompt}")
        print(_columns(headers, [r.text for r in row]))
    return 0


def _located_args(values: list[str], option: str) -> list[tuple[str, str]]:
    """``(where, text)`` for texts given on the command line, each checked like a file's."""
    from avec.data.textfile import check_text

    return [(f"{option} {i}", check_text(v, f"{option} {i}", option.lstrip("-")))
            for i, v in enumerate(values, start=1)]


def _check_fit(model: Any, located: list[tuple[str, str]], chat: bool | None,
               max_new_tokens: int) -> None:
    """Refuse, naming the prompt, any prompt whose tokens (chat template included) and
    ``max_new_tokens`` do not fit the model's context."""
    from avec.generation.hf import format_prompt
    from avec.models.context import check_texts

    texts = [text for _where, text in located]
    ids = [format_prompt(model, text, chat)[0] for text in texts]
    check_texts(model, texts, ids, reserve=max_new_tokens,
                reserve_for="new tokens (--max-new-tokens)",
                sources=[where for where, _text in located])


def _ablate_everywhere(model: Any, prompts: list[str], vector: Any, coefs: list[float],
                       args: argparse.Namespace, chat: bool | None) -> list[Any]:
    from avec.intervene.ablation import ablate_direction
    from avec.cli.refusal import _one_direction
    from avec.generation.hf import Completion, steered_completions

    _layer, direction = _one_direction(vector, args.layer[0] if args.layer else None)
    out = []
    for coef in coefs:
        with ablate_direction(model, direction, coef=coef):
            rows = steered_completions(model, prompts, None, [0.0],
                                       max_new_tokens=args.max_new_tokens, chat=chat,
                                       batch_size=args.batch_size, progress=True)
        out += [Completion(r.prompt, coef, r.text) for r in rows]
    order = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return sorted(out, key=lambda r: order[r.prompt])


EVAL_DESCRIPTION = """Metrics: ab (CAA A/B p(matching letter), steering the tokens after the
question), mmlu (the same on prompt/correct/incorrect items: p(correct)), kl (KL of next-token
distributions on prompts vs the unsteered model, last position), ppl (perplexity of text files,
read as given, steered at every position), logit-diff (logit(A) - logit(B) after each prompt),
concept (greedy completions scored by keyword rate or embedding similarity to --concept)."""


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

    model = _load(args)
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
        _check_fit(model, [(f"{args.prompts}: prompt {i}", text) for i, text in
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
        _emit_json(out)
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
    model = _load(args)
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
        _emit_json([{"rank": r, "text": "".join(e.tokens), "token": e.tokens[e.token_index],
                     "token_index": e.token_index, "score": round(e.score, 4)}
                    for r, e in enumerate(examples, start=1)])
    else:
        for r, e in enumerate(examples, start=1):
            snippet = " ".join("".join(e.tokens).split())[:90]
            print(f"{r:>3} {e.score:8.2f}  [{e.tokens[e.token_index].strip()}]  {snippet}")
        if args.html:
            print(f"wrote {args.html}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from avec.data import load_pairs, load_prompts
    from avec.data.demo import CONCEPT_PROMPTS, NEUTRAL_PROMPTS
    from avec.evaluate.ab import load_ab_items
    from avec.studies.compare.run import CompareSettings, Task, compare, default_layer, write_outputs

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
    model = _load(args)
    if task.prompts:  # generated from: the prompt and its new tokens must fit
        _check_fit(model, [(f"{args.prompts or 'built-in prompts'}: prompt {i}", text)
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
        methods=[m.strip() for m in args.methods.split(",")],
        n_pairs=[int(x) for x in args.n_pairs.split(",")], seeds=args.seeds,
        coefs=[float(x) for x in args.coefs.split(",")], kl_budget=args.kl_budget,
        norm=args.norm, chat=is_ab,
        position=args.position or ("ab_letter" if is_ab else "mean"),
        max_new_tokens=args.max_new_tokens, sae=args.sae, sae_select=args.sae_select)
    result = compare(model, pairs, task, settings, kl_prompts, progress=True)
    files = write_outputs(result, out_dir)
    summary = result.summary()
    if args.json:
        _emit_json({"baseline": result.baseline, "common_norm": result.common_norm,
                    "layer": settings.layer, "summary": summary, "files": files})
        return 0
    print(f"layer {settings.layer}; baseline {result.baseline:.4f}; common norm "
          f"{result.common_norm:.3f}; best effect within KL <= {args.kl_budget:g} "
          f"(mean ± sd over {args.seeds} seeds)")
    ns = sorted({x["n_pairs"] for x in summary})
    print("method".ljust(10) + "".join(f"{n:>18}" for n in ns))
    for m in dict.fromkeys(x["method"] for x in summary):
        cells = {x["n_pairs"]: x for x in summary if x["method"] == m}
        print(m.ljust(10) + "".join(
            (f"{cells[n]['effect_mean']:+.3f} ± {cells[n]['effect_std']:.3f}" if n in cells
             else "-").rjust(18) for n in ns))
    for kind, path in files.items():
        print(f"wrote {kind}: {path}")
    return 0


def _synthetic_pool(model: Any, args: argparse.Namespace, out_dir: Path) -> tuple[list[Any], str]:
    """Pairs for ``--concept`` written by the model itself, saved to DIR/pairs.jsonl."""
    from avec.generation.synthetic import DEFAULT_TEMPERATURE, generate_pairs, save_generated

    _log(f"no --pairs: {model.name} writes {args.synthetic_pairs} synthetic pairs for "
         f"{args.concept!r} (seed {args.seed})")
    made = generate_pairs(model, args.concept, args.synthetic_pairs, contrast=args.contrast,
                          seed=args.seed, progress=True)
    if not made:
        raise ValueError(f"{model.name} produced no acceptable pairs for {args.concept!r}; "
                         f"pass --pairs FILE or use a stronger --model")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "pairs.jsonl"
    save_generated(made, path, args.concept, _generator_info(model, args.seed, DEFAULT_TEMPERATURE),
                   args.contrast)
    if len(made) < args.synthetic_pairs:
        _log(f"warning: only {len(made)} of {args.synthetic_pairs} synthetic pairs were usable")
    _log(f"wrote {len(made)} pairs to {path}")
    return [g.pair for g in made], f"synthetic: {path} ({len(made)} pairs by {model.name}, " \
                                   f"seed {args.seed})"


def _generator_info(model: Any, seed: int, temperature: float) -> dict[str, Any]:
    return {"model": model.name, "source": model.source, "seed": seed,
            "temperature": temperature}


def cmd_pairs(args: argparse.Namespace) -> int:
    from avec.generation.synthetic import DEFAULT_TEMPERATURE, generate_pairs, save_generated

    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    model = _load(args)
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
        _emit_json(info)
    else:
        print(f"wrote {len(pairs)} of {args.n} requested pairs to {args.output} "
              f"(written by {model.name}, seed {args.seed})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from avec.evaluate.sweep import parse_layers
    from avec.formats.gguf_control import write_gguf_control_vector
    from avec.vector import load_vector

    vec = load_vector(args.input)
    if args.layers:
        vec = vec.select(parse_layers(args.layers))
    out = Path(args.output)
    if getattr(args, "format", None) == "gguf" or out.suffix.lower() == ".gguf":
        write_gguf_control_vector(vec, out, model_hint=args.model_hint)
    elif out.suffix.lower() == ".safetensors":
        vec.save(out)
    else:
        raise ValueError(f"{out}: the output must end in .safetensors or .gguf")
    info = {"input": args.input, "output": str(out), "layers": vec.layers, "width": vec.width}
    if args.json:
        _emit_json(info)
    else:
        print(f"wrote {out} ({len(vec.layers)} layers, width {vec.width})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from avec.serve import Engine, LlamaCppEngine, Limits, VectorRegistry, create_app
        from avec.serve.app import check_api_key
        from avec.serve.server import uvicorn_config
    except ImportError as exc:
        raise ValueError(f"avec serve needs the serve extra ({exc.name} is missing): "
                         f"pip install 'avec[serve]'") from None
    check_api_key(args.api_key)
    limits = Limits(max_tokens=args.max_tokens, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout, max_abs_coef=args.max_abs_coef,
                    max_abs_value=args.max_abs_value, max_vectors=args.max_vectors,
                    max_store_bytes=int(args.max_store_mb * 1024 * 1024))
    if args.vectors and not Path(args.vectors).is_dir():
        raise ValueError(f"--vectors {args.vectors}: not a directory of vector files")
    model = _load(args)
    registry = VectorRegistry(model, limits.max_vector_bytes, max_vectors=limits.max_vectors,
                              max_total_bytes=limits.max_store_bytes)
    names = registry.load_dir(args.vectors, skip_bad=args.skip_bad_vectors,
                              on_skip=lambda path, why: _log(f"skipped {path}: {why}")
                              ) if args.vectors else []
    engine_cls = LlamaCppEngine if args.backend == "llama.cpp" else Engine
    engine = engine_cls(model, registry, limits)
    app = create_app(engine, api_key=args.api_key, model_id=model.name, limits=limits)
    _log(f"serving {model.name} on http://{args.host}:{args.port} "
         f"({len(names)} vectors{': ' + ', '.join(names) if names else ''}; "
         f"API key {'required' if args.api_key is not None else 'not set'})")
    try:
        uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port,
                                      idle_timeout_s=args.idle_timeout,
                                      body_timeout_s=args.body_timeout,
                                      max_connections=args.max_connections)).run()
    finally:
        engine.shutdown()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from avec.vector import load_vector

    info = load_vector(args.file).describe()
    if args.json:
        _emit_json(info)
    else:
        for key, value in info.items():
            print(f"{key:>14}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from avec.data.demo import DEMO_PAIRS, DEMO_PROMPTS, DEMO_TARGET_WORDS
    from avec.directions.extract import extract
    from avec.generation.hf import steered_completions

    model = _load(args)
    t0 = time.perf_counter()
    vec = extract(model, DEMO_PAIRS, [args.layer], progress=True)
    vec.metadata["source_pairs"] = "avec built-in demo pairs (ocean vs everyday topics)"
    _log(f"extracted a mean-difference vector from {len(DEMO_PAIRS)} built-in pairs at "
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
        _emit_json(summary)
        return 0
    print(f"\navec demo: steering {model.name} toward the ocean (layer {args.layer}, "
          f"coef {args.coef:+g})")
    for prompt in DEMO_PROMPTS:
        row = [r for r in results if r.prompt == prompt]
        print(f"\n>>> {prompt}")
        print(_columns(["unsteered", f"steered (coef {args.coef:+g})"], [r.text for r in row]))
    print(f"\ncompletions mentioning the ocean/sea: unsteered {hits(0.0)}/{len(DEMO_PROMPTS)}, "
          f"steered {hits(args.coef)}/{len(DEMO_PROMPTS)}")
    print(f"vector saved to {out}  (try: avec generate --vector {out} --coef 8 --prompt 'Hi!')")
    return 0


COMMANDS = {"extract": cmd_extract, "generate": cmd_generate, "eval": cmd_eval, "sweep": cmd_eval,
            "top-examples": cmd_top_examples, "compare": cmd_compare, "pairs": cmd_pairs,
            "info": cmd_info, "convert": cmd_convert, "export": cmd_convert, "serve": cmd_serve,
            "demo": cmd_demo, **cli_refusal.COMMANDS, **cli_maze.COMMANDS,
            **cli_discover.COMMANDS, **cli_sae.COMMANDS}


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        check_text_args(args)
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        _error(args, "interrupted")
        return 130
    except Exception as exc:  # the boundary: a message and an exit code, never a traceback
        if os.environ.get("AVEC_DEBUG"):
            raise
        code, message = describe_failure(exc)
        _error(args, message)
        return code


def describe_failure(exc: BaseException) -> tuple[int, str]:
    """``(exit code, message)`` for an exception that reached the command line: 2 for bad
    input (avec's own errors, malformed files, unreadable paths, inputs too large or too deeply
    nested), 1 for anything else, which is a bug in avec."""
    import struct

    from avec.errors import AvecError

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = ValueError  # type: ignore[misc,assignment]  # noqa: N806
    if isinstance(exc, (AvecError, ValueError)):
        return 2, str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return 2, f"{where}{exc.strerror or exc}"
    if isinstance(exc, (SafetensorError, struct.error)):
        return 2, f"malformed file ({exc})"
    if isinstance(exc, RecursionError):
        return 2, "the input is nested too deeply to process; simplify it"
    if isinstance(exc, MemoryError):
        return 2, ("out of memory; use smaller inputs (shorter texts, fewer prompts, a smaller "
                   "--batch-size or --max-new-tokens)")
    return 1, (f"internal error ({type(exc).__name__}: {exc}); this is a bug in avec, please "
               f"report it (AVEC_DEBUG=1 shows the traceback)")


def _error(args: argparse.Namespace, message: str) -> None:
    """One line on stderr, whatever the terminal's encoding, at most 4,000 characters."""
    if len(message) > 4000:
        message = message[:4000] + " [...]"
    text = f"avec {args.command}: error: {message}"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    print(text.encode(encoding, "backslashreplace").decode(encoding, "replace"), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
