"""What a steering-vector file must hold, checked after conversion to float32.

Both readers (avec safetensors in :mod:`avec.vector`, llama.cpp GGUF in
:mod:`avec.formats.gguf_control`) hand their raw tensors and metadata here:

- tensor names ``<prefix><N>`` with ASCII digits; two names for one layer (``layer.014`` and
  ``layer.14``) are refused, naming both;
- dtype float16, bfloat16, float32 or float64 (no integers, bool or float8), converted to
  float32, the working dtype, *before* the finiteness check (a float64 1e300 becomes inf);
- a non-empty ``[d]`` or ``[T, d]`` tensor (a vector for an arbitrary module, whose metadata
  records its ``sites``, may have up to 8 dimensions), every layer the same shape, a finite norm;
- metadata fields avec writes or reads have the right types and ranges (:func:`check_metadata`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from avec.errors import VectorFileError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_LAYER = 100_000
MAX_MODULE_DIMS = 8
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_DIGITS = re.compile(r"[0-9]{1,6}")


def layer_index(path: Path, name: str, prefix: str) -> int:
    """The layer of tensor ``name`` (``prefix`` + ASCII digits), or a :class:`VectorFileError`."""
    suffix = name[len(prefix):] if name.startswith(prefix) else None
    if suffix is None or not _DIGITS.fullmatch(suffix) or int(suffix) > MAX_LAYER:
        raise VectorFileError(f"{path}: unexpected tensor {name!r}"[:300]
                              + f"; expected '{prefix}<N>' with N a layer index 0..{MAX_LAYER}")
    return int(suffix)


def to_direction(path: Path, name: str, tensor: torch.Tensor, *, any_shape: bool = False
                 ) -> torch.Tensor:
    """``tensor`` as a float32 direction, refusing bad dtypes, shapes and values."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise VectorFileError(f"{path}: tensor {name!r} has dtype {tensor.dtype}; a direction "
                              f"must be float16, bfloat16, float32 or float64")
    max_dims = MAX_MODULE_DIMS if any_shape else 2
    if not 1 <= tensor.dim() <= max_dims:
        kind = "a module vector's direction has 1.." + str(MAX_MODULE_DIMS) + " dimensions" \
            if any_shape else "a language-model direction is [d] or [T, d]"
        raise VectorFileError(f"{path}: tensor {name!r} has shape {list(tensor.shape)}; {kind}")
    if tensor.numel() == 0:
        raise VectorFileError(f"{path}: tensor {name!r} is empty (shape {list(tensor.shape)})")
    out = tensor.detach().to("cpu", torch.float32).contiguous()
    finite = torch.isfinite(out)
    if not finite.all():
        bad = int((~finite).sum())
        raise VectorFileError(f"{path}: tensor {name!r} has {bad} NaN/inf values (after "
                              f"conversion to float32, whose largest value is {FLOAT32_MAX:.3g})")
    if not math.isfinite(float(torch.linalg.vector_norm(out))):
        raise VectorFileError(f"{path}: tensor {name!r} has an infinite norm in float32; scale "
                              f"it down")
    return out


def directions_from(path: Path, tensors: Mapping[str, torch.Tensor], prefix: str, *,
                    any_shape: bool = False) -> dict[int, torch.Tensor]:
    """``{layer: float32 direction}`` from named raw tensors (see the module docstring)."""
    directions: dict[int, torch.Tensor] = {}
    names: dict[int, str] = {}
    for name, tensor in tensors.items():
        layer = layer_index(path, name, prefix)
        if layer in names:
            raise VectorFileError(f"{path}: tensors {names[layer]!r} and {name!r} are both layer "
                                  f"{layer}; keep one")
        names[layer] = name
        directions[layer] = to_direction(path, name, tensor, any_shape=any_shape)
    if not directions:
        raise VectorFileError(f"{path}: the file holds no '{prefix}<N>' tensors")
    shapes = {tuple(t.shape) for t in directions.values()}
    if len(shapes) != 1:
        raise VectorFileError(f"{path}: layers have different shapes "
                              f"{sorted(list(s) for s in shapes)}")
    return dict(sorted(directions.items()))


# ---- metadata -----------------------------------------------------------------------------

def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)
            and math.isfinite(x) and abs(x) <= FLOAT32_MAX)


def _count(x: Any) -> bool:
    return _is_int(x) and 0 <= x <= 2**31 - 1


def _str(x: Any) -> bool:
    return isinstance(x, str) and len(x) <= 100_000


def _position(x: Any) -> bool:
    return _str(x) or (_is_int(x) and abs(x) <= 2**31 - 1)


def _layer_list(x: Any) -> bool:
    return isinstance(x, list) and all(_count(v) for v in x)


_MODEL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (_str, "a string"), "family": (_str, "a string"),
    "model_type": (_str, "a string"), "n_layers": (_count, "a non-negative integer"),
    "d_model": (_count, "a non-negative integer"),
    "sites": (lambda x: isinstance(x, list) and all(map(_str, x)), "a list of strings"),
}

_REFUSAL_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "layer": (_count, "a layer index"), "position": (_position, "an integer"),
    "token": (_str, "a string"),
    **{key: (_is_number, "a finite number") for key in (
        "harmful_mean_projection", "harmless_mean_projection", "bypass", "induce", "kl")},
    "baseline": (lambda x: isinstance(x, dict) and all(map(_is_number, x.values())),
                 "an object of finite numbers (harmful, harmless)"),
    "refusal_tokens": (lambda x: isinstance(x, list) and all(map(_str, x)), "a list of strings"),
}

_RECOMMENDED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "layers": (lambda x: _layer_list(x) and len(x) > 0, "a non-empty list of layer indices"),
    "coef": (_is_number, "a finite number"),
    "op": (lambda x: x in ("add", "ablate", "clamp"), "add, ablate or clamp"),
    "positions": (_position, "a string or an integer"),
    "value": (_is_number, "a finite number"),
    **{key: (lambda x: isinstance(x, dict), "an object") for key in (
        "budget", "score", "model", "measured")},
}

FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "format_version": (lambda x: _is_int(x) and x >= 1, "an integer >= 1"),
    "avec_version": (_str, "a string"), "created": (_str, "a string"),
    "method": (_str, "a string"), "positions": (_position, "a string or an integer"),
    "n_pairs": (_count, "a non-negative integer"), "chat_template": (
        lambda x: isinstance(x, bool), "true or false"),
    "seed": (lambda x: _is_int(x) and abs(x) < 2**64, "an integer"),
    "layers": (_layer_list, "a list of layer indices"),
    "shape": (lambda x: isinstance(x, list) and all(_count(v) for v in x),
              "a list of non-negative integers"),
    "model": (lambda x: isinstance(x, dict), "an object"),
    "clamp_value": (_is_number, "a finite number"),
    "sites": (lambda x: isinstance(x, dict) and all(map(_str, x.values())),
              "an object of layer: site name"),
    "refusal": (lambda x: isinstance(x, dict), "an object"),
    "source_pairs": (_str, "a string"), "source_format": (_str, "a string"),
    "source_file": (_str, "a string"), "model_hint": (lambda x: x is None or _str(x),
                                                      "a string"),
    "tokens": (_count, "a non-negative integer"),
    "prompts": (lambda x: isinstance(x, list) and all(map(_str, x)), "a list of strings"),
    "recommended": (lambda x: isinstance(x, dict) and "layers" in x and "coef" in x,
                    "an object with layers and coef"),
}


def check_metadata(path: Path, meta: Mapping[str, Any], directions: Mapping[int, torch.Tensor],
                   format_version: int) -> None:
    """Raise unless every field avec reads has the right type and agrees with the tensors."""
    for key, (ok, kind) in FIELDS.items():
        if key in meta and not ok(meta[key]):
            raise VectorFileError(f"{path}: metadata field {key!r} must be {kind}, got "
                                  f"{_short(meta[key])}")
    for outer, fields in (("model", _MODEL_FIELDS), ("refusal", _REFUSAL_FIELDS),
                          ("recommended", _RECOMMENDED_FIELDS)):
        inner = meta.get(outer, {})
        for key, (ok, kind) in fields.items():
            if key in inner and not ok(inner[key]):
                raise VectorFileError(f"{path}: metadata field '{outer}.{key}' must be {kind}, "
                                      f"got {_short(inner[key])}")
    if meta.get("format_version", 1) > format_version:
        raise VectorFileError(f"{path}: format version {meta['format_version']} is newer than "
                              f"this avec reads ({format_version}); upgrade avec")
    layers = sorted(directions)
    if "layers" in meta and sorted(meta["layers"]) != layers:
        raise VectorFileError(f"{path}: metadata lists layers {_short(meta['layers'])} but the "
                              f"file holds {layers}")
    rec = meta.get("recommended")
    if rec is not None and not set(rec["layers"]) <= set(layers):
        raise VectorFileError(f"{path}: the recommended setting uses layer(s) "
                              f"{_short(sorted(set(rec['layers']) - set(layers)))} that the file "
                              f"does not hold ({layers})")
    shape = list(next(iter(directions.values())).shape)
    if "shape" in meta and meta["shape"] != shape:
        raise VectorFileError(f"{path}: metadata says shape {_short(meta['shape'])} but the "
                              f"tensors are {shape}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
