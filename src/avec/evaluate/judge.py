"""A yes/no judge: how likely an instruction-tuned model is to answer "Yes" to a rubric question
about a (question, answer) pair.

The judge shows the model the question, the answer and the rubric as one user turn and reads
the next token: the score is ``p(Yes) / (p(Yes) + p(No))``, a number in (0, 1) rather than a
sampled verdict, so small shifts across steering strengths show. When ``Yes`` or ``No`` is not
one token for the tokenizer, each word's whole sequence is scored instead (one more pass each).
``mass`` is ``p(Yes) + p(No)`` of the first token: near 1 when the judge follows the format.

A small judge is weak: check it on answers whose label is known before reading its scores
(``experiments/caa_open_ended.py`` does, on the A/B answer texts of each behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from avec.evaluate.forward import tail_logits
from avec.models.model import Model

TEMPLATE = ("Read the question and the answer below, then answer the last question with Yes "
            "or No only.\n\nQuestion: {question}\n\nAnswer: {answer}\n\n{rubric}")


@dataclass(frozen=True)
class Verdict:
    """``score``: p(Yes) / (p(Yes) + p(No)); ``mass``: p(Yes) + p(No) at the first token."""

    score: float
    mass: float


@dataclass(frozen=True)
class YesNoJudge:
    """``rubric``: a question about the answer whose "Yes" means the behaviour is present."""

    model: Model
    rubric: str
    yes: str = "Yes"
    no: str = "No"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.rubric.strip():
            raise ValueError("the judge needs a rubric question")
        if self.yes == self.no or not self.yes or not self.no:
            raise ValueError("the judge's two answers must be different non-empty words")

    def prompt(self, question: str, answer: str) -> str:
        """The judge's full prompt (chat-formatted when the model has a template)."""
        return self.model.chat_prompt(TEMPLATE.format(question=question.strip(),
                                                      answer=answer.strip(),
                                                      rubric=self.rubric.strip()))

    def _word_ids(self, word: str) -> list[int]:
        ids = self.model.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{word!r} encodes to no tokens for {self.model.name}")
        return [int(i) for i in ids]

    def _tail_logprobs(self, seqs: list[list[int]], keep: int) -> list[torch.Tensor]:
        """log-softmax of the last ``keep`` positions' logits of each sequence."""
        return [torch.log_softmax(t, -1)
                for t in tail_logits(self.model, seqs, keep, self.batch_size)]

    def verdicts(self, questions: Sequence[str], answers: Sequence[str]) -> list[Verdict]:
        """One verdict per (question, answer) pair."""
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        if not questions:
            return []
        prompts = [self.model.encode([self.prompt(q, a)])[0]
                   for q, a in zip(questions, answers)]
        yes, no = self._word_ids(self.yes), self._word_ids(self.no)
        first = self._tail_logprobs(prompts, 1)
        mass = [float(lp[0, yes[0]].exp() + lp[0, no[0]].exp()) if yes[0] != no[0]
                else float(lp[0, yes[0]].exp()) for lp in first]
        if len(yes) == 1 and len(no) == 1:
            lp_yes = [float(lp[0, yes[0]]) for lp in first]
            lp_no = [float(lp[0, no[0]]) for lp in first]
        else:
            lp_yes, lp_no = self._sequence_logprob(prompts, yes), self._sequence_logprob(prompts, no)
        return [Verdict(float(torch.sigmoid(torch.tensor(y - n))), m)
                for y, n, m in zip(lp_yes, lp_no, mass)]

    def scores(self, questions: Sequence[str], answers: Sequence[str]) -> list[float]:
        return [v.score for v in self.verdicts(questions, answers)]

    def _sequence_logprob(self, prompts: list[list[int]], word: list[int]) -> list[float]:
        """log p(word's tokens | prompt) for each prompt, by teacher forcing."""
        tails = self._tail_logprobs([p + word for p in prompts], len(word) + 1)
        return [float(sum(lp[k, t] for k, t in enumerate(word))) for lp in tails]


def pairwise_accuracy(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Fraction of items whose positive answer scores above its negative one (ties count half):
    how often the judge ranks a known pair the right way round."""
    if len(positive) != len(negative) or not positive:
        raise ValueError("pairwise accuracy needs two non-empty lists of the same length")
    return sum(1.0 if p > n else 0.5 if p == n else 0.0
               for p, n in zip(positive, negative)) / len(positive)
