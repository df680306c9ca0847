"""The model's context length, and refusing texts that do not fit it before any forward pass.

A 20,000-token text given to a model that reads 8,192 positions does not fail cleanly: the
attention masks alone ask for gigabytes. Every path that runs the model on texts counts their
tokens first and raises :class:`~avec.errors.DataError` naming the text (its file and line when
known) and the limit.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from avec.errors import DataError

_CONFIG_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def context_length(model: Any) -> int | None:
    """Positions the model can read (prompt plus generated tokens), or None when unknown."""
    n_ctx = getattr(type(model), "n_ctx", None)
    if n_ctx is not None:  # llama.cpp: the context it was loaded with
        return int(model.n_ctx)
    cfg = getattr(model, "config", None)
    for key in _CONFIG_KEYS:
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def snippet(text: str, n: int = 40) -> str:
    """The start of a text, for error messages."""
    flat = " ".join(text[: n * 4].split())
    return repr(flat[:n] + ("..." if len(flat) > n else ""))


def check_lengths(model: Any, lengths: Sequence[int], label: Callable[[int], str], *,
                  reserve: int = 0, reserve_for: str = "generated tokens") -> None:
    """Raise :class:`DataError` for the first ``lengths[i]`` (tokens of text ``i``) that does not
    fit the model's context with ``reserve`` positions left over; ``label(i)`` names the text."""
    limit = context_length(model)
    if limit is None:
        return
    room = limit - reserve
    for i, n in enumerate(lengths):
        if n > room:
            kept = f" and {reserve:,} are kept for {reserve_for}" if reserve else ""
            raise DataError(f"{label(i)} is {n:,} tokens but {model.name} reads at most "
                            f"{limit:,} positions{kept}; shorten the text"
                            + (f" or ask for fewer {reserve_for}" if reserve else ""))


def check_texts(model: Any, texts: Sequence[str], token_lists: Sequence[Sequence[int]], *,
                reserve: int = 0, reserve_for: str = "generated tokens",
                sources: Sequence[str | None] | None = None) -> None:
    """:func:`check_lengths` for tokenized ``texts``; ``sources[i]`` (e.g. ``"file:line"``)
    names text ``i`` when given, else its index and first words."""
    def label(i: int) -> str:
        where = sources[i] if sources is not None and i < len(sources) else None
        return f"{where}: the text" if where else \
            f"text {i + 1} of {len(texts)} ({snippet(texts[i])})"

    check_lengths(model, [len(t) for t in token_lists], label, reserve=reserve,
                  reserve_for=reserve_for)
