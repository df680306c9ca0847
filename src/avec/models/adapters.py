"""Where each architecture family keeps its decoder blocks.

avec's read and write site for "layer L" is the *output of decoder block L* (0-based): the
residual stream after block L has added its attention and MLP contributions. For every family
below that is ``blocks[L]``'s forward output (first element when a block returns a tuple),
which is ``hidden_states[L + 1]`` of a Hugging Face ``output_hidden_states=True`` call for
every block but the last (the last entry of ``hidden_states`` has the final norm applied).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from avec.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureAdapter:
    """One architecture family: the ``model_type`` values it covers and its block paths."""

    family: str
    model_types: tuple[str, ...]
    block_paths: tuple[str, ...]


ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(
        "llama",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "olmo", "olmo2"),
        ("model.layers",),
    ),
    ArchitectureAdapter(
        "gemma",
        ("gemma", "gemma2", "gemma3", "gemma3_text"),
        ("model.layers", "model.language_model.layers", "language_model.model.layers"),
    ),
    ArchitectureAdapter("gpt2", ("gpt2",), ("transformer.h",)),
    ArchitectureAdapter("gpt_neox", ("gpt_neox",), ("gpt_neox.layers",)),
    ArchitectureAdapter("phi", ("phi", "phi3"), ("model.layers",)),
)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module if isinstance(module, nn.Module) else None


def _as_blocks(module: nn.Module | None) -> nn.ModuleList | None:
    if isinstance(module, nn.ModuleList) and len(module) > 0:
        return module
    return None


def find_blocks(model: nn.Module, block_path: str | None = None) -> tuple[str, str, nn.ModuleList]:
    """Return ``(family, block_path, blocks)`` for a Hugging Face causal LM.

    ``block_path`` (a dotted attribute path such as ``"model.layers"``) overrides the lookup,
    for architectures avec does not know yet.
    """
    if block_path is not None:
        blocks = _as_blocks(get_submodule(model, block_path))
        if blocks is None:
            raise UnsupportedArchitectureError(
                f"block_path={block_path!r} does not name a non-empty nn.ModuleList in "
                f"{type(model).__name__}; print(model) shows the module tree"
            )
        return "custom", block_path, blocks
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            for path in adapter.block_paths:
                blocks = _as_blocks(get_submodule(model, path))
                if blocks is not None:
                    return adapter.family, path, blocks
    families = ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)
    raise UnsupportedArchitectureError(
        f"avec does not know where {type(model).__name__} (model_type={model_type!r}) keeps its "
        f"decoder blocks. Supported families: {families}. Pass the dotted path of the "
        f"nn.ModuleList of blocks yourself, e.g. load_model(..., block_path='model.layers') "
        f"or `--block-path model.layers` on the command line."
    )
