"""Ways of finding a direction from paired activations (one module each).

Every method's ``fit(positive, negative)`` takes ``[N, d]`` tensors and returns a ``[d]``
direction (ActAdd: ``[T, d]`` per-position activations and a ``[T, d]`` block).
"""

from __future__ import annotations

from typing import Any, Mapping

from avec.directions.methods.actadd import ActAdd
from avec.directions.methods.base import Method, MethodDefaults, make_method
from avec.directions.methods.mean_diff import MeanDiff
from avec.directions.methods.pca import PCA
from avec.directions.methods.probe import Probe
from avec.directions.methods.random_direction import RandomDirection

METHODS: dict[str, type] = {"mean_diff": MeanDiff, "pca": PCA, "probe": Probe,
                            "random": RandomDirection, "actadd": ActAdd}
PAIRWISE_METHODS = tuple(n for n, cls in METHODS.items() if cls.reads == "activations")


def get_method(name: str, *, context: Mapping[str, Any] | None = None, **options: Any) -> Method:
    """A core method by name (``METHODS``), see :func:`~avec.directions.methods.base.make_method`."""
    return make_method(METHODS, name, context=context, **options)


__all__ = ["METHODS", "PAIRWISE_METHODS", "ActAdd", "MeanDiff", "Method", "MethodDefaults", "PCA", "Probe",
           "RandomDirection", "get_method", "make_method"]
