"""A bounded check of a safetensors file's header, run before ``safetensors.safe_open``.

Layout: a little-endian u64 ``N``, ``N`` bytes of a UTF-8 JSON object, then the data region.
The object maps tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets
into the data region) plus an optional ``"__metadata__"`` object of string values.
:func:`check_safetensors` reads only the 8-byte length and then at most ``N`` bytes, after
checking ``N`` against the file's real size and a cap; it refuses nesting deeper than the
format has, unknown dtypes, shapes whose size disagrees with their byte span, and spans that
overlap, leave gaps or fall outside the data region. It returns the parsed header.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from avec.errors import VectorFileError
from avec.formats.jsonsafe import JSONInputError, loads

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap
METADATA = "__metadata__"

# bits per element of every dtype the safetensors format names
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
              "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry_span(path: Path, name: str, info: Any, data_size: int) -> tuple[int, int]:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise VectorFileError(f"{where}: header entry must be an object with exactly 'dtype', "
                              f"'shape' and 'data_offsets'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise VectorFileError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise VectorFileError(f"{where}: shape must be a list of non-negative integers, got "
                              f"{shape!r}"[:300])
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]):
        raise VectorFileError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= "
                              f"end, got {offsets!r}"[:300])
    begin, end = offsets
    if end > data_size:
        raise VectorFileError(f"{where}: data_offsets {offsets} run past the data region of "
                              f"{data_size} bytes (the file is truncated or its header lies)")
    n = 1
    for dim in shape:
        n *= dim
    bits = n * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise VectorFileError(f"{where}: shape {shape} of {dtype} takes {bits / 8:g} bytes but "
                              f"data_offsets span {end - begin}")
    return begin, end


def check_header(path: Path, header: Any, data_size: int, max_tensors: int) -> None:
    """Validate a parsed header object against a data region of ``data_size`` bytes."""
    if not isinstance(header, dict):
        raise VectorFileError(f"{path}: the safetensors header must be a JSON object")
    meta = header.get(METADATA)
    if meta is not None and (not isinstance(meta, dict)
                             or not all(isinstance(v, str) for v in meta.values())):
        raise VectorFileError(f"{path}: {METADATA} must be an object of string values")
    names = [k for k in header if k != METADATA]
    if len(names) > max_tensors:
        raise VectorFileError(f"{path}: the header declares {len(names)} tensors (at most "
                              f"{max_tensors})")
    spans = sorted((_entry_span(path, k, header[k], data_size), k) for k in names)
    pos = 0
    for (begin, end), name in spans:
        if begin != pos:
            raise VectorFileError(f"{path}: tensor {name!r} starts at byte {begin} of the data "
                                  f"region where {pos} was expected (tensors overlap or leave "
                                  f"a gap)")
        pos = end
    if pos != data_size:
        raise VectorFileError(f"{path}: the tensors cover {pos} bytes but the data region holds "
                              f"{data_size}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise VectorFileError(f"key {key!r} appears twice in the safetensors header")
        seen[key] = value
    return seen


def check_safetensors(path: str | Path, *, max_header_bytes: int = MAX_HEADER_BYTES,
                      max_tensors: int = 100_000) -> dict[str, Any]:
    """Check the safetensors file at ``path`` before it is opened; return its parsed header.

    Raises :class:`VectorFileError` naming the file and what is wrong.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(0)
            if size < 8:
                raise VectorFileError(f"{path}: not a valid safetensors file ({size} bytes; "
                                      f"the header length alone takes 8)")
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise VectorFileError(f"{path}: not a valid safetensors file: the header "
                                      f"declares {n} bytes but the file has {size - 8} after "
                                      f"the length")
            if n > max_header_bytes:
                raise VectorFileError(f"{path}: the safetensors header declares {n} bytes (at "
                                      f"most {max_header_bytes})")
            raw = fh.read(n)
    except OSError as exc:
        raise VectorFileError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise VectorFileError(f"{path}: not a valid safetensors file: the header is not UTF-8 "
                              f"text") from None
    text = text.rstrip(" ")  # the writer pads the header with spaces to an 8-byte multiple
    try:
        # three levels: header -> tensor entry -> shape / data_offsets list
        header = loads(text, max_depth=3, object_pairs_hook=_no_duplicates)
    except JSONInputError as exc:
        raise VectorFileError(f"{path}: not a valid safetensors file: header {exc.message}"
                              ) from None
    except VectorFileError as exc:
        raise VectorFileError(f"{path}: {exc}") from None
    check_header(path, header, size - 8 - n, max_tensors)
    return header
