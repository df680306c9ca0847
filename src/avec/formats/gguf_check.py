"""A bounded walk over a GGUF file's header, run before ``gguf.GGUFReader`` sees the file.

``GGUFReader`` trusts every count and length a file declares: a 102-byte file that declares an
array of 2^40 elements makes it allocate tens of GB, and 2^20 declared elements keep it busy
for seconds. :func:`check_gguf` reads the same header (magic, version, tensor and key-value
counts, every key, every value including nested arrays, every tensor's name, dimensions, type
and offset) from a memory map, checking each declared length against the bytes that are really
left in the file and against caps, and never allocates more than a few small Python objects. A
file it accepts can be handed to ``GGUFReader``: every field fits in the file, every tensor's
data lies inside the data region, names are unique UTF-8, the alignment is a power of two.

Layout (GGUF v2/v3, either byte order): ``"GGUF"``, u32 version, u64 tensor count, u64 kv count;
kv = string key, u32 value type, value; string = u64 length + bytes; array = u32 element type,
u64 count, elements; tensor info = string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64
offset (from the data region, which starts at the next multiple of ``general.alignment``).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from avec.errors import VectorFileError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value types: fixed sizes of the scalar ones; 8 is a string, 9 an array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class GGUFLimits:
    """Caps on what one GGUF file may declare (defaults fit a llama.cpp control vector, whose
    header holds a few keys and one tensor per layer)."""

    max_tensors: int = 4096
    max_kv: int = 1024
    max_string_bytes: int = 1 << 20
    max_array_elements: int = 1 << 16  # summed over every array in the file
    max_array_depth: int = 2


def _tensor_sizes() -> dict[int, tuple[int, int]]:
    """``{ggml type: (block size, bytes per block)}`` from the installed gguf package."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}


class _Cursor:
    """Reads little- or big-endian fields from a buffer, refusing any read past its end."""

    def __init__(self, buf: memoryview | bytes, path: Path, order: str) -> None:
        self.buf, self.path, self.order, self.pos = buf, path, order, 0
        self.size = len(buf)

    def fail(self, what: str) -> VectorFileError:
        return VectorFileError(f"{self.path}: not a readable GGUF file: {what} (at byte "
                               f"{self.pos} of {self.size})")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.left():
            raise self.fail(f"{what} needs {n} bytes but only {self.left()} are left")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = struct.unpack_from(self.order + "I", self.buf, self.pos)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = struct.unpack_from(self.order + "Q", self.buf, self.pos)
        self.pos += 8
        return int(value)

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def string(self, what: str, limits: GGUFLimits, *, decode: bool = False) -> str | None:
        n = self.u64(f"length of {what}")
        if n > limits.max_string_bytes:
            raise self.fail(f"{what} declares {n} bytes (at most {limits.max_string_bytes})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n]) if decode else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


class _Budget:
    """Array elements still allowed in the file."""

    def __init__(self, cur: _Cursor, limits: GGUFLimits) -> None:
        self.cur, self.left = cur, limits.max_array_elements

    def take(self, n: int, key: str) -> None:
        if n > self.left:
            raise self.cur.fail(f"array {key!r} declares {n} elements; avec reads at most "
                                f"{self.left} more array elements from this file")
        self.left -= n


def _value(cur: _Cursor, vtype: int, key: str, limits: GGUFLimits, budget: _Budget,
           depth: int = 0) -> int | None:
    """Skip one value of type ``vtype``; return it when it is a u32 (for general.alignment)."""
    if vtype in _SCALAR_SIZES:
        size = _SCALAR_SIZES[vtype]
        if vtype == _UINT32:
            return cur.u32(f"value of {key!r}")
        cur.skip(size, f"value of {key!r}")
        return None
    if vtype == _STRING:
        cur.string(f"string value of {key!r}", limits)
        return None
    if vtype != _ARRAY:
        raise cur.fail(f"key {key!r} has unknown value type {vtype}")
    if depth >= limits.max_array_depth:
        raise cur.fail(f"key {key!r} nests arrays deeper than {limits.max_array_depth} levels")
    etype = cur.u32(f"element type of array {key!r}")
    count = cur.u64(f"length of array {key!r}")
    budget.take(count, key)
    if etype in _SCALAR_SIZES:
        cur.skip(count * _SCALAR_SIZES[etype], f"{count} elements of array {key!r}")
        return None
    if etype not in (_STRING, _ARRAY):
        raise cur.fail(f"array {key!r} has unknown element type {etype}")
    cur.need(count * (8 if etype == _STRING else 12), f"{count} elements of array {key!r}")
    for _ in range(count):
        _value(cur, etype, key, limits, budget, depth + 1)
    return None


def check_gguf_bytes(buf: memoryview | bytes, path: Path,
                     limits: GGUFLimits = GGUFLimits()) -> None:
    """Walk a whole GGUF file held in ``buf``; raise :class:`VectorFileError` on the first
    count, length, type or offset that the file cannot hold or that exceeds ``limits``."""
    if len(buf) < 24:
        raise VectorFileError(f"{path}: not a readable GGUF file ({len(buf)} bytes; the "
                              f"header alone takes 24)")
    if bytes(buf[:4]) != MAGIC:
        raise VectorFileError(f"{path}: not a readable GGUF file (it does not start with "
                              f"'GGUF')")
    (raw_version,) = struct.unpack_from("<I", buf, 4)
    order = ">" if raw_version & 0xFFFF == 0 else "<"
    cur = _Cursor(buf, path, order)
    cur.pos = 4
    version = cur.u32("version")
    if version not in VERSIONS:
        raise cur.fail(f"version {version} is not supported (only {list(VERSIONS)})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key-value count")
    if n_tensors > limits.max_tensors:
        raise cur.fail(f"it declares {n_tensors} tensors (at most {limits.max_tensors})")
    if n_kv > limits.max_kv:
        raise cur.fail(f"it declares {n_kv} key-value entries (at most {limits.max_kv})")
    budget = _Budget(cur, limits)
    keys: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = cur.string(f"key {i}", limits, decode=True)
        assert key is not None
        if key in keys:
            raise cur.fail(f"key {key!r} appears twice")
        keys.add(key)
        vtype = cur.u32(f"value type of {key!r}")
        value = _value(cur, vtype, key, limits, budget)
        if key == "general.alignment":
            if vtype != _UINT32 or value is None or value == 0 or value & (value - 1):
                raise cur.fail("general.alignment must be a uint32 power of two")
            alignment = value
    sizes = _tensor_sizes()
    names: set[str] = set()
    spans: list[tuple[str, int, int]] = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", limits, decode=True)
        assert name is not None
        if name in names:
            raise cur.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        n_elements = 1
        for _ in range(n_dims):
            n_elements *= cur.u64(f"a dimension of tensor {name!r}")
        ggml_type = cur.u32(f"type of tensor {name!r}")
        if ggml_type not in sizes:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        block, block_bytes = sizes[ggml_type]
        if n_elements % block:
            raise cur.fail(f"tensor {name!r} has {n_elements} elements, not a multiple of its "
                           f"type's block of {block}")
        offset = cur.u64(f"offset of tensor {name!r}")
        spans.append((name, offset, n_elements // block * block_bytes))
    data_start = -(-cur.pos // alignment) * alignment
    data_size = max(0, cur.size - data_start)
    for name, offset, n_bytes in spans:
        if offset + n_bytes > data_size:
            raise VectorFileError(
                f"{path}: not a readable GGUF file: tensor {name!r} declares {n_bytes} bytes at "
                f"offset {offset} of the data region, but the region holds {data_size} bytes "
                f"(the file is truncated or its header lies)")


def check_gguf(path: str | Path, limits: GGUFLimits = GGUFLimits()) -> None:
    """Check the GGUF file at ``path`` (see :func:`check_gguf_bytes`) through a read-only
    memory map, so even a multi-GB file costs no memory."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            if size < 24:
                fh.seek(0)
                check_gguf_bytes(fh.read(), path, limits)
                return
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    check_gguf_bytes(view, path, limits)
                finally:
                    view.release()
    except OSError as exc:
        raise VectorFileError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
