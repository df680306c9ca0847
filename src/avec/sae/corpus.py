"""Text corpora for training SAEs, and their per-token activations at one layer.

A corpus is a list of texts: read from files (:func:`load_texts`) or written by the model
itself (:func:`sample_corpus`, seeded). :func:`collect_activations` turns it into the rows an
SAE is trained on: the output of decoder block L (avec's layer L) at every real token of every
text, except the first ``skip_first`` tokens of each text (the first position is an attention
sink whose activation norm dwarfs the others'; an SAE trained on it spends latents on it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from os.path import commonprefix
from pathlib import Path

import torch
from tqdm.auto import tqdm

from avec.directions.activations import layer_outputs
from avec.generation.hf import RowSampling, format_prompt, generate_ids
from avec.models.model import Model
from avec.sae.model import SAEError

OPENERS: tuple[str, ...] = (
    "The history of the printing press begins",
    "Once upon a time, in a village at the edge of a forest,",
    "To make a good loaf of bread, you",
    "The main difference between a virus and a bacterium is",
    "Dear Sam, thank you for your letter.",
    "In 1969, the first humans",
    "def fibonacci(n):",
    "The weather forecast for tomorrow:",
    "She opened the door and saw",
    "Photosynthesis is the process by which",
    "Breaking news: the city council voted",
    "My favourite memory from childhood is",
    "The rules of chess are simple:",
    "import numpy as np\n",
    "Ingredients: 2 cups of flour,",
    "The stock market fell sharply today after",
    "Q: Why is the sky blue?\nA:",
    "The old lighthouse keeper",
    "Chapter 1\n\nIt was a cold morning when",
    "According to the latest research on sleep,",
)
"""Plain-text openings the model continues as written (no chat template)."""

INSTRUCTIONS: tuple[str, ...] = (
    "Write a short poem about the ocean.",
    "Explain how a bicycle works to a child.",
    "Give me three tips for learning a new language.",
    "What are the causes of inflation?",
    "Tell me a joke about cats.",
    "Summarize the plot of Romeo and Juliet.",
    "How do I sort a list in Python?",
    "Describe your ideal weekend.",
    "What should I pack for a camping trip?",
    "Write a polite email declining a meeting.",
    "Why do leaves change colour in autumn?",
    "Suggest a name for a coffee shop.",
    "What is the capital of Australia, and why was it chosen?",
    "Write a haiku about winter.",
    "How can I be more productive at work?",
    "Explain the difference between weather and climate.",
    "What are some healthy breakfast ideas?",
    "Write a short story about a robot who learns to paint.",
    "How does the internet work?",
    "Give me a recipe for a simple tomato soup.",
)
"""User requests, chat-templated when the model has a template (see :func:`sample_corpus`)."""

SEED_PROMPTS: tuple[str, ...] = OPENERS + INSTRUCTIONS


def load_texts(paths: Sequence[str | Path]) -> list[str]:
    """Texts from files: ``.txt`` (and any other suffix) split at blank lines, one document per
    paragraph (so a document may span several lines); ``.json``/``.jsonl`` read by
    :func:`avec.data.load_prompts` (strings, or objects with ``prompt``, ``question``,
    ``instruction`` or ``text``). The same rules as ``avec top-examples --texts``."""
    from avec.evaluate.top_examples import load_corpus

    return load_corpus(paths)


def _row_seed(seed: int, index: int) -> int:
    """A distinct generator seed for row ``index`` of a corpus sampled with ``seed``."""
    return (seed % 2**31) * 2**32 + index


def sample_corpus(model: Model, n_texts: int, max_new_tokens: int = 128, seed: int = 0,
                  prompts: Sequence[str] | None = None, *, temperature: float = 1.0,
                  chat: bool | None = None, batch_size: int = 16,
                  progress: bool = False) -> list[str]:
    """``n_texts`` texts written by the model itself: a seed prompt plus a sampled continuation.

    Text ``i`` continues prompt ``order[i % len(order)]``, where ``order`` is the prompt list
    shuffled with ``seed`` (default: :data:`SEED_PROMPTS`; :data:`OPENERS` are always continued
    as plain text, every other prompt is a user message, chat-templated when ``chat`` is true
    or, for ``None``, when the model has a template). Tokens are drawn from
    ``softmax(logits / temperature)`` with a generator of the row's own (seeded from ``seed``
    and ``i``), so the same seed, model and ``batch_size`` give the same texts. A text is the
    exact prompt string the model read (template included) followed by the decoded
    continuation, cut at end-of-sequence.
    """
    if n_texts < 1 or max_new_tokens < 1 or batch_size < 1:
        raise SAEError(f"sample_corpus needs n_texts, max_new_tokens and batch_size >= 1, got "
                       f"{n_texts}, {max_new_tokens}, {batch_size}")
    pool = list(prompts) if prompts is not None else list(SEED_PROMPTS)
    if not pool or not all(isinstance(p, str) and p.strip() for p in pool):
        raise SAEError("sample_corpus needs at least one non-empty prompt")
    order = pool[:]
    random.Random(seed).shuffle(order)
    chosen = [order[i % len(order)] for i in range(n_texts)]
    heads: list[str] = []
    encoded: list[list[int]] = []
    for prompt in chosen:
        if prompt in OPENERS:
            ids, templated = format_prompt(model, prompt, chat=False)
        else:
            ids, templated = format_prompt(model, prompt, chat)
        heads.append(model.chat_prompt(prompt) if templated else prompt)
        encoded.append(ids)
    texts: list[str] = []
    starts = range(0, n_texts, batch_size)
    for start in tqdm(starts, desc="sample corpus", disable=not progress, leave=False):
        rows = range(start, min(start + batch_size, n_texts))
        sampling = [RowSampling(temperature, torch.Generator().manual_seed(_row_seed(seed, i)))
                    for i in rows]
        new = generate_ids(model, [encoded[i] for i in rows], max_new_tokens,
                           row_sampling=sampling)
        for i, toks in zip(rows, new):
            texts.append(heads[i] + model.tokenizer.decode(toks, skip_special_tokens=True))
    return texts


def template_skips(model: Model, texts: Sequence[str], default: int = 1) -> list[int]:
    """Tokens to skip per text: the chat template's shared head (system prompt and the user
    turn's opening, the same tokens in every chat-templated text, so identical activations
    that would crowd a training set) for texts that start with it, else ``default``."""
    if not model.has_chat_template:
        return [default] * len(texts)
    head = commonprefix([model.chat_prompt("a"), model.chat_prompt("b")])
    if not head:
        return [default] * len(texts)
    n_head = max(default, len(model.encode([head])[0]))
    return [n_head if t.startswith(head) else default for t in texts]


@torch.no_grad()
def collect_activations(model: Model, texts: Sequence[str], layer: int, max_tokens: int = 128,
                        batch_size: int = 16, skip_first: int | Sequence[int] = 1,
                        progress: bool = False) -> torch.Tensor:
    """Block ``layer``'s output at every real token of ``texts``: ``[N_tokens, d_model]``,
    float32 on the CPU.

    Rows come text by text in input order, each text's tokens in order, from token
    ``skip_first`` (one number, or one per text, e.g. :func:`template_skips`) to the last of
    its first ``max_tokens`` tokens (texts with no tokens past their skip contribute nothing).
    Padding and batching do not change the rows beyond float tolerance.
    """
    skips = [skip_first] * len(texts) if isinstance(skip_first, int) else list(skip_first)
    if len(skips) != len(texts) or any(k < 0 for k in skips):
        raise SAEError(f"skip_first must be >= 0, one number or one per text ({len(texts)}), "
                       f"got {skip_first}")
    parts: dict[int, torch.Tensor] = {}
    for i, _ids, hidden in layer_outputs(model, texts, layer, max_tokens=max_tokens,
                                         batch_size=batch_size, progress=progress):
        parts[i] = hidden[skips[i]:].float().cpu()
    rows = [parts[i] for i in sorted(parts) if parts[i].shape[0]]
    if not rows:
        raise SAEError(f"no tokens to read: the {len(texts)} text(s) have no tokens after the "
                       f"skipped ones ({skip_first}); pass longer texts or a smaller skip_first")
    return torch.cat(rows)
