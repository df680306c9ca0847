"""What ``avec tune`` maximises (a behaviour :class:`Score`) and what it keeps within a budget (a
side effect, :class:`Budget`), each measured for many settings at once.

A setting is a *variant* ``(vector, coef)``: ``vector`` holds the directions of the layer (or
band of layers) it steers, already split across the band, and every variant of one call runs in
shared batches with its own per-row coefficient. ``(None, 0.0)`` is the unsteered model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from avec.evaluate.ab import ABItem, ab_variants
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.evaluate.refusal import is_refusal
from avec.evaluate.side_effects import (kl_divergence, logit_difference, perplexity,
                                        reference_logprobs)
from avec.generation.hf import variant_completions
from avec.models.model import Model
from avec.vector import SteeringVector

Variant = tuple[SteeringVector | None, float]


def _groups(variants: Sequence[Variant]) -> dict[int, tuple[SteeringVector | None, list[int]]]:
    """Variants by vector (``id``), so each vector's coefficients share one call."""
    out: dict[int, tuple[SteeringVector | None, list[int]]] = {}
    for i, (vec, _c) in enumerate(variants):
        out.setdefault(id(vec), (vec, []))[1].append(i)
    return out


def per_vector(variants: Sequence[Variant],
               measure: Callable[[SteeringVector | None, list[float]], Sequence[Any]]
               ) -> list[Any]:
    """``measure(vector, coefs)`` once per distinct vector; one result per variant, in order."""
    out: list[Any] = [None] * len(variants)
    for vec, idx in _groups(variants).values():
        coefs = [variants[i][1] if vec is not None else 0.0 for i in idx]
        for i, value in zip(idx, measure(vec, coefs)):
            out[i] = value
    return out


# ---- behaviour scores -----------------------------------------------------------------------

class Score(ABC):
    """A behaviour score, higher is better, averaged over items (prompts or A/B items) that
    :func:`avec.tuning.tune` splits into held-in and held-out ones."""

    name: str = "score"
    generates: bool = False  # True: each variant costs a generation per item

    @property
    @abstractmethod
    def n_items(self) -> int: ...

    @abstractmethod
    def per_item(self, model: Model, variants: Sequence[Variant], items: Sequence[int]
                 ) -> torch.Tensor:
        """``[len(variants), len(items)]`` scores of the chosen items under each variant."""

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "items": self.n_items}


@dataclass
class GenerationScore(Score):
    """Scores greedy completions of ``prompts``; subclasses judge each text. Prompts of
    different lengths share left-padded batches (see
    :func:`avec.generation.hf.variant_completions`), which is what makes scoring many
    settings cheap. The last texts generated for each variant are kept in ``samples``."""

    prompts: Sequence[str] = ()
    max_new_tokens: int = 32
    chat: bool | None = None
    samples: dict[tuple[int, float], list[str]] = field(default_factory=dict)
    generates = True

    @property
    def n_items(self) -> int:
        return len(self.prompts)

    def judge(self, texts: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def per_item(self, model: Model, variants: Sequence[Variant], items: Sequence[int]
                 ) -> torch.Tensor:
        prompts = [self.prompts[i] for i in items]
        texts = variant_completions(model, prompts, list(variants), layers=None,
                                    max_new_tokens=self.max_new_tokens, chat=self.chat,
                                    pad=True)
        for (vec, coef), row in zip(variants, texts):
            self.samples[(id(vec), coef)] = row
        return torch.tensor([self.judge(row) for row in texts], dtype=torch.float64)

    def texts(self, model: Model, variant: Variant, items: Sequence[int]) -> list[str]:
        """Completions of the chosen prompts under one variant."""
        self.per_item(model, [variant], items)
        return self.samples[(id(variant[0]), variant[1])]


@dataclass
class KeywordScore(GenerationScore):
    """1 for a completion that contains one of ``keywords`` (case-insensitive, word start)."""

    keywords: Sequence[str] = ()
    name = "keywords"

    def judge(self, texts: Sequence[str]) -> list[float]:
        return [keyword_rate([t], self.keywords) for t in texts]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "keywords": list(self.keywords)}


@dataclass
class ConceptScore(GenerationScore):
    """Cosine similarity of each completion to ``concept`` (the offline embedding judge)."""

    concept: str = ""
    judge_model: EmbeddingJudge = field(default_factory=EmbeddingJudge)
    name = "concept"

    def judge(self, texts: Sequence[str]) -> list[float]:
        return self.judge_model.scores(texts, self.concept)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "concept": self.concept}


@dataclass
class RefusalScore(GenerationScore):
    """1 for a completion that refuses (avec's refusal-substring check)."""

    name = "refusal"

    def judge(self, texts: Sequence[str]) -> list[float]:
        return [float(is_refusal(t)) for t in texts]


@dataclass
class ABScore(Score):
    """A/B p(match): the probability of the answer letter showing the behaviour (no
    generation: one forward pass per item and setting)."""

    items: Sequence[ABItem] = ()
    chat: bool = True
    name = "ab"

    @property
    def n_items(self) -> int:
        return len(self.items)

    def per_item(self, model: Model, variants: Sequence[Variant], items: Sequence[int]
                 ) -> torch.Tensor:
        chosen = [self.items[i] for i in items]

        def measure(vec: SteeringVector | None, coefs: list[float]) -> list[torch.Tensor]:
            if vec is None:
                out = ab_variants(model, chosen, [(None, None)], [0.0], chat=self.chat)
                return [out[0, 0]] * len(coefs)
            out = ab_variants(model, chosen, [(vec, vec.layers)], coefs, chat=self.chat)
            return list(out[0])

        return torch.stack(per_vector(variants, measure)).double()


@dataclass
class LogitDiffScore(Score):
    """logit(a) - logit(b) at the next token after each prompt, averaged over token pairs."""

    prompts: Sequence[str] = ()
    token_pairs: Sequence[tuple[str, str]] = ()
    chat: bool | None = None
    name = "logit_diff"

    @property
    def n_items(self) -> int:
        return len(self.prompts)

    def per_item(self, model: Model, variants: Sequence[Variant], items: Sequence[int]
                 ) -> torch.Tensor:
        rows = []
        for i in items:  # one prompt at a time: logit_difference averages over its prompts
            def measure(vec: SteeringVector | None, coefs: list[float], i: int = i) -> list:
                return logit_difference(model, [self.prompts[i]], self.token_pairs, vec,
                                        vec.layers if vec is not None else None, coefs,
                                        chat=self.chat)
            rows.append(per_vector(variants, measure))
        return torch.tensor(rows, dtype=torch.float64).T


@dataclass
class FunctionScore(Score):
    """A score computed from the setting alone, ``fn(layers, coef) -> float`` per item, and
    ``baseline`` for the unsteered model (for tests and for scores measured outside avec)."""

    fn: Callable[[tuple[int, ...], float], float] = lambda layers, coef: 0.0
    items: int = 8
    baseline: float = 0.0
    name = "function"

    @property
    def n_items(self) -> int:
        return self.items

    def per_item(self, model: Model, variants: Sequence[Variant], items: Sequence[int]
                 ) -> torch.Tensor:
        return torch.tensor([[self.baseline if v is None else self.fn(tuple(v.layers), c)]
                             * len(items) for v, c in variants], dtype=torch.float64)


# ---- side-effect budgets --------------------------------------------------------------------

class Budget(ABC):
    """A side effect that must stay at or below ``limit``; 0 for the unsteered model."""

    name: str = "budget"
    limit: float = 1.0

    @abstractmethod
    def measure(self, model: Model, variants: Sequence[Variant]) -> list[float]:
        """The side effect of each variant."""

    def describe(self) -> dict[str, Any]:
        return {"metric": self.name, "max": self.limit}


@dataclass
class KLBudget(Budget):
    """Mean KL(unsteered || steered) of the next token after each neutral prompt (as Arditi et
    al. and ``avec compare`` measure it)."""

    prompts: Sequence[str] = ()
    limit: float = 1.0
    chat: bool | None = None
    name = "kl"
    _reference: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def measure(self, model: Model, variants: Sequence[Variant]) -> list[float]:
        if self._reference is None:
            self._reference = reference_logprobs(model, self.prompts, chat=self.chat)

        def kl(vec: SteeringVector | None, coefs: list[float]) -> list[float]:
            if vec is None:
                return [0.0] * len(coefs)
            return kl_divergence(model, self.prompts, vec, vec.layers, coefs, chat=self.chat,
                                 reference=self._reference)

        return per_vector(variants, kl)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prompts": len(self.prompts)}


@dataclass
class PerplexityBudget(Budget):
    """Perplexity of reference ``texts`` under the steered model over the unsteered one, minus
    1 (so ``limit=0.2`` allows 20% more perplexity)."""

    texts: Sequence[str] = ()
    limit: float = 0.2
    name = "ppl_ratio"
    _base: float | None = field(default=None, init=False, repr=False)

    def measure(self, model: Model, variants: Sequence[Variant]) -> list[float]:
        if self._base is None:
            self._base = perplexity(model, self.texts, None, None, [0.0])[0]

        def ratio(vec: SteeringVector | None, coefs: list[float]) -> list[float]:
            if vec is None:
                return [0.0] * len(coefs)
            return [p / self._base - 1.0 for p in perplexity(model, self.texts, vec,
                                                              vec.layers, coefs)]

        return per_vector(variants, ratio)


@dataclass
class MMLUBudget(Budget):
    """The drop in mean p(correct answer) on capability A/B items (MMLU, TruthfulQA)."""

    items: Sequence[ABItem] = ()
    limit: float = 0.05
    chat: bool = True
    name = "mmlu_drop"
    _base: float | None = field(default=None, init=False, repr=False)

    def measure(self, model: Model, variants: Sequence[Variant]) -> list[float]:
        if self._base is None:
            self._base = float(ab_variants(model, self.items, [(None, None)], [0.0],
                                           chat=self.chat).mean())

        def drop(vec: SteeringVector | None, coefs: list[float]) -> list[float]:
            if vec is None:
                return [0.0] * len(coefs)
            scores = ab_variants(model, self.items, [(vec, vec.layers)], coefs, chat=self.chat)
            return [self._base - float(s) for s in scores[0].mean(-1)]

        return per_vector(variants, drop)


@dataclass
class FunctionBudget(Budget):
    """A side effect computed from the setting alone, ``fn(layers, coef)`` (for tests)."""

    fn: Callable[[tuple[int, ...], float], float] = lambda layers, coef: 0.0
    limit: float = 1.0
    name = "function"
    calls: list[tuple[tuple[int, ...], float]] = field(default_factory=list)

    def measure(self, model: Model, variants: Sequence[Variant]) -> list[float]:
        out = []
        for v, c in variants:
            layers = tuple(v.layers) if v is not None else ()
            self.calls.append((layers, c))
            out.append(self.fn(layers, c) if v is not None else 0.0)
        return out


__all__ = ["ABScore", "Budget", "ConceptScore", "FunctionBudget", "FunctionScore",
           "GenerationScore", "KLBudget", "KeywordScore", "LogitDiffScore", "MMLUBudget",
           "PerplexityBudget", "RefusalScore", "Score", "Variant"]
