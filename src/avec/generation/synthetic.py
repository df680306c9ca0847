"""Synthetic contrast pairs: an instruct model writes matched sentences for a concept.

Each pair comes from one template and one suggested opening word: the positive is the model's
sentence about the concept, the negative its sentence about a neutral everyday topic (or about a
contrast concept, for behaviours such as tone) from the same template and opening, so the pair
differs mainly in the concept (small models do not always follow the opening word; that is not
required). Sampling is seeded. Outputs are cut to their first sentence; empty, too short or too
long sentences, refusals, sentences that echo the instruction, and duplicates are dropped. Every
line of the output file records the model that wrote it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from avec.data.pairs import ContrastPair
from avec.generation.hf import format_prompt, generate_ids
from avec.models.model import Model

TEMPLATES = (
    "Write one sentence about {topic}. Begin with \"{opener}\".",
    "In a single sentence, describe {topic}. Start your sentence with \"{opener}\".",
    "Write a short, vivid sentence about {topic} that begins with \"{opener}\".",
    "Tell me one interesting thing about {topic} in one sentence starting with \"{opener}\".",
)
OPENERS = ("I", "The", "My", "Yesterday", "Every", "When", "Our", "She", "He", "In",
           "Sometimes", "Last", "There", "We", "People", "This")
NEUTRAL_TOPICS = (
    "office paperwork", "a bus timetable", "filing taxes", "a kitchen table", "grocery shopping",
    "a parking lot", "spreadsheets", "a printer", "doing laundry", "a bank queue",
    "a weekly meeting", "a hardware store", "commuting to work", "a filing cabinet",
    "a pencil sharpener", "an empty hallway", "a software update", "a delivery schedule",
    "an insurance form", "a staircase", "a light switch", "cardboard boxes", "a plain wall",
    "a calendar", "an elevator", "a stapler", "a desk lamp", "a train station",
)
DEFAULT_TEMPERATURE = 0.8
REFUSALS = ("i'm sorry", "i am sorry", "as an ai", "i cannot", "i can't", "sentence")


class SentenceEnd:
    """Stopping criterion: a row is done once it has finished its first sentence (a token that
    ends in ``.``, ``!`` or ``?`` followed by a token that starts with white space), so a batch
    of one-sentence answers stops long before ``max_new_tokens``."""

    def __init__(self, model: Model, prompt_len: int) -> None:
        tok = model.tokenizer
        size = max(len(tok), int(getattr(model.hf.config, "vocab_size", 0) or 0))
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        self.ends = torch.zeros(size, dtype=torch.bool)
        self.space = torch.zeros(size, dtype=torch.bool)
        for i, t in enumerate(texts):
            self.ends[i] = t.rstrip()[-1:] in (".", "!", "?")
            self.space[i] = t[:1].isspace()
        self.prompt_len = prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len:].cpu()
        if new.shape[1] < 2:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        done = (self.ends[new[:, :-1]] & self.space[new[:, 1:]]).any(-1)
        return done.to(input_ids.device)


@dataclass(frozen=True)
class GeneratedPair:
    pair: ContrastPair
    template: str
    opener: str
    negative_topic: str  # a neutral everyday topic, or the contrast concept


def first_sentence(text: str) -> str:
    text = " ".join(text.replace('"', " ").split())
    match = re.search(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text).strip()


def acceptable(sentence: str) -> bool:
    """A complete sentence of 4-60 words that is not a refusal or an echo of the instruction."""
    words = sentence.split()
    low = sentence.lower()
    return 4 <= len(words) <= 60 and sentence[-1:] in ".!?" and not any(r in low for r in REFUSALS)


def generate_pairs(model: Model, concept: str, n: int, *, contrast: str | None = None,
                   seed: int = 0, temperature: float = DEFAULT_TEMPERATURE,
                   max_new_tokens: int = 48, batch_size: int = 16, max_attempts: int | None = None,
                   progress: bool = False) -> list[GeneratedPair]:
    """Up to ``n`` pairs for ``concept``; stops after ``max_attempts`` candidates (default 4n).

    The negative of a pair is about a random neutral everyday topic, or about ``contrast`` when
    given (an opposite concept: "hatred and anger" against "love and kindness"), written from
    the same template and opening.
    """
    if not concept.strip():
        raise ValueError("the concept must not be empty")
    if contrast is not None and not contrast.strip():
        raise ValueError("the contrast concept must not be empty")
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = random.Random(seed)
    attempts = max_attempts or 4 * n
    kept: list[GeneratedPair] = []
    seen: set[str] = set()
    bar = tqdm(total=n, desc="pairs", disable=not progress, leave=False)
    stop: SentenceEnd | None = None
    for start in range(0, attempts, batch_size):
        jobs = [(rng.choice(TEMPLATES), rng.choice(OPENERS),
                 contrast if contrast is not None else rng.choice(NEUTRAL_TOPICS))
                for _ in range(min(batch_size, attempts - start))]
        prompts = [t.format(topic=concept, opener=o) for t, o, _u in jobs]
        prompts += [t.format(topic=u, opener=o) for t, o, u in jobs]
        ids = [format_prompt(model, p)[0] for p in prompts]
        if stop is None:
            stop = SentenceEnd(model, 0)
        stop.prompt_len = max(len(x) for x in ids)  # generate_ids left-pads to the longest
        outs = generate_ids(model, ids, max_new_tokens, temperature=temperature,
                            seed=seed * 1_000_003 + start, stopping_criteria=[stop])
        texts = [first_sentence(model.tokenizer.decode(o, skip_special_tokens=True)) for o in outs]
        for k, (template, opener, topic) in enumerate(jobs):
            pos, neg = texts[k], texts[k + len(jobs)]
            key = pos.lower()
            if pos == neg or key in seen or not acceptable(pos) or not acceptable(neg):
                continue
            seen.add(key)
            kept.append(GeneratedPair(ContrastPair(pos, neg), template, opener, topic))
            bar.update(1)
            if len(kept) == n:
                bar.close()
                return kept
    bar.close()
    return kept


def save_generated(pairs: list[GeneratedPair], path: str | Path, concept: str,
                   generator: dict[str, Any], contrast: str | None = None) -> None:
    """JSON lines readable by ``load_pairs``; each line also records concept and generator."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for g in pairs:
            fh.write(json.dumps({"positive": g.pair.positive, "negative": g.pair.negative,
                                 "concept": concept, "template": g.template, "opener": g.opener,
                                 "negative_topic": g.negative_topic,
                                 **({"contrast": contrast} if contrast is not None else {}),
                                 "generator": generator},
                                ensure_ascii=False) + "\n")
