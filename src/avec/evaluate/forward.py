"""Forward passes shared by the metrics: batched logits, and prefix caches reused across rows."""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch

from avec.directions.activations import length_batches, pad_batch
from avec.models.context import check_lengths
from avec.models.model import Model, cache_kwarg, keep_logits, output_cache


def as_layers(layer: int | Sequence[int]) -> list[int]:
    """One layer or several, as the list ``steer`` takes."""
    return [int(layer)] if isinstance(layer, int) else [int(L) for L in layer]


def _check(model: Model, token_lists: list[list[int]]) -> None:
    check_lengths(model, [len(t) for t in token_lists],
                  lambda i: f"text {i + 1} of {len(token_lists)}")


@torch.inference_mode()
def prefix_cache(model: Model, prefixes: list[list[int]]) -> tuple[Any, torch.Tensor]:
    """Run left-padded prefixes once; return ``(cache, attention_mask)``."""
    _check(model, prefixes)
    ids, mask, pos = pad_batch(prefixes, model.tokenizer.pad_token_id, "left", model.device)
    out = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    return output_cache(out), mask


@torch.inference_mode()
def continue_from_cache(model: Model, cache: Any, mask: torch.Tensor, suffix: list[int],
                        repeats: int) -> torch.Tensor:
    """Logits of the last suffix token for each prefix row repeated ``repeats`` times.

    Row ``i * repeats + r`` continues prefix ``i``; the cache is copied, never modified.
    """
    work = copy.deepcopy(cache)
    if repeats > 1:
        work.batch_repeat_interleave(repeats)
    rows = mask.shape[0] * repeats
    full_mask = torch.cat([mask.repeat_interleave(repeats, 0),
                           torch.ones(rows, len(suffix), dtype=mask.dtype, device=mask.device)], 1)
    start = mask.sum(1).repeat_interleave(repeats, 0)
    pos = start.unsqueeze(1) + torch.arange(len(suffix), device=mask.device)
    ids = torch.tensor([suffix] * rows, device=mask.device)
    out = model.hf(input_ids=ids, attention_mask=full_mask, position_ids=pos, use_cache=True,
                   **{cache_kwarg(model): work})
    return out.logits[:, -1].float()


@torch.inference_mode()
def tail_logits(model: Model, token_lists: Sequence[list[int]], keep: int = 1,
                batch_size: int = 16) -> list[torch.Tensor]:
    """Logits ``[keep, vocab]`` (float32, CPU) of the last ``keep`` positions of each token
    list, under whatever interventions are active; left-padded batches of similar lengths, the
    output head run on those positions only."""
    token_lists = list(token_lists)
    _check(model, token_lists)
    only = keep_logits(model.hf, keep)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    out: list[torch.Tensor | None] = [None] * len(token_lists)
    for rows in length_batches(order, token_lists, batch_size):
        ids, mask, pos = pad_batch([token_lists[i] for i in rows], model.tokenizer.pad_token_id,
                                   "left", model.device)
        logits = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                          **only).logits[:, -keep:].float().cpu()
        for j, i in enumerate(rows):
            out[i] = logits[j]
    return out  # type: ignore[return-value]


@torch.inference_mode()
def batched_logits(model: Model, token_lists: list[list[int]], batch_size: int = 16
                   ) -> list[torch.Tensor]:
    """Full logits ``[len_i, vocab]`` (float32, CPU) for each token list, right-padded batches
    (fewer rows for long texts, see :func:`avec.directions.activations.length_batches`)."""
    _check(model, token_lists)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    out: list[torch.Tensor | None] = [None] * len(token_lists)
    for rows in length_batches(order, token_lists, batch_size):
        ids, mask, pos = pad_batch([token_lists[i] for i in rows], model.tokenizer.pad_token_id,
                                   "right", model.device)
        logits = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos,
                          use_cache=False).logits.float().cpu()
        for j, i in enumerate(rows):
            out[i] = logits[j, : len(token_lists[i])]
    return out  # type: ignore[return-value]


@torch.inference_mode()
def steered_logit_rows(model: Model, token_lists: list[list[int]], vector: Any,
                       layer: int | Sequence[int] | None, coefs: list[float],
                       batch_size: int = 16):
    """Yield ``(text_index, coef_index, logits[len, vocab])`` for every text at every coefficient.

    Each batch holds a few texts, each repeated once per coefficient with its own per-row
    coefficient, so k coefficients take one batched pass per group of texts. ``layer`` is one
    layer or several (a band, each layer with the same coefficient).
    """
    from avec.intervene.steer import steer

    _check(model, token_lists)
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    per_batch = max(1, batch_size // max(1, len(coefs)))
    row_coefs = torch.tensor(coefs, dtype=torch.float32)
    for start in range(0, len(order), per_batch):
        texts = order[start:start + per_batch]
        rows = [token_lists[i] for i in texts for _ in coefs]
        ids, mask, pos = pad_batch(rows, model.tokenizer.pad_token_id, "right", model.device)
        if vector is None or layer is None or bool((row_coefs == 0).all()):
            logits = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos,
                              use_cache=False).logits
        else:
            with steer(model, vector, coef=row_coefs.repeat(len(texts)),
                       layers=as_layers(layer)):
                logits = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos,
                                  use_cache=False).logits
        logits = logits.float().cpu()
        for t, i in enumerate(texts):
            for c in range(len(coefs)):
                yield i, c, logits[t * len(coefs) + c, : len(token_lists[i])]

