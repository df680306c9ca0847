"""Hooks on a model's modules: the one context manager that installs and removes them, and the
helpers that read or replace a block's hidden states.

Every place in avec that registers a PyTorch hook does it through :func:`installed_hooks`, so no
hook outlives its ``with`` block, also when the body (or a later registration) raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class Hooks:
    """The hooks registered inside one :func:`installed_hooks` block (removed when it ends)."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def forward(self, module: nn.Module, fn: Callable[..., Any], *,
                prepend: bool = False) -> None:
        """``module.register_forward_hook(fn, prepend=prepend)``, removed on exit.
        ``prepend=True`` runs it before hooks already there (e.g. transformers' recorders)."""
        self._handles.append(module.register_forward_hook(fn, prepend=prepend))

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, prepend: bool = False,
            with_kwargs: bool = False) -> None:
        """``module.register_forward_pre_hook(fn, ...)``, removed on exit."""
        self._handles.append(module.register_forward_pre_hook(
            fn, prepend=prepend, with_kwargs=with_kwargs))

    def __len__(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        """Remove every hook registered so far (newest first)."""
        while self._handles:
            self._handles.pop().remove()


@contextmanager
def installed_hooks() -> Iterator[Hooks]:
    """Register hooks through the yielded :class:`Hooks`; all are removed when the block exits,
    normally or by an exception.

    >>> with installed_hooks() as hooks:
    ...     hooks.forward(model.blocks[3], record)
    ...     model.hf(input_ids)
    """
    hooks = Hooks()
    try:
        yield hooks
    finally:
        hooks.remove()


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first element of a tuple)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"cannot find hidden states in a block output of type {type(output).__name__}")


def replace_block_output(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return hidden
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    output.last_hidden_state = hidden
    return output


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the deepest layer needed has run."""
