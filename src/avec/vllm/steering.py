"""The worker side: which token rows of a vLLM step get which steering, and the op that applies
it to a decoder layer's output.

vLLM flattens every scheduled token of every running request into one ``[T, d]`` batch (prefill
chunks and decode tokens mixed). Before each step the runner has written the step's layout:
``input_batch.req_ids`` (request order) and ``query_start_loc`` (request i owns rows
``qsl[i]:qsl[i+1]``).

Each running request's steering is compiled once, when the worker first sees it, into a small
program: for every (layer, level) one slot of the :class:`~avec.vllm.bank.SlotBank`, an add
coefficient, a projection coefficient and target, and the positions it covers (``[lo, hi)``,
absolute). Level k at a layer is the request's k-th entry there, so stacked entries apply in
order. Once per step the programs of the step's requests are scattered into persistent tables
``[layer, level, request]`` (updated in place), and each row's request index is written; the
op then reads, per layer and level, its rows' slots and coefficients with a few gathers, and
masks them with the row's absolute position (the op's ``positions`` input), so ``prompt`` /
``generated`` / ``from:K`` hold across chunked prefill, prefix-cache hits and preemption (a
recomputed token keeps its position). A row whose request is not steered reads slot 0 (zeros)
with coefficient 0 and stays exact.

Conditional entries (CAST) are compiled with coefficient 0 and a :class:`Pending` record: while
a request's prompt is being computed, the op adds each of its prompt rows after the first (the
block output ``hidden + residual``, before the layer's own steering) to per-step sums at the
condition's layers; after the step the sums are folded into the request's record (a position is
counted once, even when preemption recomputes it), and once the whole prompt is seen the
condition is decided and, when met, the entry's coefficients are switched on for its generated
tokens. A request whose condition fails reads coefficient 0 and stays exact. Conditional
requests never share prefix-cache entries (their salt is unique), so their prompt is always
computed and seen.

A decoder layer returns ``(hidden, residual)`` whose sum is the residual stream (vLLM fuses the
add into the next layer's norm): ``add`` adds to ``hidden``; ``ablate`` / ``clamp`` take the
projection of ``hidden + residual`` and correct ``hidden`` by it, so the stream is changed exactly
as avec's HF ``steer`` changes a block output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from avec.errors import AvecError
from avec.intervene.conditions import Condition, layers as condition_layers
from avec.vector import SteeringVector
from avec.vllm.bank import SlotBank
from avec.vllm.requests import Entry, SteeringRequestError, condition_of, from_wire
from avec.vllm.store import VectorStore

log = logging.getLogger("avec.vllm")

NO_END = 2**62  # "to the end of the sequence" as a position bound
_FIELDS = ("slot", "add", "proj", "target", "lo", "hi")


@dataclass
class Program:
    """A request's steering, compiled: one row per (entry, layer), in application order."""

    layer: np.ndarray
    level: np.ndarray
    slot: np.ndarray
    add: np.ndarray
    proj: np.ndarray
    target: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    slots: tuple[int, ...]  # the bank references this request holds (one per entry)
    # per conditional entry (by index): its rows, whose add/proj stay 0 until it is met
    gated: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def switch_on(self, entry: int) -> None:
        """A conditional entry's condition is met: its rows steer."""
        rows, add, proj = self.gated[entry]
        self.add[rows], self.proj[rows] = add, proj


@dataclass
class Pending:
    """A request's conditions while its prompt is being seen: the running sums of its prompt
    rows after the first at each condition layer, and the next prompt position to count."""

    conditions: dict[int, Condition]  # entry index -> condition
    n_prompt: int
    layers: list[int]
    d_model: int
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    count: float = 0.0
    seen: int = 1  # position 0 (the first token) is never read

    def decide(self) -> list[int]:
        """The entries whose condition holds on the prompt's mean states."""
        means = {L: (self.sums[L] / max(self.count, 1.0)).unsqueeze(0) if L in self.sums
                 else torch.zeros(1, self.d_model) for L in self.layers}
        return [i for i, cond in self.conditions.items() if bool(cond.met(means)[0])]


def compile_program(entries: tuple[Entry, ...], slots: list[int], n_prompt: int) -> Program:
    """The program of ``entries`` whose vectors sit in ``slots`` (one per entry), for a request
    with ``n_prompt`` prompt tokens; conditional entries start switched off."""
    rows: list[tuple[int, int, int, float, float, float, int, int]] = []
    depth: dict[int, int] = {}
    owner: list[int] = []
    for index, (e, slot) in enumerate(zip(entries, slots)):
        if e.positions == "all":
            lo, hi = 0, NO_END
        elif e.positions == "prompt":
            lo, hi = 0, n_prompt
        elif e.positions == "generated":
            lo, hi = n_prompt, NO_END
        else:
            lo, hi = int(e.positions), NO_END
        add, proj = (e.coef, 0.0) if e.op == "add" else (0.0, e.coef)
        target = e.value if e.op == "clamp" else 0.0
        for L in e.layers:
            k = depth.get(L, 0)
            depth[L] = k + 1
            rows.append((L, k, slot, add, proj, target, lo, hi))
            owner.append(index)
    cols = list(zip(*rows)) if rows else [()] * 8
    ints, floats = np.int64, np.float64
    program = Program(*(np.asarray(c, dtype=t) for c, t in zip(
        cols, (ints, ints, ints, floats, floats, floats, ints, ints))), slots=tuple(slots))
    owners = np.asarray(owner, dtype=np.int64)
    for index, e in enumerate(entries):
        if e.when is not None:
            mine = np.flatnonzero(owners == index)
            program.gated[index] = (mine, program.add[mine].copy(), program.proj[mine].copy())
            program.add[mine], program.proj[mine] = 0.0, 0.0
    return program


class Observation:
    """One step's reading of pending requests' prompt rows: per request column the positions
    to count (``[lo, hi)``), and sums at each condition layer."""

    def __init__(self, pending: list[tuple[int, str, Pending]], n: int, d: int,
                 device: torch.device) -> None:
        self.pending = pending
        lo, hi = np.zeros(n + 1, dtype=np.int64), np.zeros(n + 1, dtype=np.int64)
        for i, _, p in pending:
            lo[i], hi[i] = p.seen, p.n_prompt
        self.lo, self.hi = torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device)
        self.layers = {L for _, _, p in pending for L in p.layers}
        self.sums = {L: torch.zeros(n + 1, d, dtype=torch.float32, device=device)
                     for L in self.layers}
        self.counts: torch.Tensor | None = None

    def observe(self, stream: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                layer: int) -> None:
        inside = ((positions >= self.lo.index_select(0, rows))
                  & (positions < self.hi.index_select(0, rows))).to(torch.float32)
        self.sums[layer].index_add_(0, rows, stream.float() * inside[:, None])
        if self.counts is None:  # the positions counted do not depend on the layer
            self.counts = torch.zeros_like(self.lo, dtype=torch.float32).index_add_(
                0, rows, inside)

    def fold(self) -> list[tuple[str, Pending]]:
        """Add this step's sums into the requests' records; the requests whose prompt is now
        fully seen."""
        done = []
        counts = self.counts.cpu() if self.counts is not None else None
        for i, rid, p in self.pending:
            if counts is None:
                continue
            n = float(counts[i])
            for L in p.layers:
                part = self.sums[L][i].cpu()
                p.sums[L] = p.sums[L] + part if L in p.sums else part
            p.count += n
            p.seen += int(n)
            if p.seen >= p.n_prompt:
                done.append((rid, p))
        return done


class StepTables:
    """The persistent per-step tables (``[layer, level, request]``, updated in place) and the
    row -> request index of the step being run."""

    def __init__(self, n_layers: int, device: torch.device, dtype: torch.dtype) -> None:
        self.n_layers, self.device, self.dtype = n_layers, device, dtype
        self.levels = 0
        self.requests = 0
        self.data: dict[str, torch.Tensor] = {}
        self.row_request = torch.zeros(0, dtype=torch.long, device=device)
        self._allocate(1, 1)
        self.spare = 0
        self.depth = [0] * n_layers  # levels in use at each layer this step
        self.projects = [[False] for _ in range(n_layers)]  # per layer, per level

    def _allocate(self, levels: int, requests: int) -> None:
        shape = (self.n_layers, levels, requests)
        self.data = {name: torch.zeros(shape, dtype=torch.long if name in ("slot", "lo", "hi")
                                       else self.dtype, device=self.device)
                     for name in _FIELDS}
        self.levels, self.requests = levels, requests

    def fill(self, programs: list[tuple[int, Program]], counts: np.ndarray) -> None:
        """Write this step: ``programs`` are (batch index, program) of the steered requests,
        ``counts`` the rows each request of the batch has."""
        n = len(counts)
        depth = max(int(p.level.max()) + 1 for _, p in programs)
        if depth > self.levels or n + 1 > self.requests:
            self._allocate(max(depth, self.levels), max(n + 1, 2 * self.requests))
        else:
            for t in self.data.values():
                t.zero_()
        index = np.concatenate([np.full(len(p.layer), i) for i, p in programs])
        layer = np.concatenate([p.layer for _, p in programs])
        level = np.concatenate([p.level for _, p in programs])
        where = tuple(torch.from_numpy(a).to(self.device) for a in (layer, level, index))
        for name in _FIELDS:
            values = torch.from_numpy(np.concatenate([getattr(p, name) for _, p in programs]))
            self.data[name].index_put_(where, values.to(self.data[name].dtype).to(self.device))
        self.depth = [0] * self.n_layers
        self.projects = [[False] * depth for _ in range(self.n_layers)]
        proj = np.concatenate([p.proj for _, p in programs]) != 0
        for L, k, p in zip(layer.tolist(), level.tolist(), proj.tolist()):
            self.depth[L] = max(self.depth[L], k + 1)
            self.projects[L][k] = self.projects[L][k] or p
        # column n is never written: rows past the scheduled tokens (padding) read it as zeros
        self.spare = n
        self.row_request = torch.from_numpy(np.repeat(np.arange(n), counts)).to(self.device)

    def rows(self, T: int) -> torch.Tensor:
        """The request column of each of the op's ``T`` rows (padding rows: the spare one)."""
        have = self.row_request.shape[0]
        if T > have:
            pad = torch.full((T - have,), self.spare, dtype=torch.long, device=self.device)
            self.row_request = torch.cat([self.row_request, pad])
        return self.row_request[:T]


class WorkerState:
    """Per-worker-process steering state (vLLM runs one model per process): the vector store,
    the slot bank, each running request's program, the runner of the step being executed and
    that step's tables, and how often the op ran at each layer."""

    def __init__(self) -> None:
        self.store: VectorStore | None = None
        self.bank: SlotBank | None = None
        self.tables: StepTables | None = None
        self.runner: Any = None
        self.in_step = False
        self.ready = False  # this step's tables are written (or the step has no steering)
        self.steered = False
        self.calls: dict[int, int] = {}
        self.n_layers = 0
        # request id -> (its runner state object, its program), while the runner holds it
        self.programs: dict[str, tuple[Any, Program]] = {}
        self.pending: dict[str, Pending] = {}  # conditional requests not yet decided
        self.observation: Observation | None = None  # this step's, when any is pending
        self.decisions = {"met": 0, "not_met": 0}  # conditional entries decided so far

    def begin_step(self, runner: Any) -> None:
        self.runner = runner
        self.in_step = True
        self.ready = False
        self.observation = None

    def end_step(self) -> None:
        self.in_step = False
        self.ready = False
        observation, self.observation = self.observation, None
        if observation is not None:
            for rid, p in observation.fold():
                self._decide(rid, p)

    def _decide(self, rid: str, p: Pending) -> None:
        self.pending.pop(rid, None)
        held = self.programs.get(rid)
        if held is None:
            return
        met = p.decide()
        for index in met:
            held[1].switch_on(index)
        self.decisions["met"] += len(met)
        self.decisions["not_met"] += len(p.conditions) - len(met)

    def step_tables(self, hidden: torch.Tensor) -> StepTables | None:
        """This step's tables, written on the op's first call in the step; ``None`` outside a
        step (profile, warm-up or compile runs are never steered) or when nothing is steered."""
        if not self.in_step:
            return None
        if not self.ready:
            self.steered = self._prepare(hidden)
            self.ready = True
        return self.tables if self.steered else None

    def _prepare(self, hidden: torch.Tensor) -> bool:
        runner = self.runner
        if self.bank is None:
            self.bank = SlotBank(self.n_layers, hidden.shape[-1], hidden.dtype, hidden.device)
            self.tables = StepTables(self.n_layers, hidden.device, hidden.dtype)
        self._release_finished(runner.requests)
        batch = runner.input_batch
        n = batch.num_reqs
        programs, pending = [], []
        for i, rid in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(rid)
            if state is None:
                continue
            held = self.programs.get(rid)
            program = held[1] if held is not None else self._compile(rid, state, hidden)
            if rid in self.pending:
                p = self.pending[rid]
                if p.seen >= p.n_prompt:  # nothing left to see (a one-token prompt)
                    self._decide(rid, p)
                else:
                    pending.append((i, rid, p))
            if len(program.layer):
                programs.append((i, program))
        if not programs:
            return False
        qsl = runner.query_start_loc.np[:n + 1]
        assert self.tables is not None
        self.tables.fill(programs, np.diff(qsl).astype(np.int64))
        if pending:
            self.observation = Observation(pending, n, hidden.shape[-1], hidden.device)
        return True

    def _compile(self, rid: str, state: Any, hidden: torch.Tensor) -> Program:
        """The program of a request the worker sees for the first time. If its steering no
        longer resolves (a vector file removed or changed since admission), raising here would
        fail every request of the step: this request is logged and runs unsteered instead."""
        assert self.bank is not None
        entries: tuple[Entry, ...] = ()
        slots: list[int] = []
        conditions: dict[int, Condition] = {}
        try:
            entries = from_wire(getattr(state.sampling_params, "extra_args", None),
                                self.n_layers)
            for i, e in enumerate(entries):
                cond = condition_of(e, self._load_condition, self.n_layers, hidden.shape[-1])
                if cond is not None:
                    conditions[i] = cond
            for e in entries:
                slots.append(self.bank.acquire(e.digest, lambda e=e: self._load(e)))
        except (SteeringRequestError, AvecError, OSError, ValueError) as exc:
            for slot in slots:
                self.bank.release(slot)
            log.error("avec: request %s runs UNSTEERED: its steering no longer resolves in "
                      "the worker (%s)", rid, exc)
            entries, slots, conditions = (), [], {}
        n_prompt = int(state.num_prompt_tokens)
        program = compile_program(entries, slots, n_prompt)
        self.programs[rid] = (state, program)
        if conditions:
            self.pending[rid] = Pending(conditions, n_prompt, sorted(
                {L for c in conditions.values() for L in condition_layers(c)}),
                hidden.shape[-1])
        return program

    def _load_condition(self, name: str, digest: str) -> SteeringVector:
        if self.store is None:
            self.store = VectorStore.from_env()
        stored = self.store.get(name)
        if stored is None:
            raise AvecError(f"condition vector file {name!r} is gone")
        if stored.digest != digest:
            raise AvecError(f"condition vector file {name!r} changed since the request was "
                            f"admitted")
        return stored.vector

    def _load(self, e: Entry) -> SteeringVector:
        if self.store is None:
            self.store = VectorStore.from_env()
        stored = self.store.get(e.name)
        if stored is None:
            raise AvecError(f"vector file {e.name!r} is gone")
        if stored.digest != e.digest:
            raise AvecError(f"vector file {e.name!r} changed since the request was admitted")
        width = self.bank.d_model if self.bank is not None else stored.vector.width
        if stored.vector.width != width:
            raise AvecError(f"vector {e.name!r} has width {stored.vector.width}, not {width}")
        return stored.vector

    def _release_finished(self, running: dict[str, Any]) -> None:
        """Give back the slots of requests the runner no longer holds (finished or aborted;
        a preempted request keeps its state, and its slots, until it resumes). A request id
        that now names another state object (aborted, then resubmitted) is compiled anew."""
        assert self.bank is not None
        gone = [rid for rid, (state, _) in self.programs.items() if running.get(rid) is not state]
        for rid in gone:
            self.pending.pop(rid, None)
            for slot in self.programs.pop(rid)[1].slots:
                self.bank.release(slot)


def apply(state: WorkerState, hidden: torch.Tensor, residual: torch.Tensor,
          positions: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s steered ``hidden`` (a new tensor; the input is not modified)."""
    state.calls[layer] = state.calls.get(layer, 0) + 1
    out = hidden.clone()
    tables = state.step_tables(hidden)
    if tables is None:
        return out
    observation = state.observation
    if observation is not None and layer in observation.layers:
        observation.observe(hidden + residual, tables.rows(out.shape[0]), positions, layer)
    if tables.depth[layer] == 0:
        return out
    bank = state.bank
    assert bank is not None
    rows = tables.rows(out.shape[0])
    directions, inv_norm = bank.directions[layer], bank.inv_norm[layer]
    data = tables.data
    for k in range(tables.depth[layer]):
        slot = data["slot"][layer, k].index_select(0, rows)
        inside = ((positions >= data["lo"][layer, k].index_select(0, rows))
                  & (positions < data["hi"][layer, k].index_select(0, rows)))
        v = directions.index_select(0, slot)
        out += (data["add"][layer, k].index_select(0, rows) * inside)[:, None] * v
        if tables.projects[layer][k]:
            u = v * inv_norm.index_select(0, slot)[:, None]
            dot = ((out + residual) * u).sum(-1)
            coef = data["proj"][layer, k].index_select(0, rows) * inside
            out += (coef * (data["target"][layer, k].index_select(0, rows) - dot))[:, None] * u
    return out
