"""Turning contrast pairs into the exact texts the model reads."""

from __future__ import annotations

from avec.data.pairs import ContrastPair
from avec.models.model import Model


def join_prompt(prompt: str, completion: str) -> str:
    """Plain concatenation with one space between words when neither side has whitespace."""
    if not prompt or prompt[-1].isspace() or completion[:1].isspace():
        return prompt + completion
    return prompt + " " + completion


def pair_texts(pairs: list[ContrastPair], model: Model | None = None, *,
               chat: bool = False) -> tuple[list[str], list[str]]:
    """The positive and negative texts of ``pairs``.

    Without ``chat`` the texts are used as given (``prompt`` joined to each side when present).
    With ``chat`` (needs a model with a chat template) a pair with a prompt becomes the user turn
    followed by the assistant's reply (the positive or negative text, left open so the last
    token is the reply's last token); a pair without a prompt becomes a user turn ending at
    the assistant's generation prompt.
    """
    if chat:
        if model is None or not model.has_chat_template:
            name = model.name if model is not None else "no model"
            raise ValueError(f"chat templating was asked for but {name} has no chat template; "
                             f"drop --chat (or chat=True) for this model")

        def render(prompt: str | None, text: str) -> str:
            assert model is not None
            return model.chat_prompt(prompt, text) if prompt is not None else model.chat_prompt(text)
    else:
        def render(prompt: str | None, text: str) -> str:
            return join_prompt(prompt, text) if prompt is not None else text

    return ([render(p.prompt, p.positive) for p in pairs],
            [render(p.prompt, p.negative) for p in pairs])
