"""Stop strings: where a completion's text ends, and how much of a streamed text to hold back."""

from __future__ import annotations

from typing import Sequence


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the earliest stop string in it, and whether one was
    found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def held_back(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string (so a
    stream must not send them yet): the longest suffix that is a proper prefix of one."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def streamable(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The part of a partial completion ``text`` that can be streamed now, and whether a stop
    string ended it."""
    cut, hit = cut_at_stop(text, stops)
    if hit:
        return cut, True
    return cut[:len(cut) - held_back(cut, stops)], False
