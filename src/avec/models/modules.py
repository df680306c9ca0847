"""Steering any ``torch.nn.Module``: name the sub-modules to read and write, and ``avec.steer``
works on it as on a language model.

A :class:`ModuleModel` turns a list of sub-module names ("sites") into avec layers: layer ``i``
is the output of ``sites[i]``. A direction is one whole activation of that site for one
example (``[C, H, W]`` for a conv feature map, ``[d]`` for a dense layer); ``add`` adds it to
every example of the batch, ``ablate``/``clamp`` act on the projection onto it, taken over all
of the activation's elements. There are no token positions here, so ``positions`` must stay
``"all"``. Vectors made with :func:`read_sites` or :func:`difference_vector` record the site
names, and steering checks them, so a vector read at one site is never written at another.

>>> net = MyCNN()
>>> mm = ModuleModel(net, ["block2.res1"])
>>> vec = difference_vector(mm, x_with, x_without, [0])
>>> with avec.steer(mm, vec, coef=-1.0):
...     logits = net(x)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from avec.errors import SteeringError, VectorFileError
from avec.models.hooks import block_output, installed_hooks
from avec.vector import SteeringVector


@dataclass(eq=False)
class ModuleModel:
    """A module plus the names of the sub-modules avec may read and steer (its "layers")."""

    module: nn.Module
    sites: list[str]
    name: str = ""
    blocks: list[nn.Module] = field(init=False, repr=False)

    per_token = False  # directions are whole activations, not one vector per token

    def __post_init__(self) -> None:
        if not self.sites:
            raise SteeringError("name at least one sub-module to steer")
        named = dict(self.module.named_modules())
        missing = [s for s in self.sites if s not in named]
        if missing:
            known = [n for n in named if n][:40]
            raise SteeringError(f"no sub-module named {missing} in {type(self.module).__name__}; "
                                f"names look like: {', '.join(known)}")
        self.blocks = [named[s] for s in self.sites]
        self.name = self.name or type(self.module).__name__

    @property
    def hf(self) -> nn.Module:
        """The root module (what ``steer`` calls the model)."""
        return self.module

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def device(self) -> torch.device:
        param = next(self.module.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    def layer(self, site: str) -> int:
        """The layer index of a site name."""
        if site not in self.sites:
            raise SteeringError(f"{site!r} is not one of this model's sites {self.sites}")
        return self.sites.index(site)

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "sites": list(self.sites)}

    def check_vector(self, vector: SteeringVector) -> None:
        """Raise unless every layer of ``vector`` is a site here, read at the same sub-module."""
        bad = [L for L in vector.layers if not 0 <= L < self.n_layers]
        if bad:
            raise VectorFileError(f"vector has layer(s) {bad} but {self.name} has sites "
                                  f"0..{self.n_layers - 1}: {self.sites}")
        recorded = vector.metadata.get("sites")
        if isinstance(recorded, dict):
            for layer in vector.layers:
                site = recorded.get(str(layer))
                if site is not None and site != self.sites[layer]:
                    raise VectorFileError(f"layer {layer} of the vector was read at {site!r} but "
                                          f"layer {layer} here is {self.sites[layer]!r}; wrap "
                                          f"the module with the sites the vector was made on")


@torch.no_grad()
def read_sites(model: ModuleModel, inputs: Any, layers: Sequence[int] | None = None
               ) -> dict[int, torch.Tensor]:
    """Run ``model.module(inputs)`` (a tensor, or a tuple of positional arguments) and return the
    output of each requested site, ``{layer: [B, ...]}`` (float32, on the CPU). Steering hooks
    in force act first, so this reads steered values."""
    layers = list(range(model.n_layers)) if layers is None else [int(L) for L in layers]
    for layer in layers:
        if not 0 <= layer < model.n_layers:
            raise SteeringError(f"layer {layer} out of range 0..{model.n_layers - 1}")
    found: dict[int, torch.Tensor] = {}
    with installed_hooks() as hooks:
        for L in layers:
            hooks.forward(model.blocks[L], lambda _m, _a, out, L=L: found.__setitem__(
                L, block_output(out).detach().float().cpu()))
        model.module(*inputs) if isinstance(inputs, tuple) else model.module(inputs)
    return found


def difference_vector(model: ModuleModel, positive: Any, negative: Any,
                      layers: Sequence[int], *, method: str = "difference",
                      **metadata: Any) -> SteeringVector:
    """Mean over the batch of (activation on ``positive`` - activation on ``negative``) at each
    layer: with one example each, the single-input difference the cheese vector uses."""
    pos, neg = read_sites(model, positive, layers), read_sites(model, negative, layers)
    directions = {L: (pos[L] - neg[L]).mean(0) for L in layers}
    return SteeringVector(directions, {"method": method, "model": model.identity(),
                                       "sites": {str(L): model.sites[L] for L in layers},
                                       **metadata})
