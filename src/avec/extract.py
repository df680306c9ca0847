"""From contrast pairs to a :class:`SteeringVector` (activations + a method)."""

from __future__ import annotations

from typing import Sequence

import torch

from avec.activations import ReadPosition, read_activations
from avec.data.pairs import ContrastPair
from avec.data.templates import pair_texts
from avec.methods import get_method
from avec.models.model import Model
from avec.vector import SteeringVector


def extract(model: Model, pairs: Sequence[ContrastPair], layers: Sequence[int], *,
            method: str = "mean_diff", position: ReadPosition = "last", chat: bool = False,
            batch_size: int = 32, progress: bool = False) -> SteeringVector:
    """Build a steering vector from contrast pairs.

    Activations are read at the output of each block in ``layers`` at ``position`` of each text
    (the last token of the text as given, by default); ``method`` turns the positive and negative
    activations into one direction per layer.
    """
    if not pairs:
        raise ValueError("no contrast pairs given")
    layers = model.check_layers(list(layers))
    fitter = get_method(method)
    pos_texts, neg_texts = pair_texts(list(pairs), model, chat=chat)
    acts = read_activations(model, pos_texts + neg_texts, layers, position=position,
                            batch_size=batch_size, progress=progress)
    n = len(pairs)
    directions: dict[int, torch.Tensor] = {
        L: fitter.fit(a[:n], a[n:]) for L, a in acts.items()}
    meta = {"model": model.identity(), "method": fitter.name, "positions": position,
            "chat_template": chat, "n_pairs": n}
    return SteeringVector(directions, meta)
