"""``SteeringVector``: one direction per layer, metadata, algebra and safetensors I/O.

A vector file is data, never code: tensors ``layer.<L>`` (float32) in a safetensors file whose
header metadata holds one JSON document under the key ``"avec"``. Loading uses
``safetensors.safe_open`` only; nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from avec._version import __version__
from avec.errors import VectorFileError
from avec.formats.vector_checks import (SAFETENSORS_FLOAT_DTYPES, check_metadata, directions_from,
                                layer_index)

FORMAT_VERSION = 1
METADATA_KEY = "avec"
TENSOR_PREFIX = "layer."
RECOMMENDED_KEY = "recommended"


@dataclass(frozen=True)
class Recommendation:
    """How to use a vector, as ``avec tune`` measured it: ``op`` with ``coef`` at ``layers`` on
    ``positions`` (``value`` for clamp). It lives in the vector file's metadata under
    ``recommended``, next to ``details``: the budget it was tuned under, the score it reached
    (held-in and held-out), the model it was measured on and how (``avec tune`` writes them;
    they are kept as given). ``generate``, ``serve`` and the playground use it when a command or
    request gives no coefficient."""

    layers: tuple[int, ...]
    coef: float
    op: str = "add"
    positions: str | int = "all"
    value: float = 0.0
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "coef": self.coef, "op": self.op,
                "positions": self.positions, "value": self.value, **dict(self.details)}

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> "Recommendation":
        """Read a ``recommended`` block (its types are checked when the file is loaded)."""
        core = ("layers", "coef", "op", "positions", "value")
        return cls(tuple(int(L) for L in block["layers"]), float(block["coef"]),
                   str(block.get("op", "add")), block.get("positions", "all"),
                   float(block.get("value", 0.0)),
                   {k: v for k, v in block.items() if k not in core})

    def scaled(self, factor: float) -> "Recommendation":
        """The same setting with ``factor`` times the coefficient."""
        return replace(self, coef=self.coef * float(factor))


@dataclass
class SteeringVector:
    """Per-layer directions plus metadata.

    ``directions[L]`` is read at, and added back to, the output of decoder block ``L``
    (0-based). Metadata keys written by avec: ``model`` (identity of the model it was made on),
    ``method``, ``positions`` (where it was read), ``n_pairs``, ``avec_version``, ``created``;
    any other JSON-serialisable keys are kept.
    """

    directions: dict[int, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.directions:
            raise ValueError("a SteeringVector needs at least one layer")
        shapes = {tuple(t.shape) for t in self.directions.values()}
        if len(shapes) != 1:
            raise ValueError(f"all layers must have the same shape, got {sorted(shapes)}")
        self.directions = {int(k): v for k, v in sorted(self.directions.items())}

    # ---- shape ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.directions)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(next(iter(self.directions.values())).shape)

    @property
    def width(self) -> int:
        """Size of the last dimension (d_model for a language model)."""
        return self.shape[-1]

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    def norms(self) -> dict[int, float]:
        return {k: float(v.float().norm()) for k, v in self.directions.items()}

    # ---- algebra -------------------------------------------------------------------------
    def _combine(self, other: "SteeringVector", sign: float, op: str) -> "SteeringVector":
        if not isinstance(other, SteeringVector):
            return NotImplemented  # type: ignore[return-value]
        if other.shape != self.shape:
            raise ValueError(f"cannot {op} vectors of shapes {self.shape} and {other.shape}")
        layers = sorted(set(self.directions) | set(other.directions))
        zero = torch.zeros(self.shape)
        out = {L: self.directions.get(L, zero) + sign * other.directions.get(L, zero)
               for L in layers}
        symbol = "+" if sign > 0 else "-"
        method = f"({self.metadata.get('method', '?')} {symbol} {other.metadata.get('method', '?')})"
        return SteeringVector(out, {**self.metadata, "method": method})

    def __add__(self, other: "SteeringVector") -> "SteeringVector":
        return self._combine(other, 1.0, "add")

    def __sub__(self, other: "SteeringVector") -> "SteeringVector":
        return self._combine(other, -1.0, "subtract")

    def __mul__(self, scalar: float) -> "SteeringVector":
        if not isinstance(scalar, (int, float)):
            return NotImplemented  # type: ignore[return-value]
        return replace(self, directions={k: v * float(scalar) for k, v in self.directions.items()},
                       metadata=dict(self.metadata))

    __rmul__ = __mul__

    def __neg__(self) -> "SteeringVector":
        return self * -1.0

    def __truediv__(self, scalar: float) -> "SteeringVector":
        return self * (1.0 / scalar)

    def normalize(self, norm: float = 1.0) -> "SteeringVector":
        """Scale every layer's direction to the given L2 norm (1 by default)."""
        out = {}
        for k, v in self.directions.items():
            n = v.float().norm()
            if n == 0:
                raise ValueError(f"layer {k} is the zero vector and cannot be normalized")
            out[k] = v * (norm / n)
        return SteeringVector(out, dict(self.metadata))

    def cosine(self, other: "SteeringVector") -> dict[int, float]:
        """Cosine similarity per layer the two vectors share."""
        shared = [L for L in self.directions if L in other.directions]
        if not shared:
            raise ValueError(f"no shared layers: {self.layers} vs {other.layers}")
        return {L: float(torch.nn.functional.cosine_similarity(
            self.directions[L].flatten().double(), other.directions[L].flatten().double(), dim=0))
            for L in shared}

    def select(self, layers: list[int]) -> "SteeringVector":
        """A vector restricted to some of its layers (a ``recommended`` setting that needs
        other layers is dropped)."""
        missing = [L for L in layers if L not in self.directions]
        if missing:
            raise ValueError(f"vector has no layer(s) {missing}; it has {self.layers}")
        meta = dict(self.metadata)
        rec = self.recommended
        if rec is not None and not set(rec.layers) <= set(layers):
            meta.pop(RECOMMENDED_KEY)
        return SteeringVector({L: self.directions[L] for L in layers}, meta)

    # ---- how to use it ---------------------------------------------------------------------
    @property
    def recommended(self) -> Recommendation | None:
        """The setting ``avec tune`` recommended for this vector, if any."""
        block = self.metadata.get(RECOMMENDED_KEY)
        return Recommendation.from_dict(block) if isinstance(block, Mapping) else None

    def with_recommendation(self, rec: Recommendation) -> "SteeringVector":
        """A copy whose metadata carries ``rec`` (its layers must be this vector's)."""
        missing = [L for L in rec.layers if L not in self.directions]
        if missing:
            raise ValueError(f"the recommended layers {missing} are not in this vector "
                             f"({self.layers})")
        return SteeringVector(dict(self.directions),
                              {**self.metadata, RECOMMENDED_KEY: rec.to_dict()})

    def require_recommended(self, what: str = "this vector") -> Recommendation:
        """:attr:`recommended`, or a :class:`ValueError` that says what to do instead."""
        rec = self.recommended
        if rec is None:
            raise ValueError(f"{what} has no recommended setting: give a coefficient (and "
                             f"layers), or run `avec tune` on it to measure one")
        return rec

    # ---- I/O -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (float32 tensors ``layer.<L>``, JSON metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "avec_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **self.metadata, "layers": self.layers, "shape": list(self.shape)}
        tensors = {f"{TENSOR_PREFIX}{k}": v.detach().to("cpu", torch.float32).contiguous()
                   for k, v in self.directions.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path, *, expected_width: int | None = None) -> "SteeringVector":
        """Read a vector file, refusing anything malformed, non-finite or of the wrong width.

        The header is checked (:func:`avec.formats.safetensors_check.check_safetensors`) before
        safetensors opens the file; tensors are checked after conversion to float32
        (:mod:`avec.formats.vector_checks`)."""
        from safetensors import SafetensorError, safe_open

        from avec.formats.safetensors_check import METADATA, check_safetensors

        path = Path(path)
        _require_file(path)
        try:
            header = check_safetensors(path)
        except VectorFileError as exc:
            if "not a valid safetensors" not in str(exc):
                raise
            raise VectorFileError(f"{exc}. avec vector files are safetensors; avec never loads "
                                  f"pickled (.pt/.pkl) files") from None
        meta = _parse_metadata(path, header.get(METADATA) or {})
        for name, info in header.items():
            if name != METADATA:
                layer_index(path, name, TENSOR_PREFIX)
                if info["dtype"] not in SAFETENSORS_FLOAT_DTYPES:
                    raise VectorFileError(
                        f"{path}: tensor {name!r} has dtype {info['dtype']}; a direction must "
                        f"be one of {', '.join(SAFETENSORS_FLOAT_DTYPES)} (floating point)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
            raise VectorFileError(
                f"{path}: not a valid safetensors file ({exc}). avec vector files are "
                f"safetensors; avec never loads pickled (.pt/.pkl) files") from None
        return cls._from_parts(path, meta, tensors, expected_width)

    @classmethod
    def _from_parts(cls, path: Path, meta: dict[str, Any], tensors: Mapping[str, torch.Tensor],
                    expected_width: int | None) -> "SteeringVector":
        directions = directions_from(path, tensors, TENSOR_PREFIX,
                                     any_shape=isinstance(meta.get("sites"), dict))
        check_metadata(path, meta, directions, FORMAT_VERSION)
        vec = cls(directions, meta)
        if expected_width is not None and vec.width != expected_width:
            raise VectorFileError(_width_message(path, vec, expected_width))
        return vec

    def check_model(self, model: Any) -> None:
        """Raise if this vector cannot be applied to ``model`` (width, layer range, and for a
        language model a ``[d]`` or ``[T, d]`` shape)."""
        if len(self.shape) > 2 and hasattr(model, "tokenizer"):
            raise VectorFileError(f"vector shape {list(self.shape)} cannot steer a language "
                                  f"model: directions must be [d] or [T, d]")
        if self.width != model.d_model:
            raise VectorFileError(_width_message(None, self, model.d_model, model.name))
        bad = [L for L in self.layers if not 0 <= L < model.n_layers]
        if bad:
            raise VectorFileError(f"vector has layer(s) {bad} but {model.name} has layers "
                                  f"0..{model.n_layers - 1}")

    def describe(self) -> dict[str, Any]:
        """Metadata plus per-layer norms (what ``avec info`` prints)."""
        norms = self.norms()
        return {**self.metadata, "layers": self.layers, "shape": list(self.shape),
                "norms": {str(k): round(v, 6) for k, v in norms.items()},
                "finite": all(math.isfinite(v) for v in norms.values())}


def _width_message(path: Path | None, vec: SteeringVector, width: int, name: str = "") -> str:
    made_on = vec.metadata.get("model", {})
    origin = f" (made on {made_on.get('name')}, d_model {made_on.get('d_model')})" \
        if isinstance(made_on, dict) and made_on.get("name") else ""
    where = f"{path}: " if path else ""
    return (f"{where}vector width {vec.width}{origin} does not match the model width {width}"
            f"{' of ' + name if name else ''}; extract a vector on this model")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise VectorFileError(f"{path}: vector file not found")
    if not path.is_file():
        raise VectorFileError(f"{path}: not a regular file (a directory?); give a vector file")


def _parse_metadata(path: Path, header: Mapping[str, str]) -> dict[str, Any]:
    """The avec metadata object of a safetensors header (bounded JSON, valid Unicode)."""
    from avec.formats.jsonsafe import JSONInputError, loads

    if METADATA_KEY not in header:
        raise VectorFileError(f"{path}: no {METADATA_KEY!r} metadata in the safetensors "
                              f"header; this is not an avec vector file")
    try:
        meta = loads(header[METADATA_KEY], max_depth=32)
    except JSONInputError as exc:
        raise VectorFileError(f"{path}: malformed JSON metadata ({exc.message})") from None
    if not isinstance(meta, dict):
        raise VectorFileError(f"{path}: metadata must be a JSON object")
    return meta


def load_vector(path: str | Path, model: Any = None) -> SteeringVector:
    """Load a vector file (avec safetensors, or a llama.cpp/repeng control-vector ``.gguf``);
    with ``model``, also check it fits that model."""
    width = model.d_model if model is not None else None
    if Path(path).suffix.lower() == ".gguf":
        vec = read_gguf_control_vector(path, expected_width=width)
    else:
        vec = SteeringVector.load(path, expected_width=width)
    if model is not None:
        vec.check_model(model)
    return vec


def read_gguf_control_vector(path: str | Path, *,
                             expected_width: int | None = None) -> SteeringVector:
    """Read a llama.cpp / repeng control-vector GGUF file as a :class:`SteeringVector`
    (the format is parsed by :func:`avec.formats.gguf_control.read_gguf_control`)."""
    from avec.formats.gguf_control import read_gguf_control

    directions, meta = read_gguf_control(path)
    out = SteeringVector(directions, meta)
    if expected_width is not None and out.width != expected_width:
        raise VectorFileError(f"{path}: control vector width {out.width} does not match the "
                              f"model width {expected_width}")
    return out
