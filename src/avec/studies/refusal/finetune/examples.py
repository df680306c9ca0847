"""Training examples (instruction, response) and their JSONL files; the error type of
fine-tuning."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence


from avec.errors import AvecError, DataError


IGNORE_INDEX = -100


class FinetuneError(AvecError, RuntimeError):
    """Fine-tuning could not run (template, data or numerical problem); the message says why."""


# ---------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """One instruction/response pair.

    Attributes:
        instruction: the user's message.
        response: the assistant's answer (trained on).
        complete: ``False`` when the response was cut off (e.g. a truncated self-distilled
            answer): then no end-of-turn token is trained after it, so the model does not learn
            to stop mid-sentence.
    """

    instruction: str
    response: str
    complete: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise DataError(f"instruction must be a non-empty string, got {self.instruction!r}")
        if not isinstance(self.response, str):
            raise DataError(f"response must be a string, got {type(self.response).__name__}")
        if not isinstance(self.complete, bool):
            raise DataError(f"complete must be true or false, got {self.complete!r}")
        if not self.response and not self.complete:
            raise DataError("an incomplete example with an empty response has nothing to train")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _example_from_obj(obj: Any, where: str) -> Example:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction' and 'response', "
                        f"got {type(obj).__name__}")
    if "instruction" in obj and "prompt" in obj:
        raise DataError(f"{where}: give either 'instruction' or 'prompt', not both")
    key = "instruction" if "instruction" in obj else "prompt"
    for k in (key, "response"):
        if k not in obj:
            name = "'instruction' (or 'prompt')" if k == "prompt" else repr(k)
            raise DataError(f"{where}: missing key {name} (keys present: {sorted(obj)})")
        if not isinstance(obj[k], str):
            raise DataError(f"{where}: {k!r} must be a string, got {type(obj[k]).__name__}")
    complete = obj.get("complete", True)
    if not isinstance(complete, bool):
        raise DataError(f"{where}: 'complete' must be true or false, got {complete!r}")
    try:
        return Example(obj[key], obj["response"], complete)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def load_examples(path: str | Path) -> list[Example]:
    """Read instruction/response pairs from JSON Lines.

    Each non-empty line is an object with ``instruction`` (or ``prompt``) and ``response``
    strings and an optional boolean ``complete`` (default true). Errors name file and line.
    """
    from avec.data.pairs import iter_jsonl

    path = Path(path)
    examples = [_example_from_obj(obj, where) for where, obj in iter_jsonl(path)]
    if not examples:
        raise DataError(f"{path}: no examples found (expected one JSON object per line with "
                        f"'instruction' and 'response')")
    return examples


def save_examples(examples: Sequence[Example], path: str | Path) -> Path:
    """Write examples as JSON Lines (``complete`` only when false); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for ex in examples:
            obj: dict[str, Any] = {"instruction": ex.instruction, "response": ex.response}
            if not ex.complete:
                obj["complete"] = False
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
    return path


# ------------------------------------------------------------------------------------ config
