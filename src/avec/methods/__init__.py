"""Ways of finding a direction from paired activations (one module each)."""

from __future__ import annotations

from avec.methods.base import Method
from avec.methods.mean_diff import MeanDiff

METHODS: dict[str, type] = {"mean_diff": MeanDiff}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]()


__all__ = ["METHODS", "Method", "MeanDiff", "get_method"]
