"""Interventions on block outputs, installed as forward hooks by a context manager.

``add``     h <- h + c * v
``ablate``  h <- h - c * (h . u) u                      (u = v / |v|; c = 1 removes the direction)
``clamp``   h <- h + c * (value - h . u) u              (c = 1 sets the projection on u to value)

``c`` is the coefficient: a number, or one number per batch row (per-row steering: N prompts
with N coefficients in one forward pass). Position selection uses the absolute index of each
token among its row's real tokens (padding excluded): ``"all"``, ``"prompt"`` (tokens of the
first, cache-less forward pass), ``"generated"`` (later tokens) or ``k`` / ``"from:k"`` (index
>= k). Hooks are removed when the ``with`` block ends, also when it raises.

A ``[T, d]`` direction (ActAdd) is added position by position: the token at index p < T gets
row p. Within one ``steer`` call interventions apply in the order given. Steering hooks run before any
other forward hook on the block (so ``output_hidden_states`` and readers see steered values);
with nested ``steer`` contexts the innermost one is applied first.

Any torch module can be steered too: wrap it in :class:`avec.models.modules.ModuleModel`, whose layers
are named sub-modules and whose directions are whole activations (e.g. ``[C, H, W]``).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Sequence, Union

import torch

from avec.errors import SteeringError
from avec.intervene.conditions import Condition, ConditionTracker
from avec.models.hooks import block_output, installed_hooks, replace_block_output
from avec.models.model import Model
from avec.vector import SteeringVector

Op = Literal["add", "ablate", "clamp"]
OPS: tuple[str, ...] = ("add", "ablate", "clamp")
Positions = Union[str, int]
Coef = Union[float, Sequence[float], torch.Tensor]


MAX_POSITION = 2**31 - 1
_FROM = re.compile(r"from:([0-9]{1,10})")


def parse_positions(positions: Positions) -> Positions:
    """Validate a position spec; returns ``"all"``, ``"prompt"``, ``"generated"`` or an int
    start index in ``0..2**31-1`` (``"from:K"`` is K). Bools are refused (``True`` is not
    position 1), and so are negative, oversized and malformed values."""
    if isinstance(positions, bool) or not isinstance(positions, (int, str)):
        raise SteeringError(f"invalid positions {positions!r}"[:200] + "; use 'all', 'prompt', "
                            "'generated', 'from:K' or an int K (tokens at index >= K)")
    if isinstance(positions, int):
        if not 0 <= positions <= MAX_POSITION:
            raise SteeringError(f"positions={positions}"[:80] + f": a start index must be in "
                                f"0..{MAX_POSITION}")
        return positions
    if positions in ("all", "prompt", "generated"):
        return positions
    match = _FROM.fullmatch(positions)
    if match:
        return parse_positions(int(match.group(1)))
    raise SteeringError(f"invalid positions {positions!r}"[:200] + "; use 'all', 'prompt', "
                        "'generated', 'from:K' or an int K (tokens at index >= K)")


@dataclass
class Intervention:
    """One vector applied with its own coefficient, layers, positions and operation.

    With ``when`` (a :mod:`condition <avec.intervene.conditions>`) it is conditional: decided
    per row on the prompt (again before every new token with ``per_token``), it steers the
    generated tokens of the rows that meet the condition and leaves the others exact."""

    vector: SteeringVector
    coef: Coef = 1.0
    layers: Sequence[int] | None = None
    positions: Positions = "all"
    op: Op = "add"
    value: float | dict[int, float] = 0.0
    when: Condition | None = None
    per_token: bool = False

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise SteeringError(f"unknown op {self.op!r}; use one of {list(OPS)}")
        self.positions = parse_positions(self.positions)
        if self.when is not None:  # decided on the prompt: it steers what is generated
            if self.positions not in ("all", "generated"):
                raise SteeringError(f"a conditional intervention steers the generated tokens "
                                    f"of the rows whose prompt meets its condition; "
                                    f"positions={self.positions!r} cannot apply (leave it out "
                                    f"or give 'generated')")
            self.positions = "generated"
        elif self.per_token:
            raise SteeringError("per_token re-checks a condition: it needs when=...")
        if self.layers is None:
            self.layers = list(self.vector.layers)
        else:
            self.layers = [int(L) for L in self.layers]
            missing = [L for L in self.layers if L not in self.vector.directions]
            if missing:
                raise SteeringError(f"layer(s) {missing} not in the vector, which has layers "
                                    f"{self.vector.layers}")
        if isinstance(self.coef, torch.Tensor):
            self.coef = self.coef.detach().flatten().float()
        elif not isinstance(self.coef, (int, float)):
            self.coef = torch.tensor([float(c) for c in self.coef], dtype=torch.float32)
        if isinstance(self.coef, torch.Tensor) and not torch.isfinite(self.coef).all():
            raise SteeringError("coefficients must be finite")
        if isinstance(self.coef, (int, float)) and not math.isfinite(self.coef):
            raise SteeringError(f"coefficient {self.coef} must be finite")
        values = self.value.values() if isinstance(self.value, dict) else [self.value]
        if not all(math.isfinite(float(v)) for v in values):
            raise SteeringError("clamp values must be finite")

    @property
    def is_noop(self) -> bool:
        return isinstance(self.coef, (int, float)) and float(self.coef) == 0.0

    def check_layer(self, layer: int, per_token: bool = True) -> None:
        """Raise if this intervention cannot act on its vector's direction at ``layer``: on a
        language model (``per_token``) a per-position (ActAdd) block can only be added and a
        direction must be ``[d]`` or ``[T, d]``; on any other module (``avec.models.modules``) a
        direction is one whole activation and ``positions`` must be ``"all"``; ablate and
        clamp need a nonzero direction."""
        direction = self.vector[layer]
        if not per_token:
            if self.positions != "all":
                raise SteeringError(f"positions={self.positions!r}: a module without tokens is "
                                    f"steered on every input; use positions='all'")
        elif direction.dim() == 2 and self.op != "add":
            raise SteeringError(f"a per-position (ActAdd) vector can only be added, not "
                                f"{self.op}ed")
        elif direction.dim() not in (1, 2):
            raise SteeringError(f"a language-model direction must be [d] or [T, d], got "
                                f"shape {tuple(direction.shape)}")
        if self.op != "add" and float(direction.float().norm()) == 0.0:
            raise SteeringError(f"cannot {self.op} along a zero direction (layer {layer})")

    def value_at(self, layer: int) -> float:
        if isinstance(self.value, dict):
            if layer not in self.value:
                raise SteeringError(f"clamp value has no entry for layer {layer}")
            return float(self.value[layer])
        return float(self.value)


@dataclass
class _PositionState:
    """Per-forward token positions, filled by a pre-hook on the model (one per steer context)."""

    positions: torch.Tensor | None = None  # [B, T] index of each token among its row's tokens
    prompt_len: torch.Tensor | None = None  # [B] real tokens in the first (cache-less) pass
    fresh: bool = True  # this pass has no cache (a sequence's first pass)

    def update(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise SteeringError("steering by position needs input_ids or inputs_embeds")
        batch, length = ref.shape[0], ref.shape[1]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            pos = (mask.long().cumsum(-1) - 1)[:, -length:]
            real_now = mask[:, -length:].long().sum(-1)
        else:
            pos = (torch.arange(length, device=ref.device) + past).expand(batch, length)
            real_now = torch.full((batch,), length, device=ref.device)
        self.fresh = past == 0 or self.prompt_len is None or self.prompt_len.shape[0] != batch
        if self.fresh:
            self.prompt_len = real_now
        self.positions = pos


@dataclass
class _LayerPlan:
    # (intervention, direction, precomputed delta for a position-independent addition or None)
    ops: list[tuple[Intervention, torch.Tensor, torch.Tensor | None]] = field(
        default_factory=list)


def _static_delta(iv: Intervention, direction: torch.Tensor,
                  per_token: bool = True) -> torch.Tensor | None:
    """``coef * direction`` computed once, for additions that do not depend on the hidden
    state or the token position (the common case; the hook then costs one addition)."""
    if iv.op != "add" or iv.positions != "all" or (per_token and direction.dim() != 1):
        return None
    coef = iv.coef
    if isinstance(coef, torch.Tensor) and coef.numel() > 1:
        rows = (-1, 1, 1) if per_token else (-1, *[1] * direction.dim())
        return coef.to(direction.device, direction.dtype).view(*rows) * direction
    return float(coef) * direction


def _row_coef(iv: Intervention, hidden: torch.Tensor) -> torch.Tensor | float:
    coef = iv.coef
    if isinstance(coef, torch.Tensor):
        if coef.numel() == 1:
            return float(coef)
        if coef.shape[0] != hidden.shape[0]:
            raise SteeringError(f"{coef.shape[0]} per-row coefficients were given but the batch "
                                f"has {hidden.shape[0]} rows; give one coefficient per row")
        return coef.to(hidden.device, hidden.dtype).view(-1, *[1] * (hidden.dim() - 1))
    return float(coef)


def _require_positions(state: _PositionState) -> tuple[torch.Tensor, torch.Tensor]:
    if state.positions is None or state.prompt_len is None:
        raise SteeringError("position state missing: call the model itself (model.hf), "
                            "not one of its sub-modules, when steering by position")
    return state.positions, state.prompt_len


def _positional_delta(direction: torch.Tensor, hidden: torch.Tensor,
                      state: _PositionState) -> torch.Tensor:
    """For a ``[T, d]`` block (ActAdd): row b, token at index p gets ``direction[p]`` if p < T."""
    pos, _ = _require_positions(state)
    pos = pos.to(hidden.device)
    inside = (pos < direction.shape[0]).unsqueeze(-1).to(hidden.dtype)
    return direction[pos.clamp(max=direction.shape[0] - 1)] * inside


def _projection_delta(iv: Intervention, layer: int, direction: torch.Tensor,
                      hidden: torch.Tensor, coef: torch.Tensor | float,
                      per_token: bool) -> torch.Tensor:
    """``coef * (target - h . u) u`` for ablate (target 0) and clamp (target ``value``): the
    projection is taken per token on a language model, and over each example's whole
    activation on any other module (``avec.models.modules``)."""
    unit = direction / direction.norm()
    if per_token:
        proj = (hidden @ unit).unsqueeze(-1)  # [B, T, 1]
    else:
        proj = (hidden.flatten(1) @ unit.flatten()).view(-1, *[1] * direction.dim())
    target = 0.0 if iv.op == "ablate" else iv.value_at(layer)
    return coef * (target - proj) * unit


def _check_shape(layer: int, direction: torch.Tensor, hidden: torch.Tensor) -> None:
    if tuple(hidden.shape[1:]) != tuple(direction.shape):
        raise SteeringError(f"layer {layer}: the vector's shape {tuple(direction.shape)} does not "
                            f"match the activation's per-example shape {tuple(hidden.shape[1:])}; "
                            f"read the vector at this site of this network")


def _apply(iv: Intervention, layer: int, direction: torch.Tensor, hidden: torch.Tensor,
           state: _PositionState, gate: torch.Tensor | None = None) -> torch.Tensor:
    coef = _row_coef(iv, hidden)
    if gate is not None:  # a conditional intervention: 0 on the rows whose condition fails
        coef = coef * gate
    if direction.dim() == 2:
        delta = coef * _positional_delta(direction, hidden, state)
    elif iv.op == "add":
        delta = coef * direction
    else:
        delta = _projection_delta(iv, layer, direction, hidden, coef, per_token=True)
    if iv.positions != "all":
        pos, prompt_len = _require_positions(state)
        pos = pos.to(hidden.device)
        if iv.positions == "prompt":
            keep = pos < prompt_len.to(hidden.device).view(-1, 1)
        elif iv.positions == "generated":
            keep = pos >= prompt_len.to(hidden.device).view(-1, 1)
        else:
            keep = pos >= int(iv.positions)
        delta = delta * keep.unsqueeze(-1).to(hidden.dtype)
    return hidden + delta


def _as_interventions(vectors: SteeringVector | Intervention | Sequence[SteeringVector | Intervention],
                      coef: Coef, layers: Sequence[int] | None, positions: Positions, op: Op,
                      value: float | dict[int, float]) -> list[Intervention]:
    items = [vectors] if isinstance(vectors, (SteeringVector, Intervention)) else list(vectors)
    out = []
    for item in items:
        if isinstance(item, Intervention):
            out.append(item)
        elif isinstance(item, SteeringVector):
            out.append(Intervention(item, coef=coef, layers=layers, positions=positions, op=op,
                                    value=value))
        else:
            raise SteeringError(f"expected SteeringVector or Intervention, got {type(item).__name__}")
    return out


@contextlib.contextmanager
def steer(model: Model | Any,
          vectors: SteeringVector | Intervention | Sequence[SteeringVector | Intervention],
          coef: Coef = 1.0, *, layers: Sequence[int] | None = None, positions: Positions = "all",
          op: Op = "add", value: float | dict[int, float] = 0.0) -> Iterator[list[Intervention]]:
    """Steer ``model`` inside a ``with`` block.

    ``model`` is an avec language :class:`Model`, or any torch module wrapped in an
    :class:`avec.models.modules.ModuleModel` (whose layers are named sub-modules).

    Args:
        vectors: a vector, an :class:`Intervention`, or a list of them (they compose in order).
            Plain vectors in the list share ``coef``/``layers``/``positions``/``op``/``value``.
        coef: a number, or one number per batch row.
        layers: which of the vector's layers to steer (default: all of them).
        positions: ``"all"``, ``"prompt"``, ``"generated"``, ``"from:K"`` or an int K.
        op: ``"add"``, ``"ablate"`` or ``"clamp"``.
        value: the projection ``clamp`` sets (a number or ``{layer: number}``).

    Yields the list of interventions in force.
    """
    interventions = _as_interventions(vectors, coef, layers, positions, op, value)
    per_token = bool(getattr(model, "per_token", True))  # False for avec.models.modules.ModuleModel
    check_vector = getattr(model, "check_vector", None)
    plans: dict[int, _LayerPlan] = {}
    for iv in interventions:
        if check_vector is not None:
            check_vector(iv.vector)
        else:
            iv.vector.check_model(model)
        if iv.is_noop:
            continue
        for layer in iv.layers or []:
            iv.check_layer(layer, per_token)
            direction = iv.vector[layer].to(model.device, model.dtype)
            plans.setdefault(layer, _LayerPlan()).ops.append(
                (iv, direction, _static_delta(iv, direction, per_token)))
    state = _PositionState()
    conditional = [iv for iv in interventions if iv.when is not None and not iv.is_noop]
    if conditional and not per_token:
        raise SteeringError("conditional steering needs a language model (its conditions "
                            "read token states)")
    tracker = ConditionTracker([(iv.when, iv.per_token) for iv in conditional]) \
        if conditional else None
    gates = {id(iv): i for i, iv in enumerate(conditional)}

    def make_hook(layer: int, plan: _LayerPlan) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
            hidden = block_output(output)
            if tracker is not None:
                tracker.observe(layer, hidden, _require_positions(state)[0])
            for iv, direction, static in plan.ops:
                if not per_token:
                    _check_shape(layer, direction, hidden)
                if static is None:
                    gate = tracker.gate(gates[id(iv)], hidden) \
                        if tracker is not None and id(iv) in gates else None
                    hidden = (_apply(iv, layer, direction, hidden, state, gate) if per_token
                              else hidden + _projection_delta(iv, layer, direction, hidden,
                                                              _row_coef(iv, hidden), False))
                elif (isinstance(iv.coef, torch.Tensor) and iv.coef.numel() > 1
                      and static.shape[0] != hidden.shape[0]):
                    _row_coef(iv, hidden)  # raises the per-row coefficient count error
                else:
                    hidden = hidden + static
            return replace_block_output(output, hidden)

        return hook

    def before_forward(_m: Any, args: Any, kwargs: Any) -> None:
        state.update(args, kwargs)
        if tracker is not None:
            tracker.start_forward(state.fresh, int(state.positions.shape[0]))

    if tracker is not None:
        for layer in tracker.layers:
            if not 0 <= layer < len(model.blocks):
                raise SteeringError(f"a condition reads layer {layer}; the model has layers "
                                    f"0..{len(model.blocks) - 1}")
            plans.setdefault(layer, _LayerPlan())
    with installed_hooks() as hooks:
        if per_token and any(iv.positions != "all" or len(iv.vector.shape) == 2
                             for iv in interventions if not iv.is_noop):
            hooks.pre(model.hf, before_forward, with_kwargs=True)
        for layer, plan in sorted(plans.items()):
            # prepend: run before other forward hooks (transformers' own hidden-state recorders,
            # a user's readers), so every observer of block L's output sees the steered value
            hooks.forward(model.blocks[layer], make_hook(layer, plan), prepend=True)
        yield interventions
