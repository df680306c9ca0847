"""Small helpers shared by everything that hooks a block's output."""

from __future__ import annotations

from typing import Any

import torch


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
