"""``avec serve``: an OpenAI-compatible HTTP server with per-request steering."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable

from avec.cli import common
from avec.cli.args import count_arg, finite_float
from avec.cli.common import add_model_args, log
from avec.serve.limits import ConnectionLimits, Limits


def _add_serve_parser(sub: Any) -> None:
    lim, conn = Limits(), ConnectionLimits()  # the defaults live with the server
    store_mb = lim.max_store_bytes / 2**20
    """``avec serve``."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with per-request steering",
                       description="Serve the model over an OpenAI-compatible API "
                       "(/v1/models, /v1/chat/completions, /v1/vectors; OpenAPI at "
                       "/openapi.json). A request may carry `steering`: a list of {vector, coef, "
                       "layers?, op?, positions?}, where vector names a registered vector (files "
                       "in --vectors DIR are named by their stem). Requests that arrive together "
                       "run as one batch, each row with its own steering. Greedy by default; "
                       "temperature > 0 samples, reproducibly with seed (top_p is not supported). "
                       "The web playground (unsteered vs steered, streamed) is at /.")
    add_model_args(p)
    p.add_argument("--vectors", default=None, help="directory of vector files to register")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback; 0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=["hf", "llama.cpp", "vllm"], default="hf",
                   help="hf: transformers, batched, every op; llama.cpp: the .gguf model run "
                        "by llama-cpp-python, one request at a time, op add only, layers >= 1; "
                        "vllm: vLLM's engine with avec's plugin (continuous batching, every op, "
                        "[d] vectors; needs avec[vllm], see docs/vllm.md)")
    p.add_argument("--default-steering", default=None, metavar="JSON|FILE",
                   help="server-wide steering entries (a JSON list, or a file holding one) "
                        "applied before every request's own; a request switches them off with "
                        "\"default_steering\": false")
    p.add_argument("--max-batch", type=count_arg, default=lim.max_batch,
                   help=f"requests generated together (hf: rows per batch; vllm: "
                        f"max_num_seqs) (default {lim.max_batch})")
    p.add_argument("--eager", action="store_true",
                   help="vllm: no torch.compile (starts in ~25 s instead of ~90 s on the "
                        "default model; a little slower per token)")
    p.add_argument("--tensor-parallel-size", type=count_arg, default=1,
                   help="vllm: tensor-parallel ranks (default 1)")
    p.add_argument("--api-key", default=os.environ.get("AVEC_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $AVEC_API_KEY, or none); "
                        "an empty key is refused")
    p.add_argument("--skip-bad-vectors", action="store_true",
                   help="skip (and log) bad files in --vectors DIR instead of refusing to start")
    p.add_argument("--max-tokens", type=count_arg, default=lim.max_tokens,
                   help=f"cap on max_tokens per request (default {lim.max_tokens})")
    p.add_argument("--max-queue", type=count_arg, default=lim.max_queue,
                   help=f"requests waiting to start; beyond it a 429 with Retry-After "
                        f"(default {lim.max_queue})")
    p.add_argument("--request-timeout", type=finite_float, default=lim.request_timeout_s,
                   metavar="S",
                   help="seconds from arrival to the last token; the request's work stops then "
                        f"and it gets a 504 (default {lim.request_timeout_s:g})")
    p.add_argument("--max-abs-coef", type=finite_float, default=lim.max_abs_coef,
                   help=f"cap on |coef| of a steering entry (default {lim.max_abs_coef:g})")
    p.add_argument("--max-abs-value", type=finite_float, default=lim.max_abs_value,
                   help=f"cap on |value| of a clamp entry (default {lim.max_abs_value:.0f})")
    p.add_argument("--max-vectors", type=count_arg, default=lim.max_vectors,
                   help=f"cap on the number of vectors in the store (default {lim.max_vectors})")
    p.add_argument("--max-store-mb", type=finite_float, default=store_mb,
                   help=f"cap on the vector store's total tensor size in MiB "
                        f"(default {store_mb:g})")
    p.add_argument("--idle-timeout", type=count_arg, default=conn.idle_timeout_s, metavar="S",
                   help="close a connection that sends no complete request for S seconds "
                        f"(default {conn.idle_timeout_s})")
    p.add_argument("--body-timeout", type=finite_float, default=conn.body_timeout_s, metavar="S",
                   help="close a connection whose request body is not complete S seconds "
                        f"after its headers (default {conn.body_timeout_s:g})")
    p.add_argument("--max-connections", type=count_arg, default=conn.max_connections,
                   help=f"open connections beyond which uvicorn answers 503 "
                        f"(default {conn.max_connections})")


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
                    max_batch=args.max_batch,
                    request_timeout_s=args.request_timeout, max_abs_coef=args.max_abs_coef,
                    max_abs_value=args.max_abs_value, max_vectors=args.max_vectors,
                    max_store_bytes=int(args.max_store_mb * 1024 * 1024))
    if args.vectors and not Path(args.vectors).is_dir():
        raise ValueError(f"--vectors {args.vectors}: not a directory of vector files")
    default = _default_steering(args.default_steering)
    if args.backend == "vllm":
        model, make_engine = _vllm_engine(args, limits)
    else:
        model = common.load_model_for(args)
        engine_cls = LlamaCppEngine if args.backend == "llama.cpp" else Engine
        make_engine = lambda registry: engine_cls(model, registry, limits)  # noqa: E731
    registry = VectorRegistry(model, limits.max_vector_bytes, max_vectors=limits.max_vectors,
                              max_total_bytes=limits.max_store_bytes)
    names = registry.load_dir(args.vectors, skip_bad=args.skip_bad_vectors,
                              on_skip=lambda path, why: log(f"skipped {path}: {why}")
                              ) if args.vectors else []
    engine = make_engine(registry)
    try:
        engine.set_default(default)
    except Exception:
        engine.shutdown()
        raise
    # uvicorn re-raises SIGTERM/SIGINT once it has stopped, which ends this process before a
    # `finally` runs: the engine (vLLM's processes, for --backend vllm) stops when the app
    # shuts down instead, while uvicorn shuts down gracefully
    app = create_app(engine, api_key=args.api_key, model_id=model.name, limits=limits,
                     on_shutdown=engine.shutdown)
    log(f"serving {model.name} on http://{args.host}:{args.port} "
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


def _default_steering(text: str | None) -> list[Any]:
    """``--default-steering``: entries from JSON text or a file holding it, schema-checked."""
    if not text:
        return []
    from pydantic import TypeAdapter, ValidationError

    from avec.formats.jsonsafe import JSONInputError, loads
    from avec.serve.schemas import SteeringSpec

    path = Path(text)
    if not text.lstrip().startswith(("[", "{")) and path.is_file():
        text = path.read_text(encoding="utf-8")
    try:
        raw = loads(text, max_depth=8)
        return TypeAdapter(list[SteeringSpec]).validate_python(raw if isinstance(raw, list)
                                                               else [raw])
    except (JSONInputError, ValidationError) as exc:
        raise ValueError(f"--default-steering: {exc}") from None


def _vllm_engine(args: argparse.Namespace, limits: Any) -> tuple[Any, Callable[[Any], Any]]:
    """The model stand-in and engine factory of ``--backend vllm``."""
    from avec.cli.vllm import NO_VLLM
    from avec.vllm import vllm_available

    if not vllm_available():
        raise ValueError(NO_VLLM)
    if args.block_path:
        raise ValueError("--block-path applies to the hf backend only")
    from avec.models.loading import model_directory
    from avec.vllm.engine import VLLMEngine, VLLMModel

    directory = model_directory(args.model)
    model = VLLMModel(directory, name=_model_name(args.model, directory))
    log(f"starting vLLM on {directory} ({'eager' if args.eager else 'compiled'}, "
        f"tensor parallel {args.tensor_parallel_size})")
    return model, lambda registry: VLLMEngine(
        directory, registry, limits, model=model, enforce_eager=args.eager,
        tensor_parallel_size=args.tensor_parallel_size)


def _model_name(requested: str | None, directory: str) -> str:
    if requested is None:
        from avec.models.loading import DEFAULT_MODEL_FILE

        return DEFAULT_MODEL_FILE.removesuffix(".gguf")
    return Path(requested).name.removesuffix(".gguf") if Path(requested).exists() else requested


def add_parsers(sub: Any) -> None:
    _add_serve_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"serve": cmd_serve}
