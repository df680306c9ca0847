"""``avec generate``: greedy completions, unsteered and steered side by side."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float, int_arg, steer_positions
from avec.cli.common import add_model_args, check_fit, columns, emit_json
from avec.studies.refusal.direction import one_direction


def _add_generate_parser(sub: Any) -> None:
    """``avec generate``."""
    p = sub.add_parser("generate", help="greedy completions, unsteered and steered side by side",
                       description="Generate greedily for each prompt (chat template applied "
                       "when the model has one) without steering and at each coefficient.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    src.add_argument("--prompts-file", help=".txt (one per line), .json or .jsonl prompts")
    p.add_argument("--vector", help="steering vector file (.safetensors, or a llama.cpp/repeng "
                   ".gguf control vector)")
    p.add_argument("--coef", type=finite_float, action="append",
                   help="coefficient multiplying the vector as extracted (repeat; default: the "
                        "vector's recommended setting from `avec tune`, layers, op and "
                        "positions included)")
    p.add_argument("--coef-scale", type=finite_float, default=None,
                   help="use the recommended coefficient times this (e.g. 0.5, 2)")
    p.add_argument("--layer", type=int_arg, action="append",
                   help="steer only these layers of the vector (default: the recommended "
                        "layers, else all its layers)")
    p.add_argument("--positions", type=steer_positions, default=None,
                   help="all (default), prompt, generated, or from:K / K (token index >= K)")
    p.add_argument("--op", default=None, choices=["add", "ablate", "clamp"],
                   help="add (default), ablate or clamp")
    p.add_argument("--clamp-value", type=finite_float, default=None,
                   help="projection that --op clamp sets (default: the vector's clamp_value "
                        "metadata, e.g. the harmful-prompt mean of a refusal direction, else 0)")
    p.add_argument("--everywhere", action="store_true",
                   help="with --op ablate: project the direction out of the residual stream "
                        "everywhere (input of block 0 and every attention and MLP output), as "
                        "Arditi et al. do, instead of at the vector's own layers")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--condition", metavar="FILE",
                      help="steer only prompts that meet this condition (a condition vector "
                           "file from `avec condition fit`, with its fitted rule): CAST, on the "
                           "generated tokens; every backend")
    cond.add_argument("--when", metavar="JSON",
                      help='a condition in JSON, leaves naming condition vector files: '
                           '{"vector": FILE, "threshold"?: t, "op"?: ">"|"<", "layer"?: L, '
                           '"metric"?: "cosine"|"projection"}, {"all": [...]}, {"any": [...]}, '
                           '{"not": ...}')
    p.add_argument("--per-token", action="store_true",
                   help="re-check the condition before every generated token (hf backend)")
    p.add_argument("--max-new-tokens", type=count_arg, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.add_argument("--batch-size", type=count_arg, default=16)
    p.add_argument("--backend", choices=["hf", "llama.cpp", "vllm"], default="hf",
                   help="hf: transformers (every op); llama.cpp: the .gguf model run by "
                        "llama-cpp-python, steered by its control vectors (op add only, layers "
                        ">= 1); vllm: one vLLM batch through avec's plugin (add, ablate, clamp; "
                        "needs vLLM in this environment)")
    add_model_args(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from avec.data.pairs import load_located_prompts
    from avec.generation.hf import steered_completions
    from avec.vector import load_vector

    located = _located_args(args.prompt, "--prompt") if args.prompt else \
        load_located_prompts(args.prompts_file)
    prompts = [text for _where, text in located]
    if args.vector is None and args.coef and any(c != 0 for c in args.coef):
        raise ValueError("--coef needs --vector")
    if args.vector is None and (args.layer or args.op or args.coef_scale is not None):
        raise ValueError("--layer, --op and --coef-scale need --vector")
    if args.coef and args.coef_scale is not None:
        raise ValueError("--coef-scale scales the recommended coefficient; with --coef give "
                         "the coefficients you want")
    if args.everywhere and (args.op != "ablate" or args.backend != "hf"):
        raise ValueError("--everywhere goes with --op ablate on the hf backend")
    if args.backend == "vllm":
        from avec.cli.vllm import NO_VLLM
        from avec.vllm import vllm_available

        if not vllm_available():
            raise ValueError(NO_VLLM)
    conditional = args.condition is not None or args.when is not None
    if conditional and (args.vector is None or args.everywhere):
        raise ValueError("--condition/--when steer a --vector conditionally (--everywhere is "
                         "unconditional)")
    if args.per_token and (not conditional or args.backend != "hf"):
        raise ValueError("--per-token re-checks a --condition/--when on the hf backend")
    if conditional and args.positions not in (None, "generated"):
        raise ValueError(f"--positions {args.positions}: a conditional vector steers the "
                         f"generated tokens")
    model = common.load_model_for(args)
    chat = False if args.no_chat else None
    check_fit(model, located, chat, args.max_new_tokens)
    vector = load_vector(args.vector, model) if args.vector else None
    when, condition_files = _condition(args, model) if conditional else (None, {})
    coefs = _setting(args, vector)
    if conditional:
        args.positions = "generated"

    run_coefs = list(dict.fromkeys([0.0, *coefs]))  # unsteered first, for side-by-side display
    clamp = args.clamp_value
    if clamp is None:
        clamp = float(vector.metadata.get("clamp_value", 0.0)) if vector is not None else 0.0
    if args.everywhere:
        results = _ablate_everywhere(model, prompts, vector, run_coefs, args, chat)
    elif args.backend == "vllm":
        results = _vllm_completions(model, prompts, vector, run_coefs, args, chat, clamp,
                                    when, condition_files)
    elif args.backend == "llama.cpp":
        from avec.generation import llamacpp

        results = llamacpp.steered_completions(
            model, prompts, vector, run_coefs, layers=args.layer, positions=args.positions,
            op=args.op, max_new_tokens=args.max_new_tokens, chat=chat, progress=True,
            when=when)
    else:
        results = steered_completions(
            model, prompts, vector, run_coefs, layers=args.layer, positions=args.positions,
            op=args.op, value=clamp, max_new_tokens=args.max_new_tokens, chat=chat,
            batch_size=args.batch_size, progress=True, when=when, per_token=args.per_token)
    if args.json:
        wanted = [r for r in results if r.coef in coefs]
        emit_json([r.to_dict() for r in wanted])
        return 0
    for prompt in dict.fromkeys(prompts):
        row = [r for r in results if r.prompt == prompt]
        headers = ["unsteered" if r.coef == 0 else f"coef {r.coef:+g}" for r in row]
        print(f"\n>>> {prompt}")
        print(columns(headers, [r.text for r in row]))
    return 0


def _setting(args: argparse.Namespace, vector: Any) -> list[float]:
    """The coefficients to run; without ``--coef`` the vector's recommended setting fills in
    the coefficient and whatever of layers, op and positions the command did not give."""
    if vector is None:
        args.op, args.positions = args.op or "add", args.positions or "all"
        return [0.0]
    if not args.coef:
        rec = vector.require_recommended(f"the vector {args.vector}")
        args.layer = args.layer or list(rec.layers)
        args.op = args.op or rec.op
        args.positions = args.positions if args.positions is not None else rec.positions
        if args.op == "clamp" and args.clamp_value is None:
            args.clamp_value = rec.value
        from avec.cli.common import log

        scale = 1.0 if args.coef_scale is None else args.coef_scale
        log(f"the vector's recommended setting: coef {rec.coef:g}"
            + (f" x {scale:g}" if scale != 1 else "")
            + f" at layer(s) {list(rec.layers)}, op {rec.op}, positions {rec.positions}")
        return [rec.coef * scale]
    args.op, args.positions = args.op or "add", args.positions or "all"
    return list(args.coef)


def _condition(args: argparse.Namespace, model: Any) -> tuple[Any, dict[str, Any]]:
    """The condition of ``--condition``/``--when`` (leaves name vector files) and the files it
    read, by the name the condition uses."""
    from avec.formats.jsonsafe import JSONInputError, loads
    from avec.intervene.conditions import parse
    from avec.vector import load_vector

    where = "--condition" if args.condition is not None else "--when"
    try:
        spec = {"vector": args.condition} if args.condition is not None else loads(
            args.when, max_depth=16)
    except JSONInputError as exc:
        raise ValueError(f"--when: {exc}") from None
    files: dict[str, Any] = {}

    def resolve(path: str) -> Any:
        files[path] = load_vector(path, model)
        return files[path]

    return parse(spec, resolve, where=where, n_layers=model.n_layers,
                 d_model=model.d_model), files


def _vllm_completions(model: Any, prompts: list[str], vector: Any, coefs: list[float],
                      args: argparse.Namespace, chat: bool | None, clamp: float,
                      when: Any = None, condition_files: dict[str, Any] | None = None
                      ) -> list[Any]:
    from avec.models.loading import model_directory
    from avec.vllm import prepare_process

    prepare_process()
    from avec.vllm.generate import steered_completions

    return steered_completions(model, model_directory(args.model), prompts, vector, coefs,
                               layers=args.layer, positions=args.positions, op=args.op,
                               value=clamp, max_new_tokens=args.max_new_tokens, chat=chat,
                               when=when, condition_vectors=condition_files or {})


def _located_args(values: list[str], option: str) -> list[tuple[str, str]]:
    """``(where, text)`` for texts given on the command line, each checked like a file's."""
    from avec.data.textfile import check_text

    return [(f"{option} {i}", check_text(v, f"{option} {i}", option.lstrip("-")))
            for i, v in enumerate(values, start=1)]


def _ablate_everywhere(model: Any, prompts: list[str], vector: Any, coefs: list[float],
                       args: argparse.Namespace, chat: bool | None) -> list[Any]:
    from avec.intervene.ablation import ablate_direction
    from avec.generation.hf import Completion, steered_completions

    _layer, direction = one_direction(vector, args.layer[0] if args.layer else None)
    out = []
    for coef in coefs:
        with ablate_direction(model, direction, coef=coef):
            rows = steered_completions(model, prompts, None, [0.0],
                                       max_new_tokens=args.max_new_tokens, chat=chat,
                                       batch_size=args.batch_size, progress=True)
        out += [Completion(r.prompt, coef, r.text) for r in rows]
    order = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    return sorted(out, key=lambda r: order[r.prompt])


def add_parsers(sub: Any) -> None:
    _add_generate_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"generate": cmd_generate}
