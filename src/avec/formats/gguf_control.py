"""llama.cpp control vectors: GGUF files with one ``direction.<L>`` tensor per layer.

This is the format llama.cpp loads with ``--control-vector`` and that repeng's
``ControlVector.export_gguf`` writes: architecture ``controlvector``, a ``model_hint`` string
(the model type, e.g. ``llama``) and float32 tensors ``direction.<L>`` of width d_model.
llama.cpp adds ``direction.L`` to the output of block ``L`` (0-based; its loader rejects
``direction.0``), and repeng's layer ``L`` is ``hidden_states[L + 1]``, the output of block
``L``: the same convention as avec's layer ``L``, so indices carry over unchanged.

Reading uses ``gguf.GGUFReader`` (a memory map of plain tensors) after a bounded check of the
header (:mod:`avec.formats.gguf_check`); nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from avec.errors import VectorFileError
from avec.formats.gguf_check import check_gguf
from avec.formats.vector_checks import directions_from

if TYPE_CHECKING:  # the vector type lives above this reader: avec.vector builds it
    from avec.vector import SteeringVector

ARCH = "controlvector"
TENSOR_PREFIX = "direction."


def _field_str(reader: Any, key: str) -> str | None:
    """A string field's value (None when the key is absent or holds something else)."""
    from gguf import GGUFValueType

    field = reader.get_field(key)
    if field is None or list(field.types) != [GGUFValueType.STRING] or not len(field.data):
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_gguf_control(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Read a llama.cpp / repeng control-vector GGUF file as ``(directions, metadata)``;
    :func:`avec.vector.read_gguf_control_vector` builds the :class:`SteeringVector`.

    The header is walked with bounds first (:func:`avec.formats.gguf_check.check_gguf`), so a
    file that declares more than it holds is refused before ``GGUFReader`` allocates anything;
    tensors are then checked after conversion to float32 (:mod:`avec.formats.vector_checks`)."""
    from gguf import GGMLQuantizationType, GGUFReader

    path = Path(path)
    if not path.exists():
        raise VectorFileError(f"{path}: control-vector file not found")
    if not path.is_file():
        raise VectorFileError(f"{path}: not a regular file (a directory?); give a .gguf file")
    check_gguf(path)
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on malformed files
        raise VectorFileError(f"{path}: not a readable GGUF file ({exc})") from None
    arch = _field_str(reader, "general.architecture")
    if arch != ARCH:
        raise VectorFileError(f"{path}: GGUF architecture is {arch!r}"[:200] + f", not {ARCH!r}; "
                              f"this is a model file, not a control vector")
    floats = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64)
    raw: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type not in floats:
            raise VectorFileError(f"{path}: tensor {tensor.name!r} has type "
                                  f"{tensor.tensor_type.name}, expected F32, F16 or F64")
        data = np.asarray(tensor.data)
        if sum(n > 1 for n in data.shape) > 1:
            raise VectorFileError(f"{path}: tensor {tensor.name!r} has shape {data.shape}; a "
                                  f"control vector holds one 1-D direction per layer")
        native = np.array(data, dtype=data.dtype.newbyteorder("="), copy=True)
        raw[tensor.name] = torch.from_numpy(native.reshape(-1))
    directions = directions_from(path, raw, TENSOR_PREFIX)
    meta = {"method": "imported", "source_format": "gguf control vector",
            "source_file": path.name, "model_hint": _field_str(reader, f"{ARCH}.model_hint")}
    return directions, meta


def write_gguf_control_vector(vector: SteeringVector, path: str | Path, *,
                              model_hint: str | None = None) -> Path:
    """Write ``vector`` as a llama.cpp control-vector GGUF (``direction.<L>``, float32).

    ``model_hint`` defaults to the model type recorded in the vector's metadata. A vector on
    layer 0 cannot be written: llama.cpp has no slot for block 0's output.
    """
    from gguf import GGUFWriter

    if len(vector.shape) != 1:
        raise VectorFileError(f"a control vector needs one [d] direction per layer; this vector "
                              f"has shape {vector.shape} (ActAdd blocks cannot be exported)")
    if 0 in vector.layers:
        raise VectorFileError("llama.cpp control vectors cannot steer layer 0 (its loader "
                              "rejects direction.0); select layers >= 1 first")
    made_on = vector.metadata.get("model") if isinstance(vector.metadata.get("model"), dict) else {}
    hint = model_hint or made_on.get("model_type") or made_on.get("family") or "llama"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", str(hint))
    writer.add_uint32(f"{ARCH}.layer_count", len(vector.layers))
    for layer in vector.layers:
        data = vector[layer].detach().to("cpu", torch.float32).numpy()
        writer.add_tensor(f"{TENSOR_PREFIX}{layer}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
