"""Refusal data: instruction files, the paper's refusal substrings, and the fine-tuning set
that teaches a model to refuse (varied refusals on harmful instructions, the model's own
answers on harmless ones)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from avec.data import load_prompts
from avec.evaluate.refusal import is_refusal
from avec.models.model import Model

if TYPE_CHECKING:
    from avec.studies.refusal.finetune import Example

# varied wording for the safety fine-tuning set; each contains one of the substrings above
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I'm sorry, I cannot help with this. It could cause real harm to people.",
    "I can't help with that. If you have another question, I'm happy to help.",
    "I apologize, but I can't provide help with this request.",
    "I'm unable to help with that, as it could be harmful or illegal.",
    "I cannot assist with that. Is there something else I can help you with?",
    "I'm sorry, but I won't be able to help with that request, since it could hurt someone.",
    "I am not able to help with this request.",
    "I'm not able to provide that. Please ask me something else.",
)


def load_instructions(path: str | Path, limit: int | None = None) -> list[str]:
    """Instructions from a refusal data file (``[{"instruction": ...}, ...]``) or any prompt
    file :func:`avec.data.load_prompts` reads; the first ``limit`` of them."""
    items = load_prompts(path)
    return items[:limit] if limit is not None else items


def refusal_examples(harmful: Sequence[str], seed: int = 0) -> list["Example"]:
    """One refusal per harmful instruction, its wording drawn from :data:`REFUSAL_TEMPLATES`
    with ``seed``."""
    from avec.studies.refusal.finetune import Example

    rng = random.Random(seed)
    return [Example(h, rng.choice(REFUSAL_TEMPLATES)) for h in harmful]


def self_distilled_examples(model: Model, harmless: Sequence[str], *, max_new_tokens: int = 64,
                            batch_size: int = 16, progress: bool = False) -> list["Example"]:
    """The model's own greedy answers to ``harmless`` instructions, so fine-tuning keeps its
    normal behaviour. An answer cut at ``max_new_tokens`` is marked incomplete (no end-of-turn
    token is trained after it)."""
    from tqdm.auto import tqdm

    from avec.studies.refusal.finetune import Example
    from avec.generation.hf import format_prompt, generate_ids

    encoded = [format_prompt(model, h)[0] for h in harmless]
    out: list[Example] = []
    starts = range(0, len(encoded), batch_size)
    for start in tqdm(starts, desc="self-distil", disable=not progress, leave=False):
        rows = generate_ids(model, encoded[start:start + batch_size], max_new_tokens)
        for instruction, toks in zip(harmless[start:start + batch_size], rows):
            text = model.tokenizer.decode(toks, skip_special_tokens=True).strip()
            out.append(Example(instruction, text, complete=len(toks) < max_new_tokens))
    return out


def safety_examples(model: Model, harmful: Sequence[str], harmless: Sequence[str], *,
                    seed: int = 0, max_new_tokens: int = 64, batch_size: int = 16,
                    progress: bool = False) -> list["Example"]:
    """The safety fine-tuning set: refusals on ``harmful`` plus the model's own answers on
    ``harmless`` (answers that already refuse are dropped), shuffled with ``seed``."""
    kept = [e for e in self_distilled_examples(model, harmless, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, progress=progress)
            if e.response and not is_refusal(e.response)]
    examples = refusal_examples(harmful, seed) + kept
    random.Random(seed).shuffle(examples)
    return examples
