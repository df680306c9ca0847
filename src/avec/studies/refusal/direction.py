"""Picking the one direction of a vector file that an ablation or an orthogonalization uses."""

from __future__ import annotations

from typing import Any


def one_direction(vector: Any, layer: int | None) -> tuple[int, Any]:
    """``(layer, direction)``: the direction of ``vector`` at ``layer``.

    With ``layer=None`` the layer is the one the vector's ``refusal`` metadata names (as
    written by :mod:`avec.studies.refusal.select`), else the vector's only layer.

    Raises:
        ValueError: ``layer`` is None and the vector has several layers and no ``refusal``
            metadata naming one of them, or ``layer`` is not a layer of the vector.
    """
    if layer is None:
        info = vector.metadata.get("refusal", {})
        if isinstance(info, dict) and info.get("layer") in vector.directions:
            layer = int(info["layer"])
        elif len(vector.layers) == 1:
            layer = vector.layers[0]
        else:
            raise ValueError(f"the vector has layers {vector.layers}; pick one with --layer")
    if layer not in vector.directions:
        raise ValueError(f"layer {layer} is not in the vector (layers {vector.layers})")
    return layer, vector[layer]
