"""Ways of finding a direction from paired activations (one module each).

Every method's ``fit(positive, negative)`` takes ``[N, d]`` tensors and returns a ``[d]``
direction (ActAdd: ``[T, d]`` per-position activations and a ``[T, d]`` block).
"""

from __future__ import annotations

from typing import Any

from avec.directions.methods.actadd import ActAdd
from avec.directions.methods.base import Method
from avec.directions.methods.mean_diff import MeanDiff
from avec.directions.methods.pca import PCA
from avec.directions.methods.probe import Probe
from avec.directions.methods.random_direction import RandomDirection

METHODS: dict[str, type] = {"mean_diff": MeanDiff, "pca": PCA, "probe": Probe,
                            "random": RandomDirection, "actadd": ActAdd}
PAIRWISE_METHODS = ("mean_diff", "pca", "probe", "random")


def get_method(name: str, **options: Any) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name](**options)


__all__ = ["METHODS", "PAIRWISE_METHODS", "ActAdd", "MeanDiff", "Method", "PCA", "Probe",
           "RandomDirection", "get_method"]
