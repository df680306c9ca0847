"""Steer an avec language model with SAE latents at the output of one decoder block.

``clamp={i: v}``  z = sae.encode(h); z' = z with latent i set to v;
                  h <- h + decode(z') - decode(z) = h + sum_i (v_i - z_i) W_dec[i]
                  (the SAE's reconstruction error is kept, so everything the clamp does not
                  touch passes through unchanged; clamping to the current value returns h)
``add={i: c}``    h <- h + c * W_dec[i]   (no encoding; W_dec rows are unit norm for SAEs
                  trained by avec, as for most SAELens SAEs)

Both act on every token position. Hooks are removed when the ``with`` block ends, also when
it raises. :func:`feature_vector` turns a latent's decoder row into an ordinary
:class:`~avec.vector.SteeringVector` for the rest of avec's tooling.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from avec.models.hooks import block_output, installed_hooks, replace_block_output
from avec.models.model import Model
from avec.sae.model import SAEError, SparseAutoencoder
from avec.vector import SteeringVector


def _check_latents(sae: SparseAutoencoder, values: dict[int, float] | None,
                   what: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for latent, value in (values or {}).items():
        if isinstance(latent, bool) or not 0 <= int(latent) < sae.d_sae:
            raise SAEError(f"{what}: latent {latent!r} is out of range; this SAE has latents "
                           f"0..{sae.d_sae - 1}")
        if not math.isfinite(float(value)):
            raise SAEError(f"{what}: the value for latent {latent} must be finite, got {value}")
        out[int(latent)] = float(value)
    return out


def check_fit(model: Model, sae: SparseAutoencoder, layer: int, check_site: bool) -> int:
    """The normalised ``layer`` if ``sae`` can act there on ``model`` (width, layer range and,
    with ``check_site``, the site the SAE was trained on); raises :class:`SAEError` otherwise."""
    if sae.d_in != model.d_model:
        raise SAEError(f"the SAE reads {sae.d_in}-wide activations but {model.name or 'the model'}"
                       f" has d_model {model.d_model}; use an SAE trained on this model")
    try:
        (layer,) = model.check_layers([int(layer)])
    except ValueError as err:
        raise SAEError(str(err)) from err
    site = sae.cfg.avec_layer
    if check_site and site is not None and site != layer:
        raise SAEError(f"the SAE was trained on layer {site} ({sae.cfg.hook_name}) but layer "
                       f"{layer} was asked for; pass layer={site}, or check_site=False to "
                       f"apply it elsewhere on purpose")
    return layer


@contextlib.contextmanager
def steer_features(model: Model, sae: SparseAutoencoder, layer: int, *,
                   clamp: dict[int, float] | None = None, add: dict[int, float] | None = None,
                   check_site: bool = True) -> Iterator[None]:
    """Clamp and/or add SAE latents at the output of block ``layer`` inside a ``with`` block.

    Args:
        model: an avec language model.
        sae: an SAE whose ``d_in`` is the model's ``d_model``.
        layer: the block whose output is steered (negative counts from the end).
        clamp: ``{latent: value}``: set these latents to these values, keeping the SAE error.
        add: ``{latent: coefficient}``: add ``coefficient * W_dec[latent]``.
        check_site: refuse a layer other than the one the SAE says it was trained on.

    The hook runs before any other forward hook on the block, so readers see steered values.
    """
    layer = check_fit(model, sae, layer, check_site)
    clamps = _check_latents(sae, clamp, "clamp")
    adds = _check_latents(sae, add, "add")
    if not clamps and not adds:
        yield
        return
    w_dec = sae.W_dec.detach()
    static: torch.Tensor | None = None
    if adds:
        idx = torch.tensor(list(adds), device=w_dec.device)
        coefs = torch.tensor(list(adds.values()), dtype=w_dec.dtype, device=w_dec.device)
        static = (coefs @ w_dec[idx]).to(model.device, model.dtype)
    clamp_idx = torch.tensor(list(clamps), dtype=torch.long, device=w_dec.device)
    clamp_val = torch.tensor(list(clamps.values()), dtype=w_dec.dtype, device=w_dec.device)

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        hidden = block_output(output)
        steered = hidden
        if clamps:
            inputs = hidden.to(w_dec.device, w_dec.dtype)
            z = sae.encode(inputs)[..., clamp_idx]  # [..., n_clamped]
            delta = (clamp_val - z) @ w_dec[clamp_idx]  # = decode(z') - decode(z)
            steered = steered + delta.to(hidden.device, hidden.dtype)
        if static is not None:
            steered = steered + static
        return replace_block_output(output, steered)

    with installed_hooks() as hooks:
        hooks.forward(model.blocks[layer], hook, prepend=True)
        yield


def feature_vector(sae: SparseAutoencoder, latent: int, layer: int | None = None,
                   metadata: dict[str, Any] | None = None) -> SteeringVector:
    """Latent ``latent``'s decoder row ``W_dec[latent]`` as a one-layer avec vector.

    ``layer`` defaults to the layer the SAE was trained on (see ``SAEConfig.avec_layer``).
    """
    _check_latents(sae, {latent: 0.0}, "feature_vector")
    if layer is None:
        layer = sae.cfg.avec_layer
        if layer is None:
            raise SAEError("the SAE does not say which block output it reads; pass layer=")
    direction = sae.W_dec.detach()[int(latent)].to("cpu", torch.float32).clone()
    meta: dict[str, Any] = {"method": "sae", "sae_latent": int(latent),
                            "sae_d_sae": sae.d_sae}
    if sae.cfg.model_name:
        meta["model"] = {"name": sae.cfg.model_name, "d_model": sae.d_in}
    if sae.cfg.hook_name:
        meta["sae_hook_name"] = sae.cfg.hook_name
    meta.update(metadata or {})
    return SteeringVector({int(layer): direction}, meta)
