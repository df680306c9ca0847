"""From contrast pairs to a :class:`SteeringVector` (activations + a method)."""

from __future__ import annotations

from typing import Sequence

import torch

from avec.directions.activations import ReadPosition, forward_until, pad_batch, read_activations
from avec.data.pairs import ContrastPair
from avec.data.templates import pair_texts
from avec.directions.methods import get_method
from avec.directions.methods.actadd import ActAdd, actadd_token_lists
from avec.models.context import check_texts
from avec.models.model import Model
from avec.vector import SteeringVector


def extract(model: Model, pairs: Sequence[ContrastPair], layers: Sequence[int], *,
            method: str = "mean_diff", position: ReadPosition = "last", chat: bool = False,
            batch_size: int = 32, progress: bool = False, seed: int = 0) -> SteeringVector:
    """Build a steering vector from contrast pairs.

    Activations are read at the output of each block in ``layers`` at ``position`` of each text
    (the last token of the text as given, by default); ``method`` (``mean_diff``, ``pca``,
    ``probe``, ``random``, ``actadd``) turns the positive and negative activations into one
    direction per layer. ``seed`` drives the ``random`` control. ``actadd`` takes exactly one
    pair and reads every position (see :func:`extract_actadd`).
    """
    if not pairs:
        raise ValueError("no contrast pairs given")
    fitter = get_method(method, context={"seed": seed})
    if fitter.pairs_needed is not None and len(pairs) != fitter.pairs_needed:
        raise ValueError(f"{method} fits on exactly {fitter.pairs_needed} pair(s); got "
                         f"{len(pairs)} pairs")
    if fitter.reads == "tokens":
        return extract_actadd(model, pairs[0], layers, chat=chat)
    if fitter.reads != "activations":
        raise ValueError(f"{method} reads {fitter.reads}, which extract does not provide")
    layers = model.check_layers(list(layers))
    pos_texts, neg_texts = pair_texts(list(pairs), model, chat=chat)
    sources = [f"{p.source or f'pair {i + 1}'} ({side})" for side in ("positive", "negative")
               for i, p in enumerate(pairs)]
    acts = read_activations(model, pos_texts + neg_texts, layers, position=position,
                            batch_size=batch_size, progress=progress, sources=sources)
    n = len(pairs)
    directions: dict[int, torch.Tensor] = {
        L: fitter.fit(a[:n], a[n:]) for L, a in acts.items()}
    meta = {"model": model.identity(), "method": fitter.name, "positions": position,
            "chat_template": chat, "n_pairs": n, **fitter.info()}
    return SteeringVector(directions, meta)


def space_token_id(model: Model) -> int:
    ids = model.tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the tokenizer of {model.name} does not encode ' ' as one token "
                         f"({ids}); ActAdd's space padding is undefined for it")
    return int(ids[0])


@torch.inference_mode()
def extract_actadd(model: Model, pair: ContrastPair, layers: Sequence[int], *,
                   chat: bool = False) -> SteeringVector:
    """ActAdd: per-position activation difference of one prompt pair, ``[T, d]`` per layer.

    The shorter prompt is padded at the end with space tokens; the result is added at the front
    positions 0..T-1 of a steered prompt.
    """
    layers = model.check_layers(list(layers))
    (pos_text,), (neg_text,) = pair_texts([pair], model, chat=chat)
    pos_ids, neg_ids = model.encode([pos_text, neg_text])
    where = pair.source or "the pair"
    check_texts(model, [pos_text, neg_text], [pos_ids, neg_ids],
                sources=[f"{where} (positive)", f"{where} (negative)"])
    pos_ids, neg_ids = actadd_token_lists(pos_ids, neg_ids, space_token_id(model))
    ids, mask, positions = pad_batch([pos_ids, neg_ids], model.tokenizer.pad_token_id, "right",
                                     model.device)
    hidden: dict[int, torch.Tensor] = {}
    forward_until(model, layers, lambda L, h: hidden.__setitem__(L, h.float().cpu()), ids, mask,
                  positions)
    fitter = ActAdd()
    directions = {L: fitter.fit(h[0], h[1]) for L, h in hidden.items()}
    meta = {"model": model.identity(), "method": "actadd", "positions": "all (front injection)",
            "chat_template": chat, "n_pairs": 1, "tokens": len(pos_ids),
            "prompts": [pair.positive, pair.negative]}
    return SteeringVector(directions, meta)
