"""The worker side: which token rows of a vLLM step get which steering, and the op that applies
it to a decoder layer's output.

vLLM flattens every scheduled token of every running request into one ``[T, d]`` batch (prefill
chunks and decode tokens mixed). Before each step the runner has written the step's layout:
``input_batch.req_ids`` (request order) and ``query_start_loc`` (request i owns rows
``qsl[i]:qsl[i+1]``). The op receives each row's absolute position, so ``prompt`` /
``generated`` / ``from:K`` are counted on the request's own tokens, also across chunked prefill,
prefix-cache hits and preemption (a recomputed token keeps its position).

A decoder layer returns ``(hidden, residual)`` whose sum is the residual stream (vLLM fuses the
add into the next layer's norm): ``add`` adds to ``hidden``; ``ablate`` / ``clamp`` take the
projection of ``hidden + residual`` and correct ``hidden`` by it, so the stream is changed exactly
as avec's HF ``steer`` changes a block output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from avec.errors import AvecError
from avec.vllm.requests import Entry, SteeringRequestError, parse
from avec.vllm.store import VectorStore


log = logging.getLogger("avec.vllm")


@dataclass
class _Item:
    request: int  # index in the step's batch
    entry: Entry


@dataclass
class StepPlan:
    """The steering of one step: per layer, the (request, entry) pairs to apply, in order."""

    spans: list[tuple[int, int]]  # rows of each request
    n_prompt: list[int]  # prompt tokens of each request
    first_positions: list[int] | None = None  # position of each request's first row
    by_layer: dict[int, list[_Item]] = field(default_factory=dict)


class WorkerState:
    """Per-worker-process steering state (vLLM runs one model per process): the vector store,
    the runner of the step being executed and that step's plan, and how often the op ran."""

    def __init__(self) -> None:
        self.store: VectorStore | None = None
        self.runner: Any = None
        self.in_step = False
        self.plan: StepPlan | None = None
        self.plan_built = False
        self.calls: dict[int, int] = {}
        self.n_layers = 0

    def begin_step(self, runner: Any) -> None:
        self.runner = runner
        self.in_step = True
        self.plan = None
        self.plan_built = False

    def end_step(self) -> None:
        self.in_step = False
        self.plan = None
        self.plan_built = False

    def current_plan(self) -> StepPlan | None:
        if not self.in_step:
            return None  # a profile, warm-up or compile run: never steered
        if not self.plan_built:
            self.plan = self._build()
            self.plan_built = True
        return self.plan

    def _build(self) -> StepPlan | None:
        runner = self.runner
        batch = runner.input_batch
        n = batch.num_reqs
        req_ids = batch.req_ids[:n]
        qsl = runner.query_start_loc.np[:n + 1]
        plan: StepPlan | None = None
        for i, rid in enumerate(req_ids):
            state = runner.requests.get(rid)
            if state is None:
                continue
            entries = getattr(state, "_avec_entries", None)
            if entries is None:
                entries = self._entries(state)
                state._avec_entries = entries
            if not entries:
                continue
            if plan is None:
                plan = StepPlan([(int(qsl[j]), int(qsl[j + 1])) for j in range(n)],
                                [int(batch.num_prompt_tokens[j]) for j in range(n)])
            for e in entries:
                for L in e.layers:
                    plan.by_layer.setdefault(L, []).append(_Item(i, e))
        return plan

    def _entries(self, state: Any) -> tuple[Entry, ...]:
        if self.store is None:
            self.store = VectorStore.from_env()
        # validated already at admission (the front end); parsed again here against this
        # process's own store, so a worker never trusts a pickled object. If that fails now
        # (a vector file removed or broken since admission), raising here would fail every
        # request of the step: this request is logged and runs unsteered instead.
        try:
            return parse(state.sampling_params.extra_args, self.store, self.n_layers)
        except (SteeringRequestError, AvecError, OSError) as exc:
            log.error("avec: request %s runs UNSTEERED: its steering no longer resolves in "
                      "the worker (%s)", getattr(state, "req_id", "?"), exc)
            return ()


def _span(item: _Item, plan: StepPlan, positions: torch.Tensor) -> tuple[int, int]:
    """The rows of the item's request that its ``positions`` select. A request's rows hold
    consecutive positions, so every selection is one contiguous range, found from the first
    row's position (read once per request and step, shared by all layers and entries)."""
    start, end = plan.spans[item.request]
    if end <= start:
        return start, start
    if plan.first_positions is None:
        starts = [min(s, positions.numel() - 1) for s, _ in plan.spans]
        plan.first_positions = positions[torch.tensor(starts)].tolist()
    p0 = int(plan.first_positions[item.request])
    spec = item.entry.positions
    if spec == "all":
        return start, end
    if spec == "prompt":
        return start, start + max(0, min(plan.n_prompt[item.request] - p0, end - start))
    threshold = plan.n_prompt[item.request] if spec == "generated" else int(spec)
    return start + max(0, min(threshold - p0, end - start)), end


def apply(state: WorkerState, hidden: torch.Tensor, residual: torch.Tensor,
          positions: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s steered ``hidden`` (a new tensor; the input is not modified)."""
    state.calls[layer] = state.calls.get(layer, 0) + 1
    out = hidden.clone()
    plan = state.current_plan()
    items = plan.by_layer.get(layer) if plan is not None else None
    if not items:
        return out
    for item in items:
        a, b = _span(item, plan, positions)
        if b <= a:
            continue
        e = item.entry
        v, unit = e.stored.at(layer, out.device, out.dtype)
        rows = out[a:b]  # a view: updated in place
        if e.op == "add":
            rows += e.coef * v
            continue
        target = 0.0 if e.op == "ablate" else e.value
        rows += (e.coef * (target - (rows + residual[a:b]) @ unit)).unsqueeze(-1) * unit
    return out
