"""Greedy generation, plain or steered, with one coefficient per batch row."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from avec.directions.activations import pad_batch
from avec.models.model import Model, cache_kwarg, eos_token_ids, keep_logits, output_cache
from avec.intervene.conditions import Condition
from avec.intervene.steer import Intervention, Op, Positions, steer
from avec.vector import SteeringVector


RowStop = Callable[[torch.Tensor], torch.Tensor]
"""``row_stop(usable) -> stop``: called before each step's tokens are chosen, with ``usable``, a
``[B]`` bool tensor (the row's logits are all finite, and so are they divided by the row's
temperature when it samples); returns a ``[B]`` bool tensor of the rows to end now (a row once
ended stays ended)."""


@dataclass(frozen=True)
class Completion:
    prompt: str
    coef: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def format_prompt(model: Model, prompt: str, chat: bool | None = None) -> tuple[list[int], bool]:
    """Token ids of a prompt, chat-templated when ``chat`` (``None``: if the model has a template)."""
    return model.prompt_ids(prompt, chat)


@torch.inference_mode()
def generate_ids(model: Model, prompt_ids: list[list[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, seed: int = 0, min_new_tokens: int = 0,
                 stopping_criteria: Sequence[Any] = (),
                 on_step: Callable[[torch.Tensor], None] | None = None,
                 row_sampling: Sequence[RowSampling | None] | None = None,
                 row_stop: RowStop | None = None) -> list[list[int]]:
    """Continuation of a batch of token lists (left-padded): greedy, or sampled at
    ``temperature`` > 0 with ``seed`` (the global torch RNG is restored afterwards). Returns new
    tokens only, cut at the first end-of-sequence token. ``stopping_criteria`` are transformers
    ``StoppingCriteria`` (a row they stop is padded with end-of-sequence tokens).
    ``min_new_tokens`` suppresses end-of-sequence until that many tokens exist (benchmarks).
    ``on_step`` (avec's loop only) is called with each step's new token of every row, ``[B]``,
    as soon as it exists (streaming). ``row_sampling`` (avec's loop only) samples some rows:
    one :class:`RowSampling` (temperature and a seeded generator of that row's own) or ``None``
    (greedy) per row, so a row's tokens do not depend on the rest of the batch's randomness.
    ``row_stop`` (avec's loop only) ends rows early, see :func:`decode`.

    Greedy decoding (and per-row sampling) without stopping criteria runs avec's own loop
    (:func:`decode`: the same forward calls as ``model.generate``, without its per-step
    overhead); everything else goes through ``model.generate``.
    """
    eos_ids = eos_token_ids(model)
    input_ids, mask, _ = pad_batch(prompt_ids, model.tokenizer.pad_token_id, "left",
                                   model.device)
    if temperature <= 0 and not stopping_criteria:
        new = decode(model, input_ids, mask, max_new_tokens, min_new_tokens, eos_ids,
                     on_step=on_step, row_sampling=row_sampling, row_stop=row_stop)
    elif on_step is not None or row_sampling is not None or row_stop is not None:
        raise ValueError("on_step, row_sampling and row_stop need temperature 0 (per-row "
                         "sampling replaces it) and no stopping criteria")
    else:
        new = _hf_generate(model, input_ids, mask, max_new_tokens, min_new_tokens,
                           sorted(eos_ids) or None, temperature, seed, stopping_criteria)
    results = []
    for row in new.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        results.append(row[:cut])
    return results


def _hf_generate(model: Model, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
                 min_new_tokens: int, eos: Any, temperature: float, seed: int,
                 stopping_criteria: Sequence[Any]) -> torch.Tensor:
    from transformers import GenerationConfig, StoppingCriteriaList

    sample = temperature > 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                              do_sample=sample, num_beams=1,
                              pad_token_id=model.tokenizer.pad_token_id, eos_token_id=eos,
                              **({"temperature": temperature, "top_k": 0, "top_p": 1.0}
                                 if sample else {}))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.hf.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                stopping_criteria=StoppingCriteriaList(list(stopping_criteria)))
    return out[:, input_ids.shape[1]:]


@dataclass
class RowSampling:
    """Sampling of one batch row: ``softmax(logits / temperature)`` drawn with ``generator``
    (seed it for reproducible text)."""

    temperature: float
    generator: torch.Generator

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 to sample, got {self.temperature}")


def choose_next(logits: torch.Tensor, row_sampling: Sequence[RowSampling | None] | None
                ) -> torch.Tensor:
    """Next token of each row of ``logits`` ``[B, V]``: the argmax, or a draw from
    ``softmax(logits / temperature)`` for the rows ``row_sampling`` samples."""
    nxt = logits.argmax(-1)
    if row_sampling:
        for j, rs in enumerate(row_sampling):
            if rs is not None:
                probs = torch.softmax(logits[j].float() / rs.temperature, dim=-1)
                nxt[j] = torch.multinomial(probs.cpu(), 1, generator=rs.generator).item()
    return nxt


def usable_rows(logits: torch.Tensor, row_sampling: Sequence[RowSampling | None] | None
                ) -> torch.Tensor:
    """``[B]`` bool: the rows of ``logits`` ``[B, V]`` a token can be chosen from: all finite,
    and still finite divided by the row's temperature if it samples (else softmax gives NaN)."""
    usable = torch.isfinite(logits).all(-1)
    for j, rs in enumerate(row_sampling or ()):
        if rs is not None and bool(usable[j]):
            usable[j] = bool(torch.isfinite(logits[j].float() / rs.temperature).all())
    return usable


@torch.inference_mode()
def decode(model: Model, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int,
           min_new_tokens: int = 0, eos_ids: set[int] | frozenset[int] = frozenset(), *,
           on_step: Callable[[torch.Tensor], None] | None = None,
           row_sampling: Sequence[RowSampling | None] | None = None,
           row_stop: RowStop | None = None) -> torch.Tensor:
    """Continuation ``[B, <= max_new_tokens]`` of left-padded ``input_ids``: greedy, or sampled
    for the rows ``row_sampling`` names.

    One prompt pass (logits of the last position only), then one token per step with the KV
    cache, position ids counted over real tokens and the attention mask growing by one column:
    the forward calls ``model.generate`` makes, so steering hooks (and their position tracking)
    see the same inputs and the tokens are the same. End-of-sequence is suppressed for the first
    ``min_new_tokens`` steps; a finished row gets padding; the loop ends when every row has
    finished. ``on_step(tokens)`` sees each step's ``[B]`` new tokens as they are chosen.
    ``row_sampling`` samples the rows that have a :class:`RowSampling` instead of taking the
    argmax. ``row_stop`` (see :data:`RowStop`) ends rows early (a server's cancelled or failed
    rows): an ended row gets padding, its logits are not used (non-finite ones cannot break
    sampling) and the loop ends when every row has ended; the other rows' tokens are unchanged.
    """
    if row_sampling is not None and len(row_sampling) != input_ids.shape[0]:
        raise ValueError(f"{len(row_sampling)} row_sampling entries for a batch of "
                         f"{input_ids.shape[0]} rows")
    if max_new_tokens <= 0:
        return input_ids.new_zeros((input_ids.shape[0], 0))
    hf = model.hf
    cache_name = cache_kwarg(model)
    keep = keep_logits(hf, 1)
    pad = model.tokenizer.pad_token_id
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=input_ids.device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :]
        if row_stop is not None:
            finished |= row_stop(usable_rows(logits, row_sampling)).to(finished.device)
            if bool(finished.all()):
                break
            logits = logits.masked_fill(finished.unsqueeze(-1), 0.0)
        if step < min_new_tokens and eos.numel():
            logits = logits.clone()
            logits[:, eos] = -float("inf")
        nxt = choose_next(logits, row_sampling)
        if pad is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens.append(nxt)
        if on_step is not None:
            on_step(nxt)
        if eos.numel():
            finished |= torch.isin(nxt, eos)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        cache = output_cache(out)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = hf(input_ids=nxt.unsqueeze(1), attention_mask=mask, position_ids=pos,
                 use_cache=True, **{cache_name: cache}, **keep)
    if not tokens:  # row_stop ended every row before the first token
        return input_ids.new_zeros((input_ids.shape[0], 0))
    return torch.stack(tokens, dim=1)


Variant = tuple[SteeringVector | None, float]


def variant_completions(model: Model, prompts: Sequence[str], variants: Sequence[Variant], *,
                        layers: Sequence[int] | None = None, positions: Positions = "all",
                        op: Op = "add", value: float = 0.0, max_new_tokens: int = 64,
                        chat: bool | None = None, batch_size: int = 32,
                        progress: bool = False, pad: bool = False,
                        when: Condition | None = None, per_token: bool = False
                        ) -> list[list[str]]:
    """Greedy completions of every prompt under every variant ``(vector, coef)``: ``[v][p]``.

    Rows of equal prompt length share a batch (no padding) whatever their vector: each distinct
    vector in a batch is one intervention whose per-row coefficient is zero on the other rows,
    which leaves those rows bit-identical. Unsteered variants (no vector, or coefficient 0) are
    generated once per prompt and shared, so many vectors x coefficients cost about as many
    batched passes as rows / ``batch_size``. With ``pad`` rows of different prompt lengths
    share batches too (left-padded): far fewer passes when prompts differ in length, with
    logits equal to the unpadded ones only within float tolerance (a greedy choice between
    near-tied tokens can then differ). ``when`` makes every steered variant conditional (CAST:
    rows whose prompt meets the condition are steered on their generated tokens; the others
    equal the unsteered rows).
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
        by_len[0 if pad else len(encoded[i])].append(r)
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
        interventions = [Intervention(vec, coef=c, layers=layers,
                                      positions="generated" if when is not None else positions,
                                      op=op, value=value, when=when, per_token=per_token)
                         for vec, c in per_vector.values()]
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
                        progress: bool = False, when: Condition | None = None,
                        per_token: bool = False) -> list[Completion]:
    """Greedy completions of every prompt at every coefficient, one row per (prompt, coef).

    Rows that share a prompt length run in one batch (no padding), each row with its own
    coefficient, so coefficient 0 is exactly the unsteered model. Without a vector every coef
    must be 0. Results come back in (prompt, coef) order. ``when``/``per_token``: conditional
    steering (:func:`variant_completions`).
    """
    if vector is None and any(c != 0 for c in coefs):
        raise ValueError("a nonzero coefficient needs a vector")
    texts = variant_completions(model, prompts, [(vector, float(c)) for c in coefs],
                                layers=layers, positions=positions, op=op, value=value,
                                max_new_tokens=max_new_tokens, chat=chat, batch_size=batch_size,
                                progress=progress, when=when, per_token=per_token)
    return [Completion(p, float(c), texts[k][i]) for i, p in enumerate(prompts)
            for k, c in enumerate(coefs)]
