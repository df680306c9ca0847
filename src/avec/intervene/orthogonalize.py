"""Weight orthogonalization (Arditi et al. 2024): fold directional ablation into the weights.

Every matrix that writes into the residual stream is replaced by ``W <- W - u u^T W`` on its
output side (``u`` the unit direction), and its bias by ``b <- b - (b . u) u``: the token (and
learned position) embeddings, every attention output projection and every MLP output
projection. The edited model computes exactly what the original computes under
:func:`avec.intervene.ablation.ablate_direction` with ``coef=1``, with no hooks, so it can be saved and
served by any tool that loads Hugging Face checkpoints.

Blocks that normalise a writer's output before adding it (Gemma 2/3 sandwich norms, OLMo 2)
cannot be folded: the norm rescales each token differently. Use run-time ablation there.
"""

from __future__ import annotations

import copy as copy_module
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from avec._version import __version__
from avec.report import write_json
from avec.intervene.ablation import (
    POST_NORM_NAMES,
    block_writers,
    probe_tolerance,
    relative_error,
    residual_writers,
    run_probe,
    unit_direction,
)
from avec.errors import SteeringError, UnsupportedArchitectureError
from avec.models.adapters import get_submodule
from avec.models.model import Model

#: names of the last linear map of an attention or MLP module (output side = residual stream)
OUTPUT_PROJECTION_NAMES = ("o_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "out_proj",
                           "fc2", "wo", "w2")
#: learned absolute position embeddings added to the token embeddings (GPT-2's ``wpe``)
POSITION_EMBEDDING_NAMES = ("wpe", "embed_positions", "position_embeddings")
METADATA_FILE = "avec-orthogonalized.json"


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear map with weight ``[in, out]`` (``y = x W + b``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _out_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if _is_conv1d(module):
        return int(module.weight.shape[1])
    return None


def output_projection(writer: nn.Module, d_model: int, name: str) -> nn.Module:
    """The linear layer (``nn.Linear`` or GPT-2 ``Conv1D``) that produces ``writer``'s output."""
    found = [getattr(writer, n) for n in OUTPUT_PROJECTION_NAMES
             if isinstance(getattr(writer, n, None), nn.Module)
             and _out_features(getattr(writer, n)) == d_model]
    if len(found) != 1:
        children = ", ".join(n for n, _ in writer.named_children()) or "none"
        what = "no" if not found else "several"
        raise UnsupportedArchitectureError(
            f"{name} ({type(writer).__name__}; children: {children}) has {what} output "
            f"projection among {', '.join(OUTPUT_PROJECTION_NAMES)} mapping to width {d_model}, "
            f"so its weights cannot be orthogonalized (mixture-of-experts MLPs are not "
            f"supported). Use run-time ablation instead: avec.intervene.ablation.ablate_direction.")
    return found[0]


def _position_embeddings(model: Model, token_embedding: nn.Module) -> list[nn.Embedding]:
    out = []
    for name, module in model.hf.named_modules():
        if (module is not token_embedding and isinstance(module, nn.Embedding)
                and name.rsplit(".", 1)[-1] in POSITION_EMBEDDING_NAMES
                and module.embedding_dim == model.d_model):
            out.append(module)
    return out


def _check_foldable(model: Model) -> None:
    for i, block in enumerate(model.blocks):
        attrs = [attr for attr, _ in block_writers(block, i)]
        if any(attr in POST_NORM_NAMES for attr in attrs):
            raise SteeringError(
                f"cannot orthogonalize the weights of {model.name}: its blocks "
                f"({type(block).__name__}) normalise the attention and MLP outputs "
                f"({', '.join(POST_NORM_NAMES)}) before adding them to the residual stream, and "
                f"a per-token norm cannot be folded into a weight matrix. Use run-time ablation "
                f"instead: `with avec.intervene.ablation.ablate_direction(model, direction): ...`.")


def _plan(model: Model) -> tuple[nn.Embedding, list[nn.Embedding], list[nn.Module]]:
    """Find the embeddings and output projections to edit, and check with a probe forward pass
    that they are what writes into the residual stream."""
    _check_foldable(model)
    writers = residual_writers(model)
    embedding = model.hf.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise UnsupportedArchitectureError(
            f"the input embedding of {model.name} is a {type(embedding).__name__}, not an "
            f"nn.Embedding; use run-time ablation (avec.intervene.ablation.ablate_direction)")
    positions = _position_embeddings(model, embedding)
    projections = [output_projection(w, model.d_model, name) for name, w in writers]

    taps: list[tuple[str, nn.Module, str]] = [("block0", model.blocks[0], "in"),
                                              ("tok", embedding, "raw_out")]
    taps += [(f"pos{i}", m, "raw_out") for i, m in enumerate(positions)]
    for i, ((name, writer), proj) in enumerate(zip(writers, projections)):
        taps += [(f"w{i}", writer, "raw_out"), (f"p{i}", proj, "raw_out")]
    seen = run_probe(model, taps)
    tol = probe_tolerance(model)
    for i, (name, _) in enumerate(writers):
        err = relative_error(seen[f"p{i}"], seen[f"w{i}"])
        if err > tol:
            raise UnsupportedArchitectureError(
                f"the output of {name} is not the output of its projection "
                f"{type(projections[i]).__name__} (relative error {err:.2g}): something runs "
                f"after it, so its weights cannot be orthogonalized. Use run-time ablation "
                f"(avec.intervene.ablation.ablate_direction).")
    # block 0's input must be (a scalar times) the sum of the embeddings: Gemma scales by sqrt(d)
    total = seen["tok"] + sum((seen[f"pos{i}"] for i in range(len(positions))),
                              torch.zeros_like(seen["tok"]))
    entry = seen["block0"]
    scale = (entry * total).sum() / (total * total).sum().clamp_min(1e-12)
    err = relative_error(scale * total, entry)
    if err > tol:
        raise UnsupportedArchitectureError(
            f"the residual stream entering block 0 of {model.name} is not a multiple of the "
            f"token{' + position' if positions else ''} embeddings (relative error {err:.2g}); "
            f"its embeddings cannot be orthogonalized. Use run-time ablation "
            f"(avec.intervene.ablation.ablate_direction).")
    return embedding, positions, projections


def _check_float(param: torch.Tensor, what: str) -> None:
    if not param.is_floating_point():
        raise SteeringError(f"{what} has dtype {param.dtype}; orthogonalize a model loaded in "
                            f"float32/bfloat16/float16, not a quantized one")


def _project_out_rows(weight: torch.Tensor, unit: torch.Tensor) -> None:
    """``W <- W - (W u) u^T`` for a weight whose *last* dimension is the residual stream."""
    _check_float(weight, "a weight")
    w = weight.float()
    u = unit.to(w.device)
    weight.copy_((w - torch.outer(w @ u, u)).to(weight.dtype))


def _project_out_columns(weight: torch.Tensor, unit: torch.Tensor) -> None:
    """``W <- W - u (u^T W)`` for a weight whose *first* dimension is the residual stream."""
    _check_float(weight, "a weight")
    w = weight.float()
    u = unit.to(w.device)
    weight.copy_((w - torch.outer(u, u @ w)).to(weight.dtype))


def untie_embeddings(model: Model) -> bool:
    """Give the output embedding (``lm_head``) its own copy of the input embedding's weights if
    they are shared, and record ``tie_word_embeddings=False`` in every config so a saved copy
    reloads untied. Returns whether the weights were shared."""
    hf = model.hf
    embedding, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    shared = (head is not None and embedding is not None
              and head.weight.data_ptr() == embedding.weight.data_ptr())
    if shared:
        head.weight = nn.Parameter(embedding.weight.detach().clone(),
                                   requires_grad=embedding.weight.requires_grad)
    configs = {id(hf.config): hf.config}
    text = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else None
    if text is not None:
        configs[id(text)] = text
    for module in hf.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            configs[id(cfg)] = cfg
    for cfg in configs.values():
        if getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    # transformers 5 keeps the {target: source} tying map it saves and reloads by on each
    # PreTrainedModel; recompute it now that the configs say "untied"
    for module in hf.modules():
        if hasattr(module, "all_tied_weights_keys") and hasattr(
                module, "get_expanded_tied_weights_keys"):
            module.all_tied_weights_keys = module.get_expanded_tied_weights_keys(
                all_submodels=True)
    return shared


@torch.no_grad()
def orthogonalize_weights(model: Model, direction: torch.Tensor) -> None:
    """Fold the ablation of ``direction`` into ``model``'s weights, **in place**.

    Edits the token embedding rows, learned position embeddings (GPT-2 ``wpe``), and every
    attention and MLP output projection with its bias (``o_proj``/``down_proj``, GPT-2
    ``c_proj``, GPT-NeoX ``dense``/``dense_4h_to_h``, ...), so that nothing written into the
    residual stream has a component along ``u = direction / |direction|``. Tied input/output
    embeddings are untied first (``lm_head`` keeps the original weights, and the config records
    ``tie_word_embeddings=False``), so the unembedding is unchanged. Afterwards the model
    matches the original under ``ablate_direction(model, direction)`` with ``coef=1``.

    Raises:
        SteeringError: zero/wrong-width direction, quantized weights, or blocks with norms
            after the attention/MLP (Gemma 2/3): use :func:`avec.intervene.ablation.ablate_direction`.
        UnsupportedArchitectureError: the writers' projections or embeddings cannot be found.
    """
    unit = unit_direction(direction, model.d_model)
    embedding, positions, projections = _plan(model)
    for param in [embedding.weight, *(p.weight for p in positions),
                  *(p.weight for p in projections)]:
        _check_float(param, "a weight")
    untie_embeddings(model)
    for emb in [embedding, *positions]:
        _project_out_rows(emb.weight, unit)
    for proj in projections:
        if _is_conv1d(proj):
            _project_out_rows(proj.weight, unit)
        else:
            _project_out_columns(proj.weight, unit)
        if getattr(proj, "bias", None) is not None:
            _project_out_rows(proj.bias.view(1, -1), unit)


def save_orthogonalized(model: Model, direction: torch.Tensor, output_dir: str | Path, *,
                        metadata: dict[str, Any] | None = None, copy: bool = True) -> Path:
    """Orthogonalize the weights against ``direction`` and save a plain Hugging Face checkpoint.

    The directory holds safetensors weights, config, generation config, the tokenizer and
    ``avec-orthogonalized.json`` (direction norm and hash, source model, avec version, plus
    ``metadata``). It loads with ``transformers.AutoModelForCausalLM.from_pretrained`` alone.

    Args:
        copy: orthogonalize a deep copy of ``model.hf`` (default) so ``model`` is unchanged;
            ``copy=False`` edits ``model`` in place and saves it (half the memory).

    Returns the output directory.
    """
    unit = unit_direction(direction, model.d_model)
    try:
        extra = json.loads(json.dumps(metadata or {}))
    except (TypeError, ValueError) as exc:
        raise SteeringError(f"metadata must be JSON-serialisable: {exc}") from exc
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise SteeringError(f"{out} exists and is not a directory; choose another output_dir")
    target = model
    if copy:
        hf = copy_module.deepcopy(model.hf)
        blocks = get_submodule(hf, model.block_path)
        target = dataclasses.replace(model, hf=hf, blocks=blocks, extra=dict(model.extra))
    orthogonalize_weights(target, direction)
    out.mkdir(parents=True, exist_ok=True)
    target.hf.save_pretrained(out, safe_serialization=True)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    raw = direction.detach().float().cpu()
    info = {
        "method": "weight orthogonalization (directional ablation, Arditi et al. 2024)",
        "avec_version": __version__,
        "source": {"source": model.source, **model.identity()},
        "direction_norm": float(raw.norm()),
        "direction_sha256": hashlib.sha256(unit.cpu().numpy().tobytes()).hexdigest(),
        "d_model": model.d_model,
        "metadata": extra,
    }
    write_json(out / METADATA_FILE, info)
    return out
