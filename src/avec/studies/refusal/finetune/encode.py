"""From an example to training tokens: the chat template's assistant turn, labels on the
response only, batches, and the response-only loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from avec.models.model import Model, eos_token_ids
from avec.studies.refusal.finetune.examples import IGNORE_INDEX, Example, FinetuneError

_SENTINEL_USER = "Hello."
_SENTINEL_RESPONSE = "AVEC_RESPONSE_SENTINEL_7f3a"


@dataclass(frozen=True)
class TurnFormat:
    """How the chat template renders an assistant turn after the generation prompt:
    ``before`` + response + ``end`` (``end`` is the end-of-turn text, e.g. ``<|im_end|>\\n``).
    For a model without a template, ``end`` is empty and the end-of-sequence token id
    ``eos_id`` is appended instead."""

    chat: bool
    before: str = ""
    end: str = ""
    eos_id: int | None = None


def turn_format(model: Model) -> TurnFormat:
    """Find what the chat template puts around an assistant response, by rendering
    ``[user, assistant]`` with a sentinel response and taking what follows the generation
    prompt (so the target matches what the template produces)."""
    if not model.has_chat_template:
        eos = model.tokenizer.eos_token_id
        if eos is None:
            ids = sorted(eos_token_ids(model))
            eos = ids[0] if ids else None
        return TurnFormat(chat=False, eos_id=eos)
    prompt = model.chat_prompt(_SENTINEL_USER)
    try:
        full = model.tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL_USER},
             {"role": "assistant", "content": _SENTINEL_RESPONSE}], tokenize=False)
    except Exception as exc:  # jinja raises many types
        raise FinetuneError(f"the chat template of {model.name} cannot render a user turn "
                            f"followed by an assistant turn: {exc}") from exc
    if not isinstance(full, str) or not full.startswith(prompt):
        raise FinetuneError(
            f"the chat template of {model.name} renders a conversation that does not start "
            f"with its generation prompt, so responses cannot be appended to the prompt "
            f"(prompt {prompt!r}, conversation {full!r})")
    rest = full[len(prompt):]
    at = rest.find(_SENTINEL_RESPONSE)
    if at < 0:
        raise FinetuneError(f"the chat template of {model.name} does not render the assistant "
                            f"message verbatim: {rest!r}")
    return TurnFormat(chat=True, before=rest[:at], end=rest[at + len(_SENTINEL_RESPONSE):])


@dataclass
class EncodedExample:
    """Token ids of one example and its labels (``-100`` on the prompt)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_example(model: Model, example: Example, max_length: int | None = None,
                   fmt: TurnFormat | None = None) -> EncodedExample:
    """Tokenize ``prompt + target``, labelling target tokens only.

    The prompt ids are those generation uses (see :func:`avec.generation.hf.format_prompt`).
    The target is tokenized together with the prompt when the prompt's tokens are a prefix of
    the joint tokenization (the usual case: the ids then equal those of the templated
    conversation), else on its own. Complete examples end with the end-of-turn text (chat) or
    the end-of-sequence token (no template). Truncated to ``max_length`` tokens from the end.
    """
    fmt = fmt or turn_format(model)
    tok = model.tokenizer
    if fmt.chat:
        prompt_text = model.chat_prompt(example.instruction)
        target_text = fmt.before + example.response + (fmt.end if example.complete else "")
        prompt_ids = _ids(tok, prompt_text, False)
        joint = _ids(tok, prompt_text + target_text, False)
        separate = (lambda: _ids(tok, target_text, False))
        tail: list[int] = []
    else:
        prompt_ids = _ids(tok, example.instruction, True)
        joint = _ids(tok, example.instruction + example.response, True)
        separate = (lambda: _ids(tok, example.response, False))
        if example.complete and fmt.eos_id is None:
            raise FinetuneError(f"{model.name} has no chat template and no end-of-sequence "
                                f"token, so a complete response cannot be marked as finished; "
                                f"mark the examples complete=False")
        tail = [fmt.eos_id] if example.complete and fmt.eos_id is not None else []
    if len(joint) > len(prompt_ids) and joint[:len(prompt_ids)] == prompt_ids:
        target_ids = joint[len(prompt_ids):]
    else:
        target_ids = separate()
    target_ids = target_ids + tail
    ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedExample(ids, labels, truncated)


def collate(batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def response_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over labelled positions, and their count."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n = int((shift_labels != IGNORE_INDEX).sum())
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(n, 1), n


# ---------------------------------------------------------------------------------- training
