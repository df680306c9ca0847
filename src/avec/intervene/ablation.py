"""Directional ablation "everywhere" (Arditi et al. 2024, *Refusal in language models is
mediated by a single direction*), applied at run time with hooks.

With ``u = direction / |direction|``, every vector written into the residual stream loses its
component along ``u``::

    h <- h - coef * (h . u) u

at the residual stream entering block 0 (embeddings) and at the output of every *residual
writer*: each sub-module of a block whose output is added to the residual stream (attention
and MLP, or the norms that follow them in sandwich-norm blocks such as Gemma 2/3). Since the
residual stream is a sum of those terms, every block output then has (numerically) no
component along ``u``, at every layer and position. :func:`avec.intervene.orthogonalize.orthogonalize_weights`
folds the same operation into the weights.

Unlike ``steer(..., op="ablate")``, which edits block outputs at chosen layers, nothing along
``u`` is ever written here, so later layers cannot re-create it from inside a block.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from avec.errors import SteeringError, UnsupportedArchitectureError
from avec.models.hooks import block_output, installed_hooks, replace_block_output
from avec.models.model import Model

Coef = float | Sequence[float] | torch.Tensor

# attribute names, most specific first
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
CROSS_ATTENTION_NAMES = ("crossattention",)
#: blocks with a norm *after* each writer (Gemma 2/3, OLMo 2): the norm outputs are the writers
POST_NORM_NAMES = ("post_attention_layernorm", "post_feedforward_layernorm")

_VERIFIED_KEY = "avec.intervene.ablation.writers_verified"


def _unknown_block(block: nn.Module, index: int, why: str) -> UnsupportedArchitectureError:
    children = ", ".join(name for name, _ in block.named_children()) or "none"
    return UnsupportedArchitectureError(
        f"cannot tell which sub-modules of block {index} ({type(block).__name__}; children: "
        f"{children}) write into the residual stream: {why}. Directional ablation everywhere "
        f"needs that; ablate the block outputs instead with "
        f"avec.intervene.steer.steer(model, vector, op='ablate') (all layers of the vector), which removes "
        f"the direction from each steered block's output but not inside the blocks.")


def block_writers(block: nn.Module, index: int = 0) -> list[tuple[str, nn.Module]]:
    """``(attribute, module)`` for the sub-modules of one decoder block whose outputs are added
    to the residual stream, found from the block's attributes.

    * a block with ``post_feedforward_layernorm`` normalises each writer's output before adding
      it (Gemma 2/3 sandwich norms, OLMo 2): the writers are ``post_attention_layernorm`` and
      ``post_feedforward_layernorm``;
    * otherwise (Llama, Mistral, Qwen2, Phi, Gemma 1, GPT-2, GPT-NeoX in either residual layout)
      the attention module and the MLP (plus GPT-2's cross-attention when present). There, a
      Llama-style ``post_attention_layernorm`` is the MLP's input norm, not a writer.
    """
    if isinstance(getattr(block, "post_feedforward_layernorm", None), nn.Module):
        missing = [n for n in POST_NORM_NAMES if not isinstance(getattr(block, n, None), nn.Module)]
        if missing:
            raise _unknown_block(block, index, f"it has post_feedforward_layernorm but no "
                                               f"{missing[0]}")
        return [(n, getattr(block, n)) for n in POST_NORM_NAMES]
    found = []
    for kind, names in (("attention", ATTENTION_NAMES), ("MLP", MLP_NAMES)):
        name = next((n for n in names if isinstance(getattr(block, n, None), nn.Module)), None)
        if name is None:
            raise _unknown_block(block, index, f"no {kind} sub-module (looked for "
                                               f"{', '.join(names)})")
        found.append((name, getattr(block, name)))
    for name in CROSS_ATTENTION_NAMES:
        if isinstance(getattr(block, name, None), nn.Module):
            found.insert(1, (name, getattr(block, name)))
    return found


def residual_writers(model: Model, *, verify: bool = True) -> list[tuple[str, nn.Module]]:
    """Every sub-module, in every block, whose output is added into the residual stream.

    Returns ``(dotted name, module)`` pairs, e.g. ``("model.layers.0.self_attn", ...)``, two (or
    three) per block in block order. With ``verify`` (default), the first call on a model runs a
    short probe forward pass and checks that each block's output equals its input plus the
    found writers' outputs (skipped in training mode); the result is remembered in
    ``model.extra``.

    Raises:
        UnsupportedArchitectureError: a block's layout is not recognised or fails the check.
    """
    writers = []
    for i, block in enumerate(model.blocks):
        for attr, module in block_writers(block, i):
            writers.append((f"{model.block_path}.{i}.{attr}", module))
    if verify and not model.extra.get(_VERIFIED_KEY) and not model.hf.training:
        _verify_writers(model, writers)
        model.extra[_VERIFIED_KEY] = True
    return writers


# --- probe ---------------------------------------------------------------------------------

def probe_input_ids(model: Model, length: int = 6) -> torch.Tensor:
    """A short, valid ``[1, length]`` batch of token ids for probe forward passes."""
    vocab = model.hf.get_input_embeddings().num_embeddings
    return (torch.arange(3, 3 + length) % vocab).view(1, -1).to(model.device)


def run_probe(model: Model, taps: Sequence[tuple[str, nn.Module, str]]) -> dict[str, torch.Tensor]:
    """Run one short forward pass, recording float32 copies of module inputs or outputs.

    ``taps`` are ``(key, module, kind)`` with kind ``"in"`` (the hidden states a module is
    called with, after other pre-hooks), ``"out"`` (its output after other forward hooks) or
    ``"raw_out"`` (its output before any other forward hook)."""
    seen: dict[str, torch.Tensor] = {}

    def out_hook(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _args: Any, output: Any) -> None:
            seen[key] = block_output(output).detach().float().clone()
        return hook

    def in_hook(key: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            seen[key] = _hidden_arg(args, kwargs).detach().float().clone()
        return hook

    with installed_hooks() as hooks:
        for key, module, kind in taps:
            if kind == "in":
                hooks.pre(module, in_hook(key), with_kwargs=True)
            else:
                hooks.forward(module, out_hook(key), prepend=kind == "raw_out")
        ids = probe_input_ids(model)
        with torch.no_grad():
            model.hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    missing = [key for key, _, _ in taps if key not in seen]
    if missing:
        raise UnsupportedArchitectureError(
            f"a probe forward pass never called {missing[0]}; avec cannot locate the residual "
            f"stream in {type(model.hf).__name__}")
    return seen


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-12))


def probe_tolerance(model: Model) -> float:
    return 1e-3 if model.dtype in (torch.float32, torch.float64) else 3e-2


def _verify_writers(model: Model, writers: list[tuple[str, nn.Module]]) -> None:
    taps: list[tuple[str, nn.Module, str]] = [(name, mod, "out") for name, mod in writers]
    for i, block in enumerate(model.blocks):
        taps += [(f"in{i}", block, "in"), (f"out{i}", block, "raw_out")]
    seen = run_probe(model, taps)
    for i, block in enumerate(model.blocks):
        prefix = f"{model.block_path}.{i}."
        total = seen[f"in{i}"] + sum(v for k, v in seen.items() if k.startswith(prefix))
        err = relative_error(total, seen[f"out{i}"])
        if err > probe_tolerance(model):
            names = ", ".join(n[len(prefix):] for n, _ in writers if n.startswith(prefix))
            raise _unknown_block(block, i, f"its output is not its input plus the outputs of "
                                           f"{names} (relative error {err:.2g})")


# --- ablation ------------------------------------------------------------------------------

def unit_direction(direction: torch.Tensor, d_model: int) -> torch.Tensor:
    """``direction / |direction|`` as float32, after checking shape and values."""
    if not isinstance(direction, torch.Tensor):
        raise SteeringError(f"the direction must be a torch.Tensor of shape [{d_model}], got "
                            f"{type(direction).__name__}; for a SteeringVector pass "
                            f"vector[layer]")
    if direction.dim() != 1 or direction.shape[0] != d_model:
        raise SteeringError(f"the direction has shape {tuple(direction.shape)} but the model's "
                            f"residual stream is {d_model} wide; pass one [{d_model}] direction "
                            f"(e.g. vector[layer] of a vector made on this model)")
    direction = direction.detach().float()
    if not torch.isfinite(direction).all():
        raise SteeringError("the direction contains NaN or infinite values")
    norm = direction.norm()
    if float(norm) == 0.0:
        raise SteeringError("cannot ablate a zero direction: it has no unit vector; check that "
                            "the vector was extracted from distinct contrast sets")
    return direction / norm


def projection(hidden: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Component of ``hidden`` (``[..., d]``) along the unit vector of ``direction``: ``h . u``,
    shape ``[...]``."""
    unit = direction.to(hidden.device, hidden.dtype)
    return hidden @ (unit / unit.norm())


def _as_coef(coef: Coef) -> float | torch.Tensor:
    if isinstance(coef, bool):
        raise SteeringError(f"invalid coefficient {coef!r}")
    if isinstance(coef, (int, float)):
        value: float | torch.Tensor = float(coef)
    else:
        tensor = (coef.detach() if isinstance(coef, torch.Tensor)
                  else torch.tensor([float(c) for c in coef])).float()
        if tensor.dim() > 1:
            raise SteeringError(f"coef must be a number or one number per batch row ([B]), got "
                                f"shape {tuple(tensor.shape)}")
        value = float(tensor) if tensor.dim() == 0 else tensor.flatten()
    if not (bool(torch.isfinite(value).all()) if isinstance(value, torch.Tensor)
            else math.isfinite(value)):
        raise SteeringError("coefficients must be finite")
    return value


def _hidden_arg(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        raise SteeringError("could not find the hidden states a decoder block was called with "
                            "(neither a first positional argument nor hidden_states=)")
    return hidden


def _ablator(unit: torch.Tensor, coef: float | torch.Tensor) -> Callable[[torch.Tensor],
                                                                          torch.Tensor]:
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, Any]] = {}

    def ablate(hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.device, hidden.dtype)
        if key not in cache:
            c = coef.to(hidden.device, hidden.dtype) if isinstance(coef, torch.Tensor) else coef
            cache[key] = (unit.to(hidden.device, hidden.dtype), c)
        u, c = cache[key]
        if isinstance(c, torch.Tensor):
            if c.shape[0] != hidden.shape[0]:
                raise SteeringError(
                    f"{c.shape[0]} per-row coefficients were given but the batch has "
                    f"{hidden.shape[0]} rows; give one coefficient per row (beam search and "
                    f"num_return_sequences > 1 multiply the rows)")
            c = c.view(-1, *([1] * (hidden.dim() - 1)))
        return hidden - c * (hidden @ u).unsqueeze(-1) * u

    return ablate


@contextlib.contextmanager
def ablate_direction(model: Model, direction: torch.Tensor,
                     coef: Coef = 1.0) -> Iterator[torch.Tensor]:
    """Remove ``direction`` from everything written into the residual stream, inside a
    ``with`` block.

    With ``u = direction / |direction|``, ``h <- h - coef * (h . u) u`` is applied to the
    residual stream entering block 0 and to the output of every residual writer (see
    :func:`residual_writers`; for attention modules returning tuples, to the first element).
    With ``coef=1`` every block output has ~0 component along ``u``. Works with
    ``model.hf.generate`` and the KV cache (cached keys/values come from ablated states).

    Args:
        direction: a ``[d_model]`` tensor (any scale; only its direction is used).
        coef: a number, or one number per batch row (a ``[B]`` tensor or sequence); ``0``
            leaves the model unchanged, ``1`` removes the direction.

    Yields the float32 unit direction ``u``. Hooks are removed on exit, also on exceptions.

    Raises:
        SteeringError: zero or non-finite direction, wrong width, invalid coefficients.
        UnsupportedArchitectureError: the blocks' residual writers cannot be identified.
    """
    unit = unit_direction(direction, model.d_model)
    value = _as_coef(coef)
    writers = residual_writers(model)
    ablate = _ablator(unit, value)

    def writer_hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        return replace_block_output(output, ablate(block_output(output)))

    def entry_hook(_module: nn.Module, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        hidden = ablate(_hidden_arg(args, kwargs))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    with installed_hooks() as hooks:
        if not (isinstance(value, float) and value == 0.0):
            hooks.pre(model.blocks[0], entry_hook, with_kwargs=True, prepend=True)
            for _name, module in writers:
                hooks.forward(module, writer_hook, prepend=True)
        yield unit
