"""Contrast pairs: schema, loaders (JSONL pairs, CAA-style A/B JSON) and validation.

Every error names the file, the line (JSONL) or item (JSON) and what is wrong.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from avec.data.textfile import (check_text, iter_lines, parse_json, parse_json_document,
                                read_text)
from avec.errors import DataError

AB_LETTER = re.compile(r"^\s*\(([A-Za-z])\)")


@dataclass(frozen=True)
class ContrastPair:
    """Two texts that differ in the behaviour or concept to steer.

    ``positive`` and ``negative`` are complete texts, or, when ``prompt`` is set, two
    continuations (assistant replies) of the same prompt (user message). ``source`` says where
    a loaded pair came from (``"file:line"`` or ``"file: item i"``), for error messages; it
    takes no part in comparisons.
    """

    positive: str
    negative: str
    prompt: str | None = None
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for key in ("positive", "negative"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{key!r} must be a non-empty string, got {value!r}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise DataError(f"'prompt' must be a string, got {self.prompt!r}")


def _check_str(obj: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise DataError(f"{where}: missing key {key!r} (keys present: {sorted(obj)[:20]})")
        return None
    return check_text(obj[key], where, key)


def _pair_from_obj(obj: Any, where: str) -> ContrastPair:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected an object with 'positive' and 'negative', "
                        f"got {type(obj).__name__}")
    pos = _check_str(obj, "positive", where)
    neg = _check_str(obj, "negative", where)
    prompt = _check_str(obj, "prompt", where, required=False)
    if pos == neg:
        raise DataError(f"{where}: 'positive' and 'negative' are identical ({pos!r}); a pair "
                        f"must differ in the behaviour to steer")
    return ContrastPair(positive=pos, negative=neg, prompt=prompt,  # type: ignore[arg-type]
                        source=where)


def iter_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """``("file:line", object)`` for each non-empty line of a JSON Lines file; a bad line
    (invalid or too deeply nested JSON, a lone surrogate, over the length cap) raises
    :class:`DataError` naming file and line."""
    path = Path(path)
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        yield where, parse_json(line, where)


def load_jsonl_pairs(path: str | Path) -> list[ContrastPair]:
    """Read ``{"positive": ..., "negative": ..., ["prompt": ...]}`` objects, one per line."""
    path = Path(path)
    pairs: list[ContrastPair] = []
    with_prompt: list[bool] = []
    for where, obj in iter_jsonl(path):
        pairs.append(_pair_from_obj(obj, where))
        with_prompt.append(pairs[-1].prompt is not None)
        if with_prompt[0] != with_prompt[-1]:
            raise DataError(f"{where}: this line {'has' if with_prompt[-1] else 'lacks'} a "
                            f"'prompt' but line(s) before it {'lack' if with_prompt[-1] else 'have'}"
                            f" one; give every pair a prompt or none")
    if not pairs:
        raise DataError(f"{path}: no pairs found (expected one JSON object per line)")
    return pairs


def ab_letter(answer: str) -> str | None:
    """The letter of an A/B answer such as ``"(A)"`` or ``" (B) Yes"``, else None."""
    match = AB_LETTER.match(answer)
    return match.group(1).upper() if match else None


def load_ab_pairs(path: str | Path, *, max_letter_share: float = 0.8) -> list[ContrastPair]:
    """Read CAA-style A/B questions as pairs: prompt = question, positive = matching answer.

    Items are ``{"question", "answer_matching_behavior", "answer_not_matching_behavior"}``.
    The data is refused as unbalanced when one letter is the matching answer for more than
    ``max_letter_share`` of >= 10 items (the vector would learn the letter, not the behaviour).
    """
    path = Path(path)
    items = parse_json_document(path, read_text(path))
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty JSON list of A/B items")
    pairs = []
    letters: Counter[str] = Counter()
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected an object, got {type(item).__name__}")
        question = _check_str(item, "question", where)
        match = _check_str(item, "answer_matching_behavior", where)
        other = _check_str(item, "answer_not_matching_behavior", where)
        if match == other:
            raise DataError(f"{where}: matching and non-matching answers are identical")
        letter = ab_letter(match)  # type: ignore[arg-type]
        if letter is None or ab_letter(other) is None:  # type: ignore[arg-type]
            raise DataError(f"{where}: answers must start with a letter in parentheses, like "
                            f"'(A)'; got {match!r} and {other!r}")
        letters[letter] += 1
        pairs.append(ContrastPair(positive=match, negative=other,  # type: ignore[arg-type]
                                  prompt=question, source=where))
    top, count = letters.most_common(1)[0]
    if len(pairs) >= 10 and count / len(pairs) > max_letter_share:
        raise DataError(
            f"{path}: unbalanced A/B data: ({top}) is the matching answer in {count} of "
            f"{len(pairs)} items; a vector from it would encode the letter. Swap the order of "
            f"choices in some items so both letters match the behaviour about equally often")
    return pairs


def load_pairs(path: str | Path, fmt: str = "auto") -> list[ContrastPair]:
    """Load contrast pairs; ``fmt`` is ``"jsonl"``, ``"ab"`` or ``"auto"`` (by extension)."""
    path = Path(path)
    if fmt == "auto":
        fmt = "ab" if path.suffix == ".json" else "jsonl"
    if fmt == "jsonl":
        return load_jsonl_pairs(path)
    if fmt == "ab":
        return load_ab_pairs(path)
    raise DataError(f"unknown pair format {fmt!r}; use 'jsonl', 'ab' or 'auto'")


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from ``.txt`` (one per non-empty line), ``.json`` (a list) or ``.jsonl``.

    JSON items may be strings or objects with one of the keys ``prompt``, ``question``,
    ``instruction`` or ``text``.
    """
    return [text for _where, text in load_located_prompts(path)]


def load_located_prompts(path: str | Path) -> list[tuple[str, str]]:
    """``(where, prompt)`` pairs as :func:`load_prompts` reads them, ``where`` being
    ``"file:line"`` (``.txt``, ``.jsonl``) or ``"file: item i"`` (``.json``)."""
    path = Path(path)
    if path.suffix == ".txt" or path.suffix == "":
        prompts = [(f"{path}:{n}", check_text(line.strip(), f"{path}:{n}", "prompt"))
                   for n, line in iter_lines(path) if line.strip()]
    elif path.suffix == ".jsonl":
        prompts = [(where, _prompt_of(obj, where)) for where, obj in iter_jsonl(path)]
    elif path.suffix == ".json":
        items = parse_json_document(path, read_text(path))
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of prompts")
        prompts = [(f"{path}: item {i}", _prompt_of(obj, f"{path}: item {i}"))
                   for i, obj in enumerate(items)]
    else:
        raise DataError(f"{path}: unknown prompt file type; use .txt, .json or .jsonl")
    if not prompts:
        raise DataError(f"{path}: no prompts found")
    return prompts


PROMPT_KEYS = ("prompt", "question", "instruction", "text")


def _prompt_of(obj: Any, where: str) -> str:
    if isinstance(obj, str):
        return check_text(obj, where, "prompt")
    if isinstance(obj, dict):
        key = next((k for k in PROMPT_KEYS if k in obj), None)
        if key is None:
            raise DataError(f"{where}: no prompt key; expected one of {list(PROMPT_KEYS)}")
        return check_text(obj[key], where, key)
    raise DataError(f"{where}: expected a string or an object, got {type(obj).__name__}")


def save_jsonl_pairs(pairs: Iterable[ContrastPair], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for p in pairs:
            obj = {"positive": p.positive, "negative": p.negative}
            if p.prompt is not None:
                obj["prompt"] = p.prompt
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
