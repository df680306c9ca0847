"""The yes/no judge's arithmetic on a tiny model, checked against unbatched forward passes."""

from __future__ import annotations

import math

import pytest
import torch

from avec.evaluate.judge import YesNoJudge, pairwise_accuracy

QUESTIONS = ["Is the sky green?", "Why?", "Say hi."]
ANSWERS = ["Yes, it is.", "Because it is late and dark outside.", "hi"]


def _logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model.hf(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), -1)


def test_single_token_answers_read_the_next_token(tiny_llama):
    judge = YesNoJudge(tiny_llama, "Is the answer true?", yes="Y", no="N", batch_size=2)
    verdicts = judge.verdicts(QUESTIONS, ANSWERS)
    y, n = (tiny_llama.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in "YN")
    for q, a, v in zip(QUESTIONS, ANSWERS, verdicts):
        lp = _logprobs(tiny_llama, tiny_llama.encode([judge.prompt(q, a)])[0])[-1]
        p_yes, p_no = float(lp[y].exp()), float(lp[n].exp())
        assert v.score == pytest.approx(p_yes / (p_yes + p_no), abs=1e-4)
        assert v.mass == pytest.approx(p_yes + p_no, abs=1e-5)
        assert 0 < v.score < 1


def test_multi_token_answers_score_the_whole_word(tiny_llama):
    judge = YesNoJudge(tiny_llama, "Is the answer true?", batch_size=3)  # "Yes" / "No": bytes
    verdicts = judge.verdicts(QUESTIONS, ANSWERS)
    tok = tiny_llama.tokenizer
    yes, no = (tok(w, add_special_tokens=False)["input_ids"] for w in ("Yes", "No"))
    assert len(yes) == 3 and len(no) == 2
    for q, a, v in zip(QUESTIONS, ANSWERS, verdicts):
        prompt = tiny_llama.encode([judge.prompt(q, a)])[0]

        def word_logprob(word: list[int]) -> float:
            lp = _logprobs(tiny_llama, prompt + word)
            return sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(word))

        diff = word_logprob(yes) - word_logprob(no)
        assert v.score == pytest.approx(1 / (1 + math.exp(-diff)), abs=1e-4)
        first = _logprobs(tiny_llama, prompt)[-1]
        assert v.mass == pytest.approx(float(first[yes[0]].exp() + first[no[0]].exp()), abs=1e-5)


def test_the_prompt_holds_question_answer_and_rubric(tiny_llama):
    judge = YesNoJudge(tiny_llama, "  Does it refuse?  ")
    text = judge.prompt("  Q?", "A.  ")
    assert "Question: Q?\n\nAnswer: A.\n\nDoes it refuse?" in text
    assert text != tiny_llama.chat_prompt("x")  # chat-formatted, not empty


def test_bad_input_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="rubric"):
        YesNoJudge(tiny_llama, "  ")
    with pytest.raises(ValueError, match="different"):
        YesNoJudge(tiny_llama, "ok?", yes="No", no="No")
    with pytest.raises(ValueError, match="2 questions but 1 answers"):
        YesNoJudge(tiny_llama, "ok?").verdicts(["a", "b"], ["c"])
    assert YesNoJudge(tiny_llama, "ok?").verdicts([], []) == []


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy([0.9, 0.2, 0.5], [0.1, 0.3, 0.5]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pairwise_accuracy([0.1], [])
