"""Greedy generation, plain or steered, with one coefficient per batch row."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec.activations import pad_batch
from avec.models.model import Model
from avec.steer import Intervention, Op, Positions, steer
from avec.vector import SteeringVector


@dataclass(frozen=True)
class Completion:
    prompt: str
    coef: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_prompt(model: Model, prompt: str, chat: bool | None = None) -> tuple[list[int], bool]:
    """Token ids of a prompt, chat-templated when ``chat`` (``None``: if the model has a template)."""
    use_chat = model.has_chat_template if chat is None else chat
    if use_chat:
        text = model.chat_prompt(prompt)
        return list(model.tokenizer(text, add_special_tokens=False)["input_ids"]), True
    return model.encode([prompt])[0], False


@torch.inference_mode()
def generate_ids(model: Model, prompt_ids: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, seed: int = 0,
                 stopping_criteria: Sequence[Any] = ()) -> list[list[int]]:
    """Continuation of a batch of token lists (left-padded): greedy, or sampled at
    ``temperature`` > 0 with ``seed`` (the global torch RNG is restored afterwards). Returns new
    tokens only, cut at the first end-of-sequence token. ``stopping_criteria`` are transformers
    ``StoppingCriteria`` (a row they stop is padded with end-of-sequence tokens)."""
    from transformers import GenerationConfig, StoppingCriteriaList

    tok = model.tokenizer
    eos = model.hf.generation_config.eos_token_id
    if eos is None:
        eos = tok.eos_token_id
    input_ids, mask, _ = pad_batch(prompt_ids, tok.pad_token_id, "left", model.device)
    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1,
                              pad_token_id=tok.pad_token_id, eos_token_id=eos,
                              **({"temperature": temperature, "top_k": 0, "top_p": 1.0}
                                 if sample else {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.hf.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                stopping_criteria=StoppingCriteriaList(list(stopping_criteria)))
    eos_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    results = []
    for row in out[:, input_ids.shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    return results


Variant = tuple[SteeringVector | None, float]


def variant_completions(model: Model, prompts: Sequence[str], variants: Sequence[Variant], *,
                        layers: Sequence[int] | None = None, positions: Positions = "all",
                        op: Op = "add", value: float = 0.0, max_new_tokens: int = 64,
                        chat: bool | None = None, batch_size: int = 32,
                        progress: bool = False) -> list[list[str]]:
    """Greedy completions of every prompt under every variant ``(vector, coef)``: ``[v][p]``.

    Rows of equal prompt length share a batch (no padding) whatever their vector: each distinct
    vector in a batch is one intervention whose per-row coefficient is zero on the other rows,
    which leaves those rows bit-identical. Unsteered variants (no vector, or coefficient 0) are
    generated once per prompt and shared, so many vectors x coefficients cost about as many
    batched passes as rows / ``batch_size``.
    """
    for vector, coef in variants:
        if vector is None and coef != 0:
            raise ValueError("a nonzero coefficient needs a vector")
    encoded = [format_prompt(model, p, chat)[0] for p in prompts]
    steered = [v for v, (vector, coef) in enumerate(variants) if vector is not None and coef != 0]
    # a row is (prompt index, variant index or None for the shared unsteered row)
    rows: list[tuple[int, int | None]] = []
    for i in range(len(prompts)):
        if len(steered) < len(variants):
            rows.append((i, None))
        rows.extend((i, v) for v in steered)
    by_len: dict[int, list[int]] = defaultdict(list)
    for r, (i, _v) in enumerate(rows):
        by_len[len(encoded[i])].append(r)
    batches = [group[j:j + batch_size] for group in by_len.values()
               for j in range(0, len(group), batch_size)]
    texts: dict[tuple[int, int | None], str] = {}
    for batch in tqdm(batches, desc="generate", disable=not progress, leave=False):
        ids = [encoded[rows[r][0]] for r in batch]
        per_vector: dict[int, tuple[SteeringVector, torch.Tensor]] = {}
        for j, r in enumerate(batch):
            v = rows[r][1]
            if v is None:
                continue
            vector, coef = variants[v]
            entry = per_vector.setdefault(id(vector), (vector, torch.zeros(len(batch))))
            entry[1][j] = float(coef)
        interventions = [Intervention(vec, coef=c, layers=layers, positions=positions, op=op,
                                      value=value) for vec, c in per_vector.values()]
        with steer(model, interventions) if interventions else contextlib.nullcontext():
            new = generate_ids(model, ids, max_new_tokens)
        for r, toks in zip(batch, new):
            texts[rows[r]] = model.tokenizer.decode(toks, skip_special_tokens=True).strip()
    return [[texts[(i, v if v in steered else None)] for i in range(len(prompts))]
            for v in range(len(variants))]


def steered_completions(model: Model, prompts: Sequence[str],
                        vector: SteeringVector | None = None, coefs: Sequence[float] = (0.0,), *,
                        layers: Sequence[int] | None = None, positions: Positions = "all",
                        op: Op = "add", value: float = 0.0, max_new_tokens: int = 64,
                        chat: bool | None = None, batch_size: int = 16,
                        progress: bool = False) -> list[Completion]:
    """Greedy completions of every prompt at every coefficient, one row per (prompt, coef).

    Rows that share a prompt length run in one batch (no padding), each row with its own
    coefficient, so coefficient 0 is exactly the unsteered model. Without a vector every coef
    must be 0. Results come back in (prompt, coef) order.
    """
    if vector is None and any(c != 0 for c in coefs):
        raise ValueError("a nonzero coefficient needs a vector")
    texts = variant_completions(model, prompts, [(vector, float(c)) for c in coefs],
                                layers=layers, positions=positions, op=op, value=value,
                                max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size,
                                progress=progress)
    return [Completion(p, float(c), texts[k][i]) for i, p in enumerate(prompts)
            for k, c in enumerate(coefs)]
