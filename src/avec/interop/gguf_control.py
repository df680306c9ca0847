"""llama.cpp control vectors: GGUF files with one ``direction.<L>`` tensor per layer.

This is the format llama.cpp loads with ``--control-vector`` and that repeng's
``ControlVector.export_gguf`` writes: architecture ``controlvector``, a ``model_hint`` string
(the model type, e.g. ``llama``) and float32 tensors ``direction.<L>`` of width d_model.
llama.cpp adds ``direction.L`` to the output of block ``L`` (0-based; its loader rejects
``direction.0``), and repeng's layer ``L`` is ``hidden_states[L + 1]``, the output of block
``L``: the same convention as avec's layer ``L``, so indices carry over unchanged.

Reading uses ``gguf.GGUFReader`` (a memory map of plain tensors); nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from avec.errors import VectorFileError
from avec.vector import SteeringVector

ARCH = "controlvector"
TENSOR_PREFIX = "direction."


def _field_str(reader: Any, key: str) -> str | None:
    field = reader.get_field(key)
    if field is None or not len(field.parts):
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_gguf_control_vector(path: str | Path, *,
                             expected_width: int | None = None) -> SteeringVector:
    """Read a llama.cpp / repeng control-vector GGUF file as a :class:`SteeringVector`."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"{path}: control-vector file not found")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on malformed files
        raise VectorFileError(f"{path}: not a readable GGUF file ({exc})") from None
    arch = _field_str(reader, "general.architecture")
    if arch != ARCH:
        raise VectorFileError(f"{path}: GGUF architecture is {arch!r}, not {ARCH!r}; this is a "
                              f"model file, not a control vector")
    directions: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        suffix = name[len(TENSOR_PREFIX):]
        if not name.startswith(TENSOR_PREFIX) or not suffix.isdigit():
            raise VectorFileError(f"{path}: unexpected tensor {name!r}; expected 'direction.<N>'")
        data = np.asarray(tensor.data)
        if sum(n > 1 for n in data.shape) > 1:
            raise VectorFileError(f"{path}: tensor {name!r} has shape {data.shape}; a control "
                                  f"vector holds one 1-D direction per layer")
        if data.dtype not in (np.float32, np.float16):
            raise VectorFileError(f"{path}: tensor {name!r} has type {data.dtype}, expected float")
        vec = torch.from_numpy(data.astype(np.float32).reshape(-1).copy())
        if not torch.isfinite(vec).all():
            raise VectorFileError(f"{path}: tensor {name!r} has NaN/inf values")
        directions[int(suffix)] = vec
    if not directions:
        raise VectorFileError(f"{path}: the file holds no 'direction.<N>' tensors")
    widths = {int(v.numel()) for v in directions.values()}
    if len(widths) != 1:
        raise VectorFileError(f"{path}: directions have different widths {sorted(widths)}")
    meta = {"method": "imported", "source_format": "gguf control vector",
            "source_file": path.name, "model_hint": _field_str(reader, f"{ARCH}.model_hint")}
    out = SteeringVector(directions, meta)
    if expected_width is not None and out.width != expected_width:
        raise VectorFileError(f"{path}: control vector width {out.width} does not match the "
                              f"model width {expected_width}")
    return out


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
