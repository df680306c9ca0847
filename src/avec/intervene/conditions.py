"""Conditions for conditional activation steering (CAST, Lee et al. 2024): steer a row only when
its own activations match.

A condition is a tree. A :class:`Leaf` compares a row's *value* at one layer with a threshold:
the cosine similarity (or the projection) between the row's mean hidden state at the output of
block ``layer`` (the same site avec reads and steers), averaged over its tokens after the first
(the first token's state is an outlier), and a condition ``direction``. :class:`AllOf`,
:class:`AnyOf` and :class:`Not` combine conditions.

A conditional steering entry is decided on the prompt: when the prompt's tokens have passed the
condition layers, each row's decision is fixed, and the entry steers that row's *generated*
tokens if the condition holds (with ``per_token``, the decision is taken again before every new
token, on the mean over all tokens so far). Rows whose condition does not hold get coefficient 0,
which leaves them bit-identical to the unsteered model.

Conditions are data: :func:`parse` reads the JSON form a server entry carries (``"when"``) and
:func:`to_spec` writes it; a condition vector file (``avec condition fit``) holds the direction
and, in its metadata under ``condition``, the layer, metric, comparator and threshold it was fitted
with, which a spec naming the file uses unless it gives its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch

from avec.errors import AvecError, SteeringError
from avec.vector import SteeringVector

METRICS = ("cosine", "projection")
COMPARATORS = (">", "<")
MAX_DEPTH = 4
MAX_LEAVES = 8
CONDITION_KEY = "condition"  # metadata block of a condition vector file


@dataclass(frozen=True, eq=False)
class Leaf:
    """Met when ``metric(mean hidden state at layer, direction) <op> threshold``."""

    direction: torch.Tensor
    layer: int
    threshold: float
    op: str = ">"
    metric: str = "cosine"
    name: str = ""  # the condition vector's name, for messages and specs

    def values(self, mean: torch.Tensor) -> torch.Tensor:
        """Each row's value (``[B]``) from its mean hidden state ``[B, d]``."""
        d = self.direction.to(mean.device, torch.float32)
        m = mean.float()
        if self.metric == "projection":
            return m @ (d / d.norm())
        return torch.nn.functional.cosine_similarity(m, d.expand_as(m), dim=-1)

    def met(self, means: dict[int, torch.Tensor]) -> torch.Tensor:
        return compare(self.values(means[self.layer]), self.op, self.threshold)


def compare(values: torch.Tensor, op: str, threshold: float) -> torch.Tensor:
    """``values <op> threshold`` elementwise, for ``op`` ``">"`` or ``"<"``."""
    return values > threshold if op == ">" else values < threshold


@dataclass(frozen=True)
class AllOf:
    """Met when every part is met."""

    parts: tuple["Condition", ...]

    def met(self, means: dict[int, torch.Tensor]) -> torch.Tensor:
        out = self.parts[0].met(means)
        for p in self.parts[1:]:
            out = out & p.met(means)
        return out


@dataclass(frozen=True)
class AnyOf:
    """Met when at least one part is met."""

    parts: tuple["Condition", ...]

    def met(self, means: dict[int, torch.Tensor]) -> torch.Tensor:
        out = self.parts[0].met(means)
        for p in self.parts[1:]:
            out = out | p.met(means)
        return out


@dataclass(frozen=True)
class Not:
    """Met when its part is not."""

    part: "Condition"

    def met(self, means: dict[int, torch.Tensor]) -> torch.Tensor:
        return ~self.part.met(means)


Condition = Union[Leaf, AllOf, AnyOf, Not]


def leaves(cond: Condition) -> list[Leaf]:
    if isinstance(cond, Leaf):
        return [cond]
    if isinstance(cond, Not):
        return leaves(cond.part)
    return [x for p in cond.parts for x in leaves(p)]


def layers(cond: Condition) -> list[int]:
    """The layers a condition reads, sorted."""
    return sorted({leaf.layer for leaf in leaves(cond)})


# ---- the JSON form --------------------------------------------------------------------------

def parse(spec: Any, resolve: Callable[[str], SteeringVector], *, where: str = "when",
          n_layers: int | None = None, d_model: int | None = None) -> Condition:
    """A condition from its JSON form, checked completely (errors name the field):

    * ``{"vector": NAME, "layer"?: L, "metric"?: "cosine"|"projection", "op"?: ">"|"<",
      "threshold"?: t}``; fields left out come from the condition vector file's ``condition``
      metadata (an error names the missing field when the file has none);
    * ``{"all": [c, ...]}``, ``{"any": [c, ...]}`` (2 to 8 parts), ``{"not": c}``.

    ``resolve(name)`` gives the condition vector (raising for an unknown name). At most
    ``MAX_DEPTH`` levels and ``MAX_LEAVES`` leaves."""
    cond = _parse(spec, resolve, where, 0, n_layers, d_model)
    if len(leaves(cond)) > MAX_LEAVES:
        raise SteeringError(f"{where}: {len(leaves(cond))} conditions; at most {MAX_LEAVES}")
    return cond


def _parse(spec: Any, resolve: Callable[[str], SteeringVector], where: str, depth: int,
           n_layers: int | None, d_model: int | None) -> Condition:
    if depth > MAX_DEPTH:
        raise SteeringError(f"{where}: conditions nest more than {MAX_DEPTH} levels deep")
    if not isinstance(spec, dict) or not spec:
        raise SteeringError(f"{where}: a condition is an object: {{\"vector\": ...}}, "
                            f"{{\"all\": [...]}}, {{\"any\": [...]}} or {{\"not\": ...}}")
    keys = set(spec)
    for combinator in ("all", "any"):
        if combinator in keys:
            if keys != {combinator}:
                raise SteeringError(f"{where}: {combinator!r} takes no other field "
                                    f"(got {sorted(keys - {combinator})})")
            parts = spec[combinator]
            if not isinstance(parts, list) or not 2 <= len(parts) <= MAX_LEAVES:
                raise SteeringError(f"{where}.{combinator}: give a list of 2 to {MAX_LEAVES} "
                                    f"conditions")
            out = tuple(_parse(p, resolve, f"{where}.{combinator}[{i}]", depth + 1, n_layers,
                               d_model) for i, p in enumerate(parts))
            return AllOf(out) if combinator == "all" else AnyOf(out)
    if "not" in keys:
        if keys != {"not"}:
            raise SteeringError(f"{where}: 'not' takes no other field")
        return Not(_parse(spec["not"], resolve, f"{where}.not", depth + 1, n_layers, d_model))
    return _leaf(spec, resolve, where, n_layers, d_model)


_LEAF_FIELDS = {"vector", "layer", "metric", "op", "threshold"}


def _leaf(spec: dict, resolve: Callable[[str], SteeringVector], where: str,
          n_layers: int | None, d_model: int | None) -> Leaf:
    unknown = set(spec) - _LEAF_FIELDS
    if unknown:
        raise SteeringError(f"{where}.{sorted(unknown)[0]}: unknown field; a condition has "
                            f"{sorted(_LEAF_FIELDS)} (or all/any/not)")
    name = spec.get("vector")
    if not isinstance(name, str) or not name:
        raise SteeringError(f"{where}.vector: name the condition vector (a string)")
    try:
        vec = resolve(name)
    except (AvecError, ValueError, KeyError) as exc:
        raise SteeringError(f"{where}.vector: {exc}") from None
    fitted = vec.metadata.get(CONDITION_KEY)
    fitted = fitted if isinstance(fitted, dict) else {}

    def field(key: str, default: Any = None) -> Any:
        value = spec.get(key, fitted.get(key, default))
        if value is None:
            raise SteeringError(f"{where}.{key}: the condition vector {name!r} has no fitted "
                                f"{key} (`avec condition fit` writes one); give it")
        return value

    layer = field("layer", vec.layers[0] if len(vec.layers) == 1 else None)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SteeringError(f"{where}.layer: an integer, got {layer!r}")
    if layer not in vec.directions:
        raise SteeringError(f"{where}.layer: the condition vector {name!r} has no layer "
                            f"{layer} (it has {vec.layers})")
    if n_layers is not None and not 0 <= layer < n_layers:
        raise SteeringError(f"{where}.layer: {layer} is outside this model's 0..{n_layers - 1}")
    metric, op = field("metric", "cosine"), field("op")
    if metric not in METRICS:
        raise SteeringError(f"{where}.metric: {metric!r}; use one of {list(METRICS)}")
    if op not in COMPARATORS:
        raise SteeringError(f"{where}.op: {op!r}; use '>' or '<'")
    threshold = field("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or abs(threshold) > 1e6:
        raise SteeringError(f"{where}.threshold: a finite number (|t| <= 1e6), got "
                            f"{str(threshold)[:40]}")
    direction = vec[layer]
    if direction.dim() != 1 or float(direction.float().norm()) == 0.0:
        raise SteeringError(f"{where}.vector: a condition direction must be a nonzero [d] "
                            f"vector")
    if d_model is not None and direction.shape[0] != d_model:
        raise SteeringError(f"{where}.vector: {name!r} has width {direction.shape[0]}; this "
                            f"model's is {d_model}")
    return Leaf(direction.detach().float(), int(layer), float(threshold), op, metric, name)


def to_spec(cond: Condition) -> dict[str, Any]:
    """The JSON form (leaves name their vector, with every field written out)."""
    if isinstance(cond, Leaf):
        return {"vector": cond.name, "layer": cond.layer, "metric": cond.metric, "op": cond.op,
                "threshold": cond.threshold}
    if isinstance(cond, Not):
        return {"not": to_spec(cond.part)}
    return {("all" if isinstance(cond, AllOf) else "any"): [to_spec(p) for p in cond.parts]}


def renamed(spec: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """A JSON-form condition whose leaves' vector names are mapped through ``names``."""
    if "vector" in spec:
        return {**spec, "vector": names.get(spec["vector"], spec["vector"])}
    if "not" in spec:
        return {"not": renamed(spec["not"], names)}
    return {k: [renamed(p, names) for p in v] for k, v in spec.items()}


def condition_vector(direction: torch.Tensor, layer: int, threshold: float, *, op: str = ">",
                     metric: str = "cosine", metadata: dict[str, Any] | None = None,
                     fit: dict[str, Any] | None = None) -> SteeringVector:
    """A condition vector file's content: the direction at ``layer`` and the fitted rule."""
    block = {"layer": int(layer), "metric": metric, "op": op, "threshold": float(threshold),
             **({"fit": fit} if fit else {})}
    return SteeringVector({int(layer): direction.detach().float()},
                          {**(metadata or {}), CONDITION_KEY: block})




class ConditionTracker:
    """The per-row state of conditional interventions inside one ``steer`` context.

    ``observe`` (called with a condition layer's block output, before that layer's steering)
    adds each row's token states after its first token to running sums: during a sequence's
    first, cache-less forward pass only (the prompt) for prompt-decided conditions, and in every
    pass for ``per_token`` ones. ``start_forward`` (before each pass) turns what the previous
    pass saw into decisions, so a token is steered by the decision on the tokens before it; a
    new sequence (a cache-less pass) starts again from nothing. ``gate(i)`` is condition i's
    decision per row, 1.0 or 0.0 (0 before any decision)."""

    def __init__(self, conditions: list[tuple[Condition, bool]]) -> None:
        self.conditions = conditions
        self.layers = sorted({L for cond, _ in conditions for L in layers(cond)})
        self._prompt: dict[int, torch.Tensor] = {}
        self._running: dict[int, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._gates: list[torch.Tensor | None] = [None] * len(conditions)
        self._seen = False
        self._fresh = True

    def start_forward(self, fresh: bool, batch: int) -> None:
        if fresh:
            self._prompt, self._running, self._counts = {}, {}, {}
            self._gates = [None] * len(self.conditions)
        elif self._seen:
            for i, (cond, per_token) in enumerate(self.conditions):
                if per_token or self._gates[i] is None:
                    sums, key = (self._running, "running") if per_token else (self._prompt,
                                                                               "prompt")
                    count = self._counts[key].clamp(min=1).unsqueeze(-1)
                    means = {L: s / count for L, s in sums.items()}
                    self._gates[i] = cond.met(means).float()
        self._seen = False
        self._fresh = fresh

    def observe(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> None:
        if layer not in self.layers:
            return
        keep = (positions.to(hidden.device) >= 1).unsqueeze(-1).to(torch.float32)
        total = (hidden.float() * keep).sum(1)
        count = keep.squeeze(-1).sum(1)
        self._seen = True
        targets = [("running", self._running)]
        if self._fresh:
            targets.append(("prompt", self._prompt))
        for key, sums in targets:
            sums[layer] = sums[layer] + total if layer in sums else total
            if layer == self.layers[0]:  # count each token once, at the first condition layer
                self._counts[key] = self._counts[key] + count if key in self._counts else count

    def gate(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        g = self._gates[i]
        if g is None:
            g = torch.zeros(hidden.shape[0])
        return g.to(hidden.device, hidden.dtype).view(-1, *[1] * (hidden.dim() - 1))


__all__ = ["AllOf", "AnyOf", "Condition", "ConditionTracker", "Leaf", "Not", "compare",
           "condition_vector",
           "layers", "leaves", "parse", "renamed", "to_spec"]
