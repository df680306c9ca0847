"""Contrast data loaders: formats, templating and errors naming file and line."""

from __future__ import annotations

import json

import pytest
import torch

from avec.data import (ContrastPair, load_ab_pairs, load_jsonl_pairs, load_pairs, load_prompts,
                       pair_texts, save_jsonl_pairs)
from avec.data.demo import DEMO_PAIRS
from avec.errors import DataError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_jsonl_round_trip(tmp_path):
    pairs = [ContrastPair("I love it", "I hate it"), ContrastPair("yes", "no")]
    path = tmp_path / "p.jsonl"
    save_jsonl_pairs(pairs, path)
    assert load_pairs(path) == pairs
    with_prompt = [ContrastPair("sure", "no way", prompt="Help me?")]
    save_jsonl_pairs(with_prompt, path)
    assert load_jsonl_pairs(path) == with_prompt


@pytest.mark.parametrize("body, line, msg", [
    ('{"positive": "a", "negative": "b"}\n{"positive": "a"}\n', 2, "missing key 'negative'"),
    ('{"positive": "a", "negative": "b"}\n\n{"positive": "", "negative": "b"}', 3,
     "'positive' is empty"),
    ('{"positive": "a", "negative": "b"}\n{"positive": "a", negative: "b"}\n', 2, "invalid JSON"),
    ('{"positive": "a", "negative": 3}\n', 1, "must be a string"),
    ('{"positive": "same", "negative": "same"}\n', 1, "identical"),
    ('["a", "b"]\n', 1, "expected an object"),
    ('{"positive": "a", "negative": "b", "prompt": "p"}\n{"positive": "a", "negative": "b"}\n',
     2, "prompt"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, body, line, msg):
    path = write(tmp_path, "bad.jsonl", body)
    with pytest.raises(DataError, match=msg) as err:
        load_jsonl_pairs(path)
    assert f"bad.jsonl:{line}:" in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no pairs"):
        load_jsonl_pairs(write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "nope.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match="not UTF-8"):
        load_pairs(tmp_path / "bin.jsonl")


def ab_item(letter="A"):
    other = "B" if letter == "A" else "A"
    return {"question": "Is it?\n\nChoices:\n(A) Yes\n(B) No",
            "answer_matching_behavior": f"({letter})", "answer_not_matching_behavior": f"({other})"}


def test_ab_loader(tmp_path, shared_data):
    pairs = load_ab_pairs(shared_data / "caa" / "refusal" / "generate_dataset.json")
    assert len(pairs) == 408
    assert pairs[0].prompt.startswith("What is your favorite hobby?")
    assert pairs[0].positive == "(A)" and pairs[0].negative == "(B)"
    path = write(tmp_path, "ab.json", json.dumps([ab_item("A"), ab_item("B")]))
    assert [p.positive for p in load_pairs(path)] == ["(A)", "(B)"]


@pytest.mark.parametrize("items, msg", [
    ([ab_item(), {"question": "q", "answer_matching_behavior": "(A)"}], "item 1: missing key"),
    ([ab_item(), {**ab_item(), "question": "  "}], "item 1: 'question' is empty"),
    ([{**ab_item(), "answer_matching_behavior": "Yes"}], "letter in parentheses"),
    ([{**ab_item(), "answer_not_matching_behavior": "(A)"}], "identical"),
    ([ab_item("A") for _ in range(12)], "unbalanced A/B data: \\(A\\) is the matching answer in 12"),
    ({"question": "q"}, "non-empty JSON list"),
])
def test_ab_errors(tmp_path, items, msg):
    path = write(tmp_path, "ab.json", json.dumps(items))
    with pytest.raises(DataError, match=msg):
        load_ab_pairs(path)


def test_ab_invalid_json_names_line(tmp_path):
    path = write(tmp_path, "ab.json", '[\n{"question": "q",\n "x": }\n]')
    with pytest.raises(DataError, match=r"ab.json:3: invalid JSON"):
        load_ab_pairs(path)


def test_prompt_files(tmp_path):
    assert load_prompts(write(tmp_path, "p.txt", "one\n\n two \n")) == ["one", "two"]
    assert load_prompts(write(tmp_path, "p.json", '["a", {"question": "b"}]')) == ["a", "b"]
    assert load_prompts(write(tmp_path, "p.jsonl", '"a"\n{"instruction": "b"}\n')) == ["a", "b"]
    with pytest.raises(DataError, match=r"p2.json: item 1: no prompt key"):
        load_prompts(write(tmp_path, "p2.json", '["a", {"x": "b"}]'))
    with pytest.raises(DataError, match=r"p2.jsonl:2: invalid JSON"):
        load_prompts(write(tmp_path, "p2.jsonl", '"a"\n{oops\n'))
    with pytest.raises(DataError, match="no prompts"):
        load_prompts(write(tmp_path, "e.txt", "\n"))


def test_pair_texts(tiny_llama):
    pairs = [ContrastPair("(A)", "(B)", prompt="Q?"), ContrastPair("Yes", "No", prompt="Q2 ")]
    pos, neg = pair_texts(pairs)
    assert pos == ["Q? (A)", "Q2 Yes"] and neg == ["Q? (B)", "Q2 No"]
    pos, neg = pair_texts(pairs, tiny_llama, chat=True)
    assert pos[0] == "<|user|>Q?\n<|assistant|>(A)" and neg[1] == "<|user|>Q2 \n<|assistant|>No"
    plain, _ = pair_texts([ContrastPair("love", "hate")], tiny_llama, chat=True)
    assert plain == ["<|user|>love\n<|assistant|>"]
    from conftest import make_tiny

    with pytest.raises(ValueError, match="no chat template"):
        pair_texts(pairs, make_tiny("gpt2", chat=False), chat=True)


def test_demo_pairs_are_valid():
    assert len(DEMO_PAIRS) >= 32
    assert len({p.positive for p in DEMO_PAIRS}) == len(DEMO_PAIRS)
    for p in DEMO_PAIRS:
        assert p.positive.split()[:3] == p.negative.split()[:3]  # shared frame


def test_synthetic_cleaning():
    from avec.generation.synthetic import acceptable, first_sentence

    assert first_sentence('"The sea is wide." And more text.') == "The sea is wide."
    assert first_sentence("no end here") == "no end here"
    assert acceptable("The sea is wide and deep.")
    assert not acceptable("Too short.")
    assert not acceptable("I'm sorry, I cannot write that.")
    assert not acceptable("Here is a sentence about the sea.")
    assert not acceptable("The sea is wide and deep")  # unfinished


def test_sentence_end_stops_a_row_after_its_first_sentence(tiny_llama):
    """The stopping criterion of synthetic pair generation: an end mark then white space."""
    from avec.generation.synthetic import SentenceEnd

    tok = tiny_llama.tokenizer
    prompt = tok("Q:", add_special_tokens=False)["input_ids"]
    rows = [prompt + tok(t, add_special_tokens=False)["input_ids"]
            for t in ("Hi. Then", "Hi.Then!", "3.5 and.", "Why? ok!")]  # 8 bytes each
    stop = SentenceEnd(tiny_llama, len(prompt))
    done = stop(torch.tensor(rows), None)
    assert done.tolist() == [True, False, False, True]
    assert not stop(torch.tensor([prompt + rows[0][len(prompt):][:1]]), None).any()


def test_generate_pairs_is_seeded(tiny_llama, monkeypatch):
    """Same seed, same pairs; another seed, other pairs (filtering relaxed: a random model)."""
    import avec.generation.synthetic as synthetic

    monkeypatch.setattr(synthetic, "acceptable", lambda sentence: bool(sentence))
    run = lambda seed: [g.pair for g in synthetic.generate_pairs(  # noqa: E731
        tiny_llama, "the sea", 3, seed=seed, max_new_tokens=6, batch_size=4)]
    first = run(1)
    assert len(first) == 3 and first == run(1) and first != run(2)
    toned = synthetic.generate_pairs(tiny_llama, "love", 2, contrast="hatred", max_new_tokens=6,
                                     batch_size=4)
    assert {g.negative_topic for g in toned} == {"hatred"}
    with pytest.raises(ValueError, match="contrast concept must not be empty"):
        synthetic.generate_pairs(tiny_llama, "love", 2, contrast=" ")
