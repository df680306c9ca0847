"""The contract every direction-finding method follows.

A method's ``fit(positive, negative)`` is model-free: it takes two ``[N, d]`` activation tensors
(row i of each from the same contrast pair) and returns one ``[d]`` direction, which points from
negative to positive behaviour. Class attributes say what else a caller (``extract``,
``avec compare``) must do for it, so no caller branches on a method's name:

- ``reads``: what ``fit`` is given. ``"activations"``: one activation per text at the read
  position; ``"tokens"``: the ``[T, d]`` per-position activations of one prompt pair (ActAdd);
  ``"latents"``: an SAE's latents averaged over each text's tokens when the read position is
  ``"mean"`` (``fit_latents``), else activations.
- ``pairs_needed``: a method that fits on exactly that many pairs (ActAdd: 1), else ``None``.
- ``applies``: ``"add"`` (the direction is added like any vector) or ``"clamp"`` (an SAE latent
  clamped inside its SAE; no vector to add).
- ``needs_sae``: whether the method must be given an SAE (``sae=``).
- ``info()``: what the fit chose or used, for the vector's metadata (a seed, an SAE latent).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Protocol

import torch


class Method(Protocol):
    name: str
    reads: ClassVar[str]
    pairs_needed: ClassVar[int | None]
    applies: ClassVar[str]
    needs_sae: ClassVar[bool]

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor: ...

    def info(self) -> dict[str, Any]: ...


class MethodDefaults:
    """The defaults of a pairwise method that reads one activation per text and adds its
    direction; a method class inherits them and overrides what differs."""

    reads: ClassVar[str] = "activations"
    pairs_needed: ClassVar[int | None] = None
    applies: ClassVar[str] = "add"
    needs_sae: ClassVar[bool] = False

    def info(self) -> dict[str, Any]:
        return {}


def make_method(registry: Mapping[str, type], name: str, *,
                context: Mapping[str, Any] | None = None, **options: Any) -> Method:
    """``registry[name]`` built with ``options`` (each must be one of its settings) plus those
    ``context`` values it declares a setting for (e.g. ``seed`` for ``random``, ``sae`` for the
    SAE methods; the others are ignored)."""
    if name not in registry:
        raise ValueError(f"unknown method {name!r}; available: {sorted(registry)}")
    cls = registry[name]
    accepted = {f.name for f in dataclasses.fields(cls) if f.init} - {"name"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"method {name!r} has no setting {unknown[0]!r}; its settings: "
                         f"{sorted(accepted) or 'none'}")
    taken = {k: v for k, v in (context or {}).items() if k in accepted and k not in options}
    return cls(**taken, **options)


def check_pair_tensors(positive: torch.Tensor, negative: torch.Tensor) -> None:
    if positive.shape != negative.shape or positive.dim() != 2:
        raise ValueError(f"expected two [N, d] tensors of the same shape, got "
                         f"{tuple(positive.shape)} and {tuple(negative.shape)}")
    if positive.shape[0] == 0:
        raise ValueError("no pairs to fit a direction on")
