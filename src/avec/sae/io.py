"""Save and load SAEs as SAELens directories: ``cfg.json`` + ``sae_weights.safetensors``.

The weights file holds ``W_enc``, ``W_dec``, ``b_enc``, ``b_dec`` (and ``threshold`` for
JumpReLU). ``cfg.json`` is written with both the SAELens v5 keys (``activation_fn_str``,
``activation_fn_kwargs``, top-level ``hook_name``/``hook_layer``/``model_name``) and the v6
keys (``architecture``, ``k``, ``meta``), so either SAELens version can read it; avec's own
facts go under ``"avec"``. Loading reads either layout. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from avec._version import __version__
from avec.sae.model import SAEConfig, SAEError, SparseAutoencoder, layer_from_hook_name

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
FORMAT_VERSION = 1
_ARCHITECTURE = {"topk": "topk", "relu": "standard", "jumprelu": "jumprelu"}
_SUPPORTED_NORMALIZATION = (None, "none", "expected_average_only_in")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sae_cfg_dict(sae: SparseAutoencoder) -> dict[str, Any]:
    """The ``cfg.json`` document for ``sae`` (SAELens v5 and v6 keys plus ``"avec"``)."""
    cfg = sae.cfg
    hook_name = cfg.hook_name
    out: dict[str, Any] = {
        "architecture": _ARCHITECTURE[cfg.activation],
        "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "activation_fn_str": "topk" if cfg.activation == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.activation == "topk" else {},
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none", "finetuning_scaling_factor": False,
        "model_name": cfg.model_name, "hook_name": hook_name, "hook_layer": cfg.hook_layer,
        "hook_head_index": None,
        "dtype": _dtype_name(sae.W_enc.dtype), "device": "cpu",
        "meta": {"model_name": cfg.model_name, "hook_name": hook_name,
                 "hook_layer": cfg.hook_layer},
        "avec": {"format_version": FORMAT_VERSION, "avec_version": __version__,
                 "metadata": cfg.metadata},
    }
    if cfg.activation == "topk":
        out["k"] = cfg.k
    return out


def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``sae`` to ``directory`` (created if needed) in the SAELens layout; returns it."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise SAEError(f"{directory}: exists and is not a directory; an SAE is saved as a "
                       f"directory holding {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps(sae_cfg_dict(sae), indent=2)
    except TypeError as err:
        raise SAEError(f"SAE metadata must be JSON-serialisable: {err}") from err
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in sae.named_parameters()}
    save_file(tensors, str(directory / WEIGHTS_FILENAME))
    (directory / CFG_FILENAME).write_text(text + "\n", encoding="utf-8")
    return directory


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SAEError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise SAEError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _activation(cfg: dict[str, Any], where: Path) -> tuple[str, int | None]:
    """``(activation, k)`` from SAELens v5 (``activation_fn_str``) or v6 (``architecture``)."""
    arch = cfg.get("architecture")
    fn = cfg.get("activation_fn_str")
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if arch == "jumprelu":
        return "jumprelu", None
    if arch == "topk" or (arch in (None, "standard") and fn == "topk"):
        if k is None:
            raise SAEError(f"{where}: a TopK SAE needs 'k' (or activation_fn_kwargs.k)")
        if float(k) != int(k):
            raise SAEError(f"{where}: k={k} is not a whole number")
        return "topk", int(k)
    if arch in (None, "standard") and fn in (None, "relu"):
        return "relu", None
    raise SAEError(f"{where}: unsupported SAE (architecture={arch!r}, activation_fn_str="
                   f"{fn!r}); avec reads 'standard'/relu, 'topk' and 'jumprelu' SAEs")


def load_sae(directory: str | Path, *, dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Read an SAE directory written by :func:`save_sae` or by SAELens (v5 or v6 layout).

    Tensors keep their stored dtype unless ``dtype`` is given. The site is taken from
    ``hook_layer``, or parsed from ``hook_name`` (``"blocks.8.hook_resid_post"`` -> 8).
    """
    from safetensors import SafetensorError, safe_open

    from avec.errors import VectorFileError
    from avec.formats.safetensors_check import check_safetensors

    directory = Path(directory)
    if not directory.is_dir():
        raise SAEError(f"{directory}: SAE directory not found (it should hold {CFG_FILENAME} "
                       f"and {WEIGHTS_FILENAME})")
    cfg_path, weights_path = directory / CFG_FILENAME, directory / WEIGHTS_FILENAME
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise SAEError(f"{path}: missing; an SAE directory holds {CFG_FILENAME} and "
                           f"{WEIGHTS_FILENAME}")
    raw = _read_cfg(cfg_path)
    meta = raw.get("meta") or raw.get("metadata") or {}
    meta = meta if isinstance(meta, dict) else {}

    def get(key: str) -> Any:
        return raw[key] if raw.get(key) is not None else meta.get(key)

    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int) or isinstance(raw.get(key), bool):
            raise SAEError(f"{cfg_path}: needs an integer {key!r}, got {raw.get(key)!r}")
    norm = raw.get("normalize_activations")
    if norm not in _SUPPORTED_NORMALIZATION:
        raise SAEError(f"{cfg_path}: normalize_activations={norm!r} is not supported; avec "
                       f"reads SAEs with 'none' (fold the normalisation into the weights first)")
    if raw.get("finetuning_scaling_factor"):
        raise SAEError(f"{cfg_path}: finetuning_scaling_factor is not supported; fold the "
                       f"scaling factor into W_dec first")
    activation, k = _activation(raw, cfg_path)
    hook_name = str(get("hook_name") or "")
    hook_layer = get("hook_layer")
    if hook_layer is None:
        hook_layer = layer_from_hook_name(hook_name)
    avec_part = raw.get("avec") if isinstance(raw.get("avec"), dict) else {}
    config = SAEConfig(d_in=raw["d_in"], d_sae=raw["d_sae"], k=k, activation=activation,  # type: ignore[arg-type]
                       apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
                       hook_layer=None if hook_layer is None else int(hook_layer),
                       hook_name=hook_name, model_name=str(get("model_name") or ""),
                       metadata=dict(avec_part.get("metadata") or {}))
    try:
        check_safetensors(weights_path)
    except VectorFileError as err:
        raise SAEError(str(err)) from None
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as err:
        raise SAEError(f"{weights_path}: not a readable safetensors file ({err})") from err
    try:
        sae = SparseAutoencoder.from_weights(config, weights)
    except SAEError as err:
        raise SAEError(f"{directory}: {err}") from err
    if dtype is not None:
        sae = sae.to(dtype)
    return sae.to(device)
