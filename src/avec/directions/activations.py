"""Reading activations: the output of decoder block L at chosen token positions.

One forward pass serves every requested layer; the pass stops right after the deepest
requested block (later blocks and the LM head never run). Texts are tokenized once, sorted by
length and right-padded in batches, with attention masks and explicit position ids, so a text's
activations do not depend on what else is in its batch.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, Sequence, Union

import torch
from tqdm.auto import tqdm

from avec.models.hooks import StopForward, block_output, installed_hooks
from avec.models.context import check_texts
from avec.models.model import Model

ReadPosition = Union[str, int]
"""``"last"`` (default), ``"mean"`` (mean over the text's tokens after the first: the first token
is an attention sink whose activation norm is ~100x the others' in the default model, and
would dominate the mean), ``"ab_letter"`` (the token of
the answer letter in the last ``(A)``-style choice of the text), or an int token index
(negative counts from the end of the text's own tokens)."""

_AB_LETTER = re.compile(r"\(([A-Za-z])\)?")


def ab_letter_index(model: Model, text: str, ids: Sequence[int]) -> int:
    """Index of the token holding the letter of the text's last ``(X)`` answer choice."""
    matches = list(_AB_LETTER.finditer(text))
    if not matches:
        raise ValueError(f"read position 'ab_letter' needs an answer like '(A)' in the text; "
                         f"none in {text[-80:]!r}")
    char = matches[-1].start(1)
    tok = model.tokenizer
    if getattr(tok, "is_fast", False):
        enc = tok(text, return_offsets_mapping=True)
        for i, (start, end) in enumerate(enc["offset_mapping"]):
            if start <= char < end:
                return i
    return len(model.encode([text[: char + 1]])[0]) - 1


def resolve_indices(model: Model, texts: Sequence[str], ids: list[list[int]],
                    position: ReadPosition) -> list[int] | None:
    """Per-text token index for a single-token read position (None for ``"mean"``)."""
    if position == "mean":
        return None
    if position == "last":
        return [len(x) - 1 for x in ids]
    if position == "ab_letter":
        return [ab_letter_index(model, t, x) for t, x in zip(texts, ids)]
    if isinstance(position, int) and not isinstance(position, bool):
        out = []
        for text, x in zip(texts, ids):
            idx = position + len(x) if position < 0 else position
            if not 0 <= idx < len(x):
                raise ValueError(f"read position {position} is outside the {len(x)} tokens of "
                                 f"{text[:60]!r}")
            out.append(idx)
        return out
    raise ValueError(f"unknown read position {position!r}; use 'last', 'mean', 'ab_letter' or an "
                     f"int token index")


def pad_batch(seqs: list[list[int]], pad_id: int, side: str = "right",
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` for token lists of different lengths.

    Position ids count real tokens only, so left padding does not shift positions.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, sl] = torch.tensor(s, dtype=torch.long)
        mask[i, sl] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


MAX_BATCH_AREA = 2**24
"""Cap on rows x width^2 of one padded batch: attention scores and masks grow with the square
of the width, so a batch of long texts is split into fewer rows (results do not change: a
text's activations do not depend on its batch)."""


def length_batches(order: Sequence[int], ids: Sequence[Sequence[int]], batch_size: int,
                   max_area: int = MAX_BATCH_AREA) -> list[list[int]]:
    """Consecutive groups of ``order`` (sorted longest first) of at most ``batch_size`` rows,
    fewer when ``rows * longest**2`` would pass ``max_area``."""
    batches: list[list[int]] = []
    i = 0
    while i < len(order):
        width = max(1, len(ids[order[i]]))
        rows = max(1, min(batch_size, max_area // (width * width)))
        batches.append(list(order[i:i + rows]))
        i += rows
    return batches


def forward_until(model: Model, layers: Sequence[int],
                  on_output: Callable[[int, torch.Tensor], None],
                  input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor) -> None:
    """Run the model, calling ``on_output(layer, hidden)`` for each layer, and stop after the last."""
    deepest = max(layers)

    def make_hook(layer: int) -> Callable[..., None]:
        def hook(_module: torch.nn.Module, _args: object, output: object) -> None:
            on_output(layer, block_output(output))
            if layer == deepest:
                raise StopForward

        return hook

    with installed_hooks() as hooks:
        for layer in sorted(set(layers)):
            hooks.forward(model.blocks[layer], make_hook(layer))
        try:
            model.hf(input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, use_cache=False)
        except StopForward:
            pass


def layer_outputs(model: Model, texts: Sequence[str], layer: int, *, max_tokens: int = 128,
                  batch_size: int = 16, progress: bool = False,
                  desc: str = "activations") -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """``(text index, token ids, hidden [n_tokens, d_model])`` for every text, block ``layer``'s
    output on the model's device and dtype, in an order sorted by length (not input order).

    Texts are truncated to their first ``max_tokens`` tokens, right-padded in batches with an
    attention mask and position ids counted over real tokens (so a text's rows do not depend
    on its batch), and the forward pass stops after block ``layer``. Texts that tokenize to
    nothing are skipped. Call under ``torch.no_grad()``.
    """
    (layer,) = model.check_layers([layer])
    if max_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens}, {batch_size}")
    ids = [x[:max_tokens] for x in model.encode(list(texts))]
    check_texts(model, texts, ids)
    order = sorted((i for i in range(len(ids)) if ids[i]), key=lambda i: -len(ids[i]))
    batches = length_batches(order, ids, batch_size)
    pad_id = model.tokenizer.pad_token_id
    for rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        input_ids, mask, pos = pad_batch([ids[i] for i in rows], pad_id, "right", model.device)
        got: list[torch.Tensor] = []
        forward_until(model, [layer], lambda _L, h, out=got: out.append(h), input_ids, mask, pos)
        for j, i in enumerate(rows):
            yield i, ids[i], got[0][j, : len(ids[i])]


@torch.inference_mode()
def read_activations(model: Model, texts: Sequence[str], layers: Sequence[int], *,
                     position: ReadPosition = "last", batch_size: int = 32,
                     progress: bool = False,
                     sources: Sequence[str | None] | None = None) -> dict[int, torch.Tensor]:
    """Activations of ``texts`` at the output of each block in ``layers``.

    Returns ``{layer: tensor[len(texts), d_model]}`` (float32, CPU), rows in input order.
    Texts are read as given: no chat template or special tokens beyond the tokenizer's defaults.
    A text longer than the model's context raises :class:`~avec.errors.DataError` naming it
    (by ``sources[i]``, e.g. ``"pairs.jsonl:3"``, when given).
    """
    if not texts:
        raise ValueError("no texts to read activations from")
    layers = model.check_layers(list(layers))
    ids = model.encode(list(texts))
    check_texts(model, texts, ids, sources=sources)
    for text, x in zip(texts, ids):
        if not x:
            raise ValueError(f"text {text[:200]!r} tokenizes to nothing")
    indices = resolve_indices(model, texts, ids, position)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = {L: torch.empty(len(ids), model.d_model) for L in layers}
    pad_id = model.tokenizer.pad_token_id
    batches = length_batches(order, ids, batch_size)
    for rows in tqdm(batches, desc="activations", disable=not progress, leave=False):
        input_ids, mask, pos = pad_batch([ids[i] for i in rows], pad_id, "right", model.device)
        row_index = torch.tensor(rows)
        if indices is not None:
            gather = torch.tensor([indices[i] for i in rows], device=model.device)

        def collect(layer: int, hidden: torch.Tensor) -> None:
            if indices is None:
                m = mask.clone()
                m[m.sum(1) > 1, 0] = 0  # skip the first token (sink) unless it is the only one
                m = m.unsqueeze(-1).to(hidden.dtype)
                picked = (hidden * m).sum(1) / m.sum(1)
            else:
                picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), gather]
            out[layer][row_index] = picked.float().cpu()

        forward_until(model, layers, collect, input_ids, mask, pos)
    return out
