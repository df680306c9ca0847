"""A sparse autoencoder (SAE) over one site's activations, in the SAELens convention.

    pre   = (x - b_dec) @ W_enc + b_enc          (b_dec is not subtracted when
                                                  ``apply_b_dec_to_input`` is False)
    z     = act(pre)                             topk: the k largest of relu(pre) per row
                                                 relu: relu(pre)
                                                 jumprelu: relu(pre) where pre > threshold, else 0
    x_hat = z @ W_dec + b_dec

Shapes: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
(and ``threshold [d_sae]`` for jumprelu). Every method works on ``[..., d_in]`` inputs.

Site: ``hook_layer`` L with a ``*.hook_resid_post`` hook name is the output of decoder block
L, which is avec's layer L. ``blocks.L.hook_resid_pre`` is the output of block L - 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from avec.errors import AvecError

Activation = Literal["topk", "relu", "jumprelu"]
ACTIVATIONS: tuple[str, ...] = ("topk", "relu", "jumprelu")


class SAEError(AvecError, ValueError):
    """An SAE, its files, or its use on a model is malformed or does not fit."""


_LAYER_IN_HOOK = re.compile(r"(?:^|\.)(?:blocks|layers|h)\.(\d+)(?:\.|$)")


def layer_from_hook_name(hook_name: str) -> int | None:
    """The layer number in a hook name (``"blocks.8.hook_resid_post"`` -> 8), or None."""
    match = _LAYER_IN_HOOK.search(hook_name or "")
    return int(match.group(1)) if match else None


@dataclass
class SAEConfig:
    """Shape, activation and (optional) provenance of a sparse autoencoder.

    Args:
        d_in: width of the activations (``d_model`` for a residual-stream SAE).
        d_sae: number of latents.
        k: latents kept per row (TopK only).
        activation: ``"topk"``, ``"relu"`` or ``"jumprelu"``.
        apply_b_dec_to_input: subtract ``b_dec`` before encoding (SAELens default True).
        hook_layer: the layer number of the site the SAE was trained on (SAELens meaning;
            parsed from ``hook_name`` when not given).
        hook_name: the site's hook name, e.g. ``"blocks.8.hook_resid_post"`` (the output of
            block 8; the default when only ``hook_layer`` is given).
        model_name: the model the SAE was trained on.
        metadata: any other JSON-serialisable facts (kept through save/load).
    """

    d_in: int
    d_sae: int
    k: int | None = None
    activation: Activation = "topk"
    apply_b_dec_to_input: bool = True
    hook_layer: int | None = None
    hook_name: str = ""
    model_name: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in and d_sae must be positive, got d_in={self.d_in}, "
                           f"d_sae={self.d_sae}")
        if self.activation not in ACTIVATIONS:
            raise SAEError(f"unknown SAE activation {self.activation!r}; use one of "
                           f"{list(ACTIVATIONS)}")
        if self.activation == "topk":
            if self.k is None or not 1 <= int(self.k) <= self.d_sae:
                raise SAEError(f"a TopK SAE needs 1 <= k <= d_sae={self.d_sae}, got k={self.k}")
            self.k = int(self.k)
        if self.hook_layer is None and self.hook_name:
            self.hook_layer = layer_from_hook_name(self.hook_name)
        elif self.hook_layer is not None and not self.hook_name:
            self.hook_name = f"blocks.{self.hook_layer}.hook_resid_post"  # avec layer L

    @property
    def avec_layer(self) -> int | None:
        """The avec layer (output of decoder block L) this SAE reads, when the site is a block
        output: ``hook_resid_post`` at L -> L, ``hook_resid_pre`` at L -> L - 1; else None."""
        if self.hook_layer is None:
            return None
        name = self.hook_name
        if not name or name.endswith("hook_resid_post"):
            return self.hook_layer
        if name.endswith("hook_resid_pre"):
            return self.hook_layer - 1 if self.hook_layer > 0 else None
        return None


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder with SAELens parameter names (see the module docstring)."""

    def __init__(self, config: SAEConfig, *, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
        """Tied initialisation: ``W_dec`` rows are random unit vectors (seeded),
        ``W_enc = W_dec.T``, ``b_enc = b_dec = 0``."""
        super().__init__()
        self.cfg = config
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(config.d_sae, config.d_in, generator=gen, dtype=torch.float64)
        w_dec = (w_dec / w_dec.norm(dim=-1, keepdim=True)).to(dtype)
        self.W_enc = nn.Parameter(w_dec.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(config.d_in, dtype=dtype))
        if config.activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(config.d_sae, dtype=dtype))

    @classmethod
    def from_weights(cls, config: SAEConfig,
                     weights: dict[str, torch.Tensor]) -> SparseAutoencoder:
        """An SAE holding the given tensors (no random initialisation), after checking that
        every tensor the config needs is present with the right shape."""
        shapes = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
                  "W_dec": (config.d_sae, config.d_in), "b_dec": (config.d_in,)}
        if config.activation == "jumprelu":
            shapes["threshold"] = (config.d_sae,)
        missing = [name for name in shapes if name not in weights]
        if missing:
            raise SAEError(f"SAE weights lack tensor(s) {missing}; a {config.activation} SAE "
                           f"needs {list(shapes)}")
        for name, shape in shapes.items():
            if tuple(weights[name].shape) != shape:
                raise SAEError(f"SAE tensor {name} has shape {tuple(weights[name].shape)} but "
                               f"d_in={config.d_in}, d_sae={config.d_sae} need {shape}; check "
                               f"d_in/d_sae in the config")
        sae = cls.__new__(cls)
        nn.Module.__init__(sae)
        sae.cfg = config
        for name in shapes:
            setattr(sae, name, nn.Parameter(weights[name].detach().clone()))
        return sae

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _check_input(self, x: torch.Tensor, width: int, what: str) -> torch.Tensor:
        if x.shape[-1] != width:
            raise SAEError(f"SAE {what} expects [..., {width}] activations, got shape "
                           f"{tuple(x.shape)}; use an SAE trained on this site's width")
        return x.to(self.W_enc.dtype)

    # ---- forward -------------------------------------------------------------------------
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc``, shape ``[..., d_sae]``."""
        x = self._check_input(x, self.d_in, "encode")
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The sparse latents from pre-activations (see the module docstring)."""
        if self.cfg.activation == "relu":
            return torch.relu(pre)
        if self.cfg.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        positive = torch.relu(pre)
        top = positive.topk(int(self.cfg.k or 0), dim=-1)
        return torch.zeros_like(positive).scatter(-1, top.indices, top.values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``z [..., d_sae]`` of activations ``x [..., d_in]``."""
        return self.activate(self.pre_activation(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``z @ W_dec + b_dec``, shape ``[..., d_in]``."""
        z = self._check_input(z, self.d_sae, "decode")
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_hat, z)``."""
        z = self.encode(x)
        return self.decode(z), z

    # ---- maintenance ---------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self, eps: float = 1e-12) -> None:
        """Scale every decoder row to unit norm (in place)."""
        norms = self.W_dec.norm(dim=-1, keepdim=True).clamp_min(eps)
        self.W_dec.div_(norms)

    @torch.no_grad()
    def init_b_dec(self, sample: torch.Tensor,
                   method: Literal["geometric_median", "mean"] = "geometric_median") -> None:
        """Set ``b_dec`` to the geometric median (Weiszfeld) or mean of ``sample [N, d_in]``."""
        sample = self._check_input(sample, self.d_in, "init_b_dec").reshape(-1, self.d_in)
        if sample.shape[0] == 0:
            raise SAEError("init_b_dec needs a non-empty sample")
        if method == "mean":
            center = sample.double().mean(0)
        elif method == "geometric_median":
            center = geometric_median(sample.double())
        else:
            raise SAEError(f"unknown b_dec init {method!r}; use 'geometric_median' or 'mean'")
        self.b_dec.copy_(center.to(self.b_dec.dtype))


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-7) -> torch.Tensor:
    """The point minimising the summed distance to ``points [N, d]`` (Weiszfeld's algorithm)."""
    guess = points.mean(0)
    for _ in range(iters):
        weights = 1.0 / (points - guess).norm(dim=-1).clamp_min(1e-12)
        new = (weights.unsqueeze(-1) * points).sum(0) / weights.sum()
        moved = float((new - guess).norm())
        guess = new
        if moved <= tol * (1.0 + float(guess.norm())):
            break
    return guess
