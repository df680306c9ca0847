"""A/B behaviour evaluation as CAA does it (Rimsky et al. 2024).

Each item is a question with two lettered choices. The prompt is the question as the user turn,
and the assistant's answer starts with ``(``; the score of an item is
``p(target letter) / (p(A) + p(B))`` for the next token, averaged over items. Tokenizers that
hold ``(A`` and ``(B`` as single tokens (Qwen's) would put ~1% of the mass on a letter after a
lone ``(``, so for them (chat prompts) the answer is not started and the joint tokens ``(A`` /
``(B`` are scored instead (:func:`answer_tokens`). The steering vector
is added to the tokens after the user's instruction (the assistant header and the ``(``), as in
CAA, so the question itself is computed once, unsteered, and its KV cache is shared by every
layer and coefficient of a sweep: k coefficients cost little more than one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from avec.data.pairs import ab_letter
from avec.directions.activations import pad_batch
from avec.errors import DataError
from avec.evaluate.forward import as_layers, continue_from_cache, prefix_cache
from avec.models.context import check_lengths, snippet
from avec.models.model import Model
from avec.intervene.steer import Op, steer
from avec.vector import SteeringVector


@dataclass(frozen=True)
class ABItem:
    """A question with choices; ``target`` is the letter that scores (matching / correct)."""

    question: str
    target: str
    other: str


def load_ab_items(path: str | Path) -> list[ABItem]:
    """CAA behaviour files (``question``, ``answer_matching_behavior``, ...) or capability files
    (``prompt``, ``correct``, ``incorrect``, e.g. MMLU/TruthfulQA A/B)."""
    from avec.data.textfile import check_text, parse_json_document, read_text

    path = Path(path)
    data = parse_json_document(path, read_text(path))
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty JSON list of A/B items")
    items = []
    for i, obj in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected an object")
        if "answer_matching_behavior" in obj:
            keys = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
        elif "correct" in obj:
            keys = ("prompt", "correct", "incorrect")
        else:
            raise DataError(f"{where}: expected CAA keys (question, answer_matching_behavior, "
                            f"answer_not_matching_behavior) or (prompt, correct, incorrect)")
        missing = [k for k in keys if not isinstance(obj.get(k), str) or not obj[k].strip()]
        if missing:
            raise DataError(f"{where}: missing or empty {missing}")
        for key in keys:
            check_text(obj[key], where, key)
        target, other = ab_letter(obj[keys[1]]), ab_letter(obj[keys[2]])
        if target is None or other is None or target == other:
            raise DataError(f"{where}: answers must be different letters like '(A)'/'(B)'")
        items.append(ABItem(obj[keys[0]], target, other))
    return items


def letter_token(model: Model, letter: str) -> int:
    ids = model.tokenizer(letter, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the letter {letter!r} is not a single token for {model.name}: {ids}")
    return int(ids[0])


def answer_tokens(model: Model, letters: Sequence[str], chat: bool = True
                  ) -> tuple[dict[str, int], str]:
    """The token scored for each letter and the answer start the prompt ends with: ``"("``
    and the letter tokens, or, for chat prompts when the tokenizer has ``"(X"`` as one token
    for every letter (Qwen), ``""`` and those joint tokens."""
    if chat and model.has_chat_template:
        joint = {x: model.tokenizer("(" + x, add_special_tokens=False)["input_ids"]
                 for x in letters}
        if all(len(ids) == 1 for ids in joint.values()):
            return {x: int(ids[0]) for x, ids in joint.items()}, ""
    return {x: letter_token(model, x) for x in letters}, "("


def split_prompt(model: Model, question: str, chat: bool, answer_start: str = "("
                 ) -> tuple[list[int], list[int]]:
    """(unsteered prefix tokens, steered suffix tokens) of the A/B prompt ending in
    ``answer_start`` (chat prompts; see :func:`answer_tokens`)."""
    tok = model.tokenizer
    if chat and model.has_chat_template:
        full = model.chat_prompt(question, answer_start)
        user = tok.apply_chat_template([{"role": "user", "content": question}],
                                       add_generation_prompt=False, tokenize=False)
        ids = tok(full, add_special_tokens=False)["input_ids"]
        prefix = tok(user, add_special_tokens=False)["input_ids"] if full.startswith(user) else []
        if prefix and ids[: len(prefix)] == prefix and len(prefix) < len(ids):
            return ids[: len(prefix)], ids[len(prefix):]
        return ids[:-1], ids[-1:]
    ids = model.encode([f"{question}\n\nAnswer: ("])[0]
    return ids[:-1], ids[-1:]


Variant = tuple[SteeringVector | None, int | Sequence[int] | None]
"""``(vector, layer)``: a layer, several (a band), or ``None`` (unsteered)."""


def ab_sweep(model: Model, items: Sequence[ABItem], vector: SteeringVector | None = None,
             layers: Sequence[int] | None = None, coefs: Sequence[float] = (0.0,), *,
             op: Op = "add", chat: bool = True, batch_size: int = 8,
             progress: bool = False) -> torch.Tensor:
    """Per-item ``p(target) / (p(A) + p(B))`` for every layer and coefficient.

    Returns a tensor ``[len(layers), len(coefs), len(items)]`` (one layer ``None`` = unsteered
    when no vector is given). Each layer steers only that layer of ``vector``.
    """
    layer_list: list[int | None] = list(layers) if layers is not None else (
        list(vector.layers) if vector is not None else [None])
    return ab_variants(model, items, [(vector, L) for L in layer_list], coefs, op=op, chat=chat,
                       batch_size=batch_size, progress=progress)


@torch.inference_mode()
def ab_variants(model: Model, items: Sequence[ABItem], variants: Sequence[Variant],
                coefs: Sequence[float] = (0.0,), *, op: Op = "add", chat: bool = True,
                batch_size: int = 8, progress: bool = False) -> torch.Tensor:
    """``[len(variants), len(coefs), len(items)]`` scores; a variant is ``(vector, layer)``.

    Every variant with a ``[d]`` direction reuses the question's unsteered prefix cache. A
    per-position ActAdd block is injected at the front of the prompt, so its variants run the
    whole prompt steered (no cache sharing).
    """
    if any(v is None for v, _ in variants) and any(c != 0 for c in coefs):
        raise ValueError("nonzero coefficients need a vector")
    letters = sorted({x for it in items for x in (it.target, it.other)})
    letter_ids, answer_start = answer_tokens(model, letters, chat)
    split = [split_prompt(model, it.question, chat, answer_start) for it in items]
    check_lengths(model, [len(a) + len(b) for a, b in split],
                  lambda i: f"A/B item {i + 1} ({snippet(items[i].question)})")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (_prefix, suffix) in enumerate(split):
        groups.setdefault(tuple(suffix), []).append(i)
    out = torch.empty(len(variants), len(coefs), len(items))
    batches = [(suffix, rows[j:j + batch_size]) for suffix, rows in groups.items()
               for j in range(0, len(rows), batch_size)]
    n = len(coefs)
    row_coefs = torch.tensor(list(coefs), dtype=torch.float32)

    def record(vi: int, rows: list[int], logits: torch.Tensor) -> None:
        probs = logits.softmax(-1)
        for j, i in enumerate(rows):
            it = items[i]
            p = probs[j * n:(j + 1) * n]
            pt, po = p[:, letter_ids[it.target]], p[:, letter_ids[it.other]]
            out[vi, :, i] = (pt / (pt + po)).cpu()

    for suffix, rows in tqdm(batches, desc="A/B", disable=not progress, leave=False):
        cache, mask = prefix_cache(model, [split[i][0] for i in rows])
        for vi, (vector, layer) in enumerate(variants):
            unsteered = vector is None or layer is None or bool((row_coefs == 0).all())
            if unsteered:
                record(vi, rows, continue_from_cache(model, cache, mask, list(suffix), n))
            elif len(vector.shape) == 2:  # ActAdd block: steer the whole prompt from the front
                full = [split[i][0] + split[i][1] for i in rows for _ in coefs]
                ids, fmask, pos = pad_batch(full, model.tokenizer.pad_token_id, "left",
                                            model.device)
                with steer(model, vector, coef=row_coefs.repeat(len(rows)),
                           layers=as_layers(layer)):
                    logits = model.hf(input_ids=ids, attention_mask=fmask, position_ids=pos,
                                      use_cache=False).logits[:, -1].float()
                record(vi, rows, logits)
            else:
                with steer(model, vector, coef=row_coefs.repeat(len(rows)),
                           layers=as_layers(layer), op=op):
                    record(vi, rows, continue_from_cache(model, cache, mask, list(suffix), n))
    return out
