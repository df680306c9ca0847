"""Hostile vector files: memory bombs, lies in headers, bad dtypes, shapes, values and metadata.

Every malformed safetensors or GGUF file must raise VectorFileError (naming the file and what is
wrong) before anything large is allocated; a file that loads is a valid vector. The property
tests build arbitrary headers, dtypes and shapes with hypothesis.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from avec.errors import VectorFileError
from avec.formats.gguf_check import GGUFLimits, check_gguf
from avec.formats.gguf_control import write_gguf_control_vector
from avec.vector import read_gguf_control_vector
from avec.formats.safetensors_check import DTYPE_BITS, check_safetensors
from avec.vector import SteeringVector, load_vector

# ---- builders -------------------------------------------------------------------------------

STRING, ARRAY, UINT32, F32 = 8, 9, 4, 0


def gstr(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


def kv_string(key: str, value: str) -> bytes:
    return gstr(key.encode()) + struct.pack("<I", STRING) + gstr(value.encode())


def gguf(kvs: list[bytes], tensors: list[bytes] = (), data: bytes = b"", *, version: int = 3,
         n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    """A GGUF file from raw key-value and tensor-info records (counts may lie)."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    pad = (-len(body)) % 32
    return body + b"\0" * pad + data


def tensor_info(name: str, dims: list[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    return (gstr(name.encode()) + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", ggml_type, offset))


def control_vector(values: np.ndarray, layer: int = 1) -> bytes:
    return gguf([kv_string("general.architecture", "controlvector")],
                [tensor_info(f"direction.{layer}", [values.size])],
                values.astype("<f4").tobytes())


def array_bomb(count: int) -> bytes:
    """Version 3, no tensors, one key whose array declares ``count`` uint8s with no data."""
    key = b"tokenizer.ggml.tokens".ljust(54, b"_")
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gstr(key)
            + struct.pack("<IIQ", ARRAY, 0, count))


def raw_safetensors(header: object, data: bytes = b"", *, declared: int | None = None) -> bytes:
    text = header if isinstance(header, (str, bytes)) else json.dumps(header)
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def meta(**fields: object) -> dict[str, str]:
    return {"avec": json.dumps({"method": "test", **fields})}


def write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def assert_valid(vec: SteeringVector) -> None:
    for t in vec.directions.values():
        assert t.dtype == torch.float32 and 1 <= t.dim() <= 2 and t.numel() > 0
        assert bool(torch.isfinite(t).all()) and np.isfinite(float(t.norm()))


# ---- GGUF -----------------------------------------------------------------------------------

@pytest.mark.parametrize("count", [2**40, 2**20, 2**64 - 1])
def test_gguf_array_bomb_refused_without_allocating(tmp_path, count):
    path = write(tmp_path, "bomb.gguf", array_bomb(count))
    assert path.stat().st_size == 102
    tracemalloc.start()
    try:
        with pytest.raises(VectorFileError, match=r"bomb\.gguf.*declares .* elements"):
            load_vector(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


def test_gguf_builder_makes_readable_control_vectors(tmp_path):
    path = write(tmp_path, "ok.gguf", control_vector(np.arange(4, dtype=np.float32)))
    vec = load_vector(path)
    assert vec.layers == [1] and vec[1].tolist() == [0.0, 1.0, 2.0, 3.0]
    written = write_gguf_control_vector(vec * 2, tmp_path / "w.gguf")
    check_gguf(written)  # what avec (and gguf's writer) writes passes the bounded check


def test_gguf_truncated_anywhere_is_refused(tmp_path):
    full = control_vector(np.ones(8, dtype=np.float32))
    for cut in range(len(full)):
        path = write(tmp_path, f"cut{cut}.gguf", full[:cut])
        with pytest.raises(VectorFileError, match=f"cut{cut}.gguf"):
            load_vector(path)


ARCH = kv_string("general.architecture", "controlvector")
ONE = np.ones(4, dtype="<f4").tobytes()


@pytest.mark.parametrize("content, message", [
    (gguf([ARCH], version=1), "version 1"),
    (gguf([ARCH], version=4), "version 4"),
    (gguf([ARCH], n_kv=2**62), "key-value entries"),
    (gguf([ARCH], n_tensors=2**62), "declares .* tensors"),
    (gguf([ARCH, gstr(b"k") + struct.pack("<I", 42)]), "unknown value type 42"),
    (gguf([gstr(b"k") + struct.pack("<I", STRING) + struct.pack("<Q", 2**50)]),
     "declares 1125899906842624 bytes"),
    (gguf([gstr(b"k") + struct.pack("<I", STRING) + struct.pack("<Q", 1000)]), "only"),
    (gguf([gstr(b"\xff\xfe") + struct.pack("<IB", 0, 1)]), "not valid UTF-8"),
    (gguf([ARCH, ARCH]), "appears twice"),
    (gguf([gstr(b"general.alignment") + struct.pack("<II", UINT32, 0)]), "power of two"),
    (gguf([gstr(b"general.alignment") + struct.pack("<II", UINT32, 3)]), "power of two"),
    (gguf([gstr(b"general.alignment") + struct.pack("<IQ", 10, 32)]), "power of two"),
    (gguf([gstr(b"a") + struct.pack("<IIQ", ARRAY, ARRAY, 3)
           + struct.pack("<IQ", ARRAY, 1) * 3]), "deeper"),
    (gguf([gstr(b"a") + struct.pack("<IIQ", ARRAY, 77, 1)]), "unknown element type"),
    (gguf([gstr(b"a") + struct.pack("<IIQ", ARRAY, STRING, 1000)]), "only"),
    (gguf([ARCH], [tensor_info("direction.1", [4] * 9)], ONE), "9 dimensions"),
    (gguf([ARCH], [tensor_info("direction.1", [])], ONE), "0 dimensions"),
    (gguf([ARCH], [tensor_info("direction.1", [4], ggml_type=999)], ONE), "ggml type 999"),
    (gguf([ARCH], [tensor_info("direction.1", [2**62, 4])], ONE), "data region"),
    (gguf([ARCH], [tensor_info("direction.1", [4], offset=2**63)], ONE), "data region"),
    (gguf([ARCH], [tensor_info("direction.1", [4]), tensor_info("direction.1", [4], offset=0)],
          ONE), "appears twice"),
    (gguf([ARCH], [tensor_info("direction.1", [4], ggml_type=26)], ONE), "I32"),
    (gguf([ARCH], [tensor_info("direction.01", [4]), tensor_info("direction.1", [4], offset=0)],
          ONE), "both layer 1"),
    (gguf([ARCH], [tensor_info("direction.x", [4])], ONE), "unexpected tensor"),
    (gguf([ARCH], [tensor_info("direction.1", [0])]), "empty"),
    (gguf([ARCH], [tensor_info("direction.1", [4])], np.full(4, 1e38, "<f4").tobytes()),
     "infinite norm"),
    (gguf([kv_string("general.architecture", "llama")], [tensor_info("direction.1", [4])], ONE),
     "not a control vector"),
    (gguf([gstr(b"general.architecture") + struct.pack("<IIQ", ARRAY, STRING, 0)]),
     "architecture is None"),
    (b"GGUF" + b"\0" * 10, "24"),
    (b"", "0 bytes"),
])
def test_gguf_malformed_files_refused(tmp_path, content, message):
    path = write(tmp_path, "bad.gguf", content)
    with pytest.raises(VectorFileError, match=message):
        read_gguf_control_vector(path)


def test_gguf_limits_are_parameters(tmp_path):
    path = write(tmp_path, "ok.gguf", control_vector(np.ones(4, dtype=np.float32)))
    check_gguf(path)
    with pytest.raises(VectorFileError, match="tensors"):
        check_gguf(path, GGUFLimits(max_tensors=0))


# ---- safetensors ----------------------------------------------------------------------------

def st_file(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor], **fields: object) -> Path:
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta(**fields))
    return path


@pytest.mark.parametrize("tensor, message", [
    (torch.full((4,), 1e300, dtype=torch.float64), "NaN/inf values .*after conversion"),
    (torch.full((576,), 3e38), "infinite norm"),
    (torch.zeros(0, 576), r"empty \(shape \[0, 576\]\)"),
    (torch.ones(1, 1, 576), r"shape \[1, 1, 576\]"),
    (torch.tensor(1.0), r"shape \[\]"),
    (torch.ones(4, dtype=torch.int32), "dtype I32"),
    (torch.ones(4, dtype=torch.bool), "dtype BOOL"),
    (torch.ones(4).to(torch.float8_e4m3fn), "dtype F8_E4M3"),
    (torch.ones(4).to(torch.float8_e5m2), "dtype F8_E5M2"),
])
def test_bad_tensors_refused(tmp_path, tensor, message):
    with pytest.raises(VectorFileError, match=message):
        load_vector(st_file(tmp_path, "v.safetensors", {"layer.3": tensor}))


def test_float16_and_float64_are_converted_to_float32(tmp_path):
    path = st_file(tmp_path, "v.safetensors", {"layer.1": torch.ones(4, dtype=torch.float64),
                                               "layer.2": torch.ones(4, dtype=torch.float16)})
    vec = load_vector(path)
    assert {t.dtype for t in vec.directions.values()} == {torch.float32}


def test_duplicate_layer_keys_name_both(tmp_path):
    path = st_file(tmp_path, "v.safetensors", {"layer.014": torch.ones(4),
                                               "layer.14": torch.ones(4)})
    with pytest.raises(VectorFileError, match="'layer.014' and 'layer.14' are both layer 14"):
        load_vector(path)
    for name in ("layer.-1", "layer.1e3", "layer.", "layer.١", "layer.9999999"):
        with pytest.raises(VectorFileError, match="unexpected tensor"):
            load_vector(st_file(tmp_path, "n.safetensors", {name: torch.ones(4)}))


@pytest.mark.parametrize("fields, message", [
    ({"layers": 14}, "'layers' must be a list"),
    ({"layers": [1, 2]}, "metadata lists layers"),
    ({"clamp_value": [1]}, "'clamp_value' must be a finite number"),
    ({"clamp_value": "1"}, "'clamp_value'"),
    ({"clamp_value": 1e300}, "'clamp_value'"),
    ({"clamp_value": True}, "'clamp_value'"),
    ({"model": "m"}, "'model' must be an object"),
    ({"model": {"d_model": "32"}}, "'model.d_model'"),
    ({"model": {"name": 3}}, "'model.name'"),
    ({"n_pairs": -1}, "'n_pairs'"),
    ({"chat_template": "yes"}, "'chat_template'"),
    ({"positions": True}, "'positions'"),
    ({"positions": [1]}, "'positions'"),
    ({"format_version": "1"}, "'format_version'"),
    ({"format_version": 99}, "newer than this avec reads"),
    ({"shape": [5]}, "metadata says shape"),
    ({"method": ["x"]}, "'method'"),
    ({"refusal": {"layer": [1]}}, "'refusal.layer'"),
    ({"refusal": {"harmful_mean_projection": "x"}}, "'refusal.harmful_mean_projection'"),
    ({"sites": ["a"]}, "'sites'"),
])
def test_bad_metadata_refused(tmp_path, fields, message):
    path = st_file(tmp_path, "v.safetensors", {"layer.1": torch.ones(4)}, **fields)
    with pytest.raises(VectorFileError, match=message):
        load_vector(path)


def test_hostile_metadata_json(tmp_path):
    one = {"layer.1": torch.ones(4)}
    for text, message in (("[" * 100_000 + "]" * 100_000, "nested 100000 levels"),
                          ('{"method": "\\ud800"}', "lone surrogate"),
                          ('{"method": "x"', "invalid JSON")):
        path = tmp_path / "v.safetensors"
        save_file(one, str(path), metadata={"avec": text})
        with pytest.raises(VectorFileError, match=message):
            load_vector(path)


def test_module_vectors_keep_their_shape_but_cannot_steer_a_language_model(tmp_path, tiny_llama):
    block = torch.ones(2, 3, tiny_llama.d_model)
    path = st_file(tmp_path, "m.safetensors", {"layer.0": block}, sites={"0": "conv"})
    assert load_vector(path).shape == (2, 3, tiny_llama.d_model)
    with pytest.raises(VectorFileError, match="cannot steer a language model"):
        load_vector(path, tiny_llama)


def valid_header(n: int = 4) -> dict:
    return {"__metadata__": meta(), "layer.1": {"dtype": "F32", "shape": [n],
                                                "data_offsets": [0, 4 * n]}}


@pytest.mark.parametrize("content, message", [
    (raw_safetensors(valid_header(), ONE, declared=2**63), "declares .* bytes but the file has"),
    (raw_safetensors(valid_header(), b""), "run past the data region"),
    (raw_safetensors(valid_header(), ONE + b"xx"), "data region holds 18"),
    (raw_safetensors({**valid_header(), "layer.2": {"dtype": "F32", "shape": [4],
                                                    "data_offsets": [8, 24]}}, ONE + ONE),
     "overlap or leave a gap"),
    (raw_safetensors({"layer.1": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}}, ONE),
     "takes 20 bytes"),
    (raw_safetensors({"layer.1": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, ONE),
     "unknown dtype"),
    (raw_safetensors({"layer.1": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}},
                     ONE), "shape must be"),
    (raw_safetensors({"layer.1": {"dtype": "F32", "shape": [True] * 4,
                                  "data_offsets": [0, 16]}}, ONE), "shape must be"),
    (raw_safetensors({"layer.1": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
                     ONE), "data_offsets must be"),
    (raw_safetensors({"layer.1": {"dtype": "F32", "shape": [4]}}, ONE), "exactly"),
    (raw_safetensors({"layer.1": [[[[[1]]]]]}, ONE), "nested 6 levels"),
    (raw_safetensors('{"layer.1": {}, "layer.1": {}}', ONE), "appears twice"),
    (raw_safetensors({"__metadata__": {"avec": 1}}), "string values"),
    (raw_safetensors([1, 2]), "must be a JSON object"),
    (raw_safetensors(b"\xff\xfe{}"), "not UTF-8"),
    (raw_safetensors("{not json"), "invalid JSON"),
    (b"\x01\x00", "2 bytes"),
])
def test_malformed_safetensors_headers_refused(tmp_path, content, message):
    path = write(tmp_path, "bad.safetensors", content)
    with pytest.raises(VectorFileError, match=message):
        load_vector(path)


def test_header_cap_and_truncation(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"layer.1": torch.ones(8)}, str(good), metadata=meta())
    with pytest.raises(VectorFileError, match="at most 16"):
        check_safetensors(good, max_header_bytes=16)
    full = good.read_bytes()
    for cut in range(0, len(full), 3):
        path = write(tmp_path, f"cut{cut}.safetensors", full[:cut])
        with pytest.raises(VectorFileError, match=f"cut{cut}.safetensors"):
            load_vector(path)


def test_directory_and_missing_paths(tmp_path):
    for suffix in (".safetensors", ".gguf"):
        (tmp_path / f"d{suffix}").mkdir()
        with pytest.raises(VectorFileError, match="not a regular file"):
            load_vector(tmp_path / f"d{suffix}")
        with pytest.raises(VectorFileError, match="not found"):
            load_vector(tmp_path / f"missing{suffix}")


# ---- property tests -------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=timedelta(seconds=5), derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
HUGE = st.sampled_from([0, 1, 3, 4, 16, 255, 2**31, 2**32 + 4, 2**40, 2**63, 2**64 - 1])
SMALL_OR_HUGE = st.one_of(st.integers(0, 64), HUGE)


def _try_load(path: Path) -> None:
    try:
        vec = load_vector(path)
    except VectorFileError:
        return
    assert_valid(vec)


MOSTLY = st.integers(0, 19).map(bool)  # True 19 times in 20


def _floats(draw, n: int, dtype: str) -> bytes:
    values = draw(st.lists(st.floats(-1e3, 1e3) if draw(MOSTLY) else st.floats(width=64),
                           min_size=n, max_size=n))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is wanted here
        return np.array(values, dtype=np.float64).astype(dtype).tobytes()


@st.composite
def gguf_files(draw) -> bytes:
    """Mostly well-formed control vectors with some part replaced by something arbitrary."""
    kvs = [kv_string("general.architecture", "controlvector")] if draw(MOSTLY) else []
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from([b"general.alignment", b"controlvector.model_hint",
                                    b"controlvector.layer_count", b"general.architecture"])
                   if draw(MOSTLY) else st.binary(max_size=12))
        vtype = draw(st.one_of(st.sampled_from([STRING, ARRAY, UINT32]), st.integers(0, 15)))
        if vtype == STRING and draw(st.booleans()):
            payload = gstr(draw(st.sampled_from([b"controlvector", b"llama", b"\xff"])))
        elif vtype == ARRAY:
            payload = struct.pack("<IQ", draw(st.integers(0, 13)), draw(SMALL_OR_HUGE))
            payload += draw(st.binary(max_size=64))
        else:
            payload = draw(st.binary(max_size=24))
        kvs.append(gstr(key) + struct.pack("<I", vtype) + payload)
    width = draw(st.integers(1, 6) if draw(MOSTLY) else st.integers(0, 6))
    tensors, data = [], b""
    for i in range(draw(st.integers(1, 3) if draw(MOSTLY) else st.integers(0, 3))):
        name = draw(st.sampled_from([f"direction.{i + 1}", "direction.1", "direction.01", "x"])
                    if not draw(MOSTLY) else st.just(f"direction.{i + 1}"))
        ggml = draw(st.sampled_from([0, 1]) if draw(MOSTLY) else st.integers(0, 60))
        dims = [width] if draw(MOSTLY) else draw(st.lists(SMALL_OR_HUGE, max_size=5))
        offset = len(data) if draw(MOSTLY) else draw(SMALL_OR_HUGE)
        tensors.append(tensor_info(name, dims, ggml, offset))
        if ggml in (0, 1) and dims == [width]:
            data += _floats(draw, width, "<f4" if ggml == 0 else "<f2")
            data += b"\0" * ((-len(data)) % 32)
    if not draw(MOSTLY):
        data = draw(st.binary(max_size=128))
    content = gguf(kvs, tensors, data,
                   version=3 if draw(MOSTLY) else draw(st.sampled_from([1, 2, 4, 3 << 24])),
                   n_kv=None if draw(MOSTLY) else draw(HUGE),
                   n_tensors=None if draw(MOSTLY) else draw(HUGE))
    if not draw(MOSTLY):
        content = content[:draw(st.integers(0, len(content)))]
    return content


@FUZZ
@given(content=gguf_files())
def test_fuzz_gguf_only_vector_file_errors(tmp_path, content):
    _try_load(write(tmp_path, "fuzz.gguf", content))


@FUZZ
@given(base=st.just(None), flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                          min_size=1, max_size=6))
def test_fuzz_gguf_byte_flips(tmp_path, base, flips):
    content = bytearray(control_vector(np.arange(8, dtype=np.float32), layer=3))
    for pos, value in flips:
        content[pos % len(content)] = value
    _try_load(write(tmp_path, "flip.gguf", bytes(content)))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                           | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                           max_leaves=12)


@st.composite
def safetensors_files(draw) -> bytes:
    """Mostly well-formed vector files with some part replaced by something arbitrary."""
    header: dict = {}
    chunks: list[bytes] = []
    pos = 0
    shape = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2) if draw(MOSTLY) else
                 st.lists(st.integers(0, 6), max_size=3))
    for i in range(draw(st.integers(1, 3) if draw(MOSTLY) else st.integers(0, 3))):
        name = f"layer.{i}" if draw(MOSTLY) else draw(st.one_of(
            st.sampled_from(["layer.1", "layer.01", "layer.x", "direction.1", "__metadata__"]),
            st.text(max_size=8)))
        dtype = draw(st.sampled_from(["F32", "F16", "F64", "BF16"]) if draw(MOSTLY) else
                     st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.just("Q4"),
                               st.integers(0, 3)))
        this = shape if draw(MOSTLY) else draw(st.one_of(st.lists(HUGE, max_size=2),
                                                          JSON_VALUES))
        sized = (isinstance(dtype, str) and dtype in DTYPE_BITS and isinstance(this, list)
                 and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in this))
        size = math.prod(this) * DTYPE_BITS[dtype] // 8 if sized else 4
        size = size if size < 2**12 else 4
        if dtype in ("F32", "F16", "F64") and sized and size == math.prod(this) * \
                DTYPE_BITS[dtype] // 8:
            chunk = _floats(draw, math.prod(this), {"F32": "<f4", "F16": "<f2",
                                                       "F64": "<f8"}[dtype])
        else:
            chunk = draw(st.binary(min_size=size, max_size=size))
        offsets = [pos, pos + size] if draw(MOSTLY) else draw(st.lists(SMALL_OR_HUGE,
                                                                        max_size=3))
        header[name] = {"dtype": dtype, "shape": this, "data_offsets": offsets} \
            if draw(MOSTLY) else draw(JSON_VALUES)
        chunks.append(chunk)
        pos += size
    header["__metadata__"] = meta() if draw(MOSTLY) else draw(st.one_of(
        st.builds(lambda v: {"avec": json.dumps(v)}, JSON_VALUES),
        st.builds(lambda f: meta(**f), st.dictionaries(
            st.sampled_from(["layers", "clamp_value", "model", "shape", "n_pairs", "positions",
                             "format_version", "sites", "refusal"]), JSON_VALUES, max_size=3)),
        JSON_VALUES))
    data = b"".join(chunks) if draw(MOSTLY) else draw(st.binary(max_size=96))
    return raw_safetensors(header, data, declared=None if draw(MOSTLY) else draw(HUGE))


@FUZZ
@given(content=safetensors_files())
def test_fuzz_safetensors_only_vector_file_errors(tmp_path, content):
    _try_load(write(tmp_path, "fuzz.safetensors", content))


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_fuzz_safetensors_byte_flips(tmp_path, flips):
    path = tmp_path / "base.safetensors"
    save_file({"layer.2": torch.arange(6.0), "layer.5": -torch.arange(6.0)}, str(path),
              metadata=meta(layers=[2, 5], shape=[6]))
    content = bytearray(path.read_bytes())
    for pos, value in flips:
        content[pos % len(content)] = value
    _try_load(write(tmp_path, "flip.safetensors", bytes(content)))


@pytest.mark.parametrize("content", [
    raw_safetensors({}, declared=2**40),  # a header longer than the file
    raw_safetensors({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 8]}},
                    b"\0" * 8),  # a shape far larger than its bytes
    b"\x01\x02",
])
def test_sae_and_maze_files_get_the_same_bounded_header_check(tmp_path, content):
    from avec.studies.maze.policy import MazePolicy, PolicyConfig, load_policy, save_policy
    from avec.sae.io import SAEError, load_sae, save_sae
    from avec.sae.model import SAEConfig, SparseAutoencoder

    sae_dir = save_sae(SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, k=2), seed=0), tmp_path / "sae")
    (sae_dir / "sae_weights.safetensors").write_bytes(content)
    with pytest.raises(SAEError, match="sae_weights.safetensors"):
        load_sae(sae_dir)
    policy = tmp_path / "policy.safetensors"
    save_policy(MazePolicy(PolicyConfig(world=7, channels=(4, 8, 8), hidden=16)), policy)
    policy.write_bytes(content)
    with pytest.raises(VectorFileError, match="policy.safetensors"):
        load_policy(policy)
