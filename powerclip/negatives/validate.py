"""One validator for every negative, whatever backend wrote it, with rejects counted by reason.

Why it exists separately: an LLM returns anything (echoes of the caption, empty strings, essays),
and rule rewrites can be no-ops (swapping two identical words). A negative that equals its caption
would be a false negative in the NegCLIP softmax, which actively harms training, so it is dropped
and counted instead of written.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

KINDS = ("reorder", "swap_nouns", "swap_adjectives", "replace_adjectives", "replace_nouns")

# every reason a candidate can be dropped (the report lists all of them, zeros included)
REASONS = ("empty", "same_as_caption", "too_short", "too_long", "duplicate", "unknown_kind",
           "not_applicable", "llm_missing")


@dataclass
class Bounds:
    """Length bounds relative to the caption (in words) and absolute (in characters)."""

    min_words: int = 2
    min_ratio: float = 0.5  # negative words >= ratio * caption words
    max_ratio: float = 2.0  # negative words <= ratio * caption words (+ slack)
    slack_words: int = 3
    max_chars: int = 400


_SPACE = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[\s\"'`.,;:!?]+|[\s\"'`.,;:!?]+$")


def normalise(text: str) -> str:
    """Case, whitespace and edge punctuation do not make a caption different."""
    return _SPACE.sub(" ", _EDGE_PUNCT.sub("", text)).strip().lower()


def check_negative(caption: str, text: str, seen: set[str], bounds: Bounds) -> str | None:
    """The reason to reject ``text`` as a negative of ``caption`` (None: accept).

    ``seen`` holds the normalised negatives already accepted for this caption (duplicates).
    """
    if not isinstance(text, str) or not text.strip():
        return "empty"
    norm = normalise(text)
    if not norm:
        return "empty"
    if norm == normalise(caption):
        return "same_as_caption"
    n_words, c_words = len(norm.split()), max(1, len(normalise(caption).split()))
    if n_words < max(bounds.min_words, int(bounds.min_ratio * c_words)):
        return "too_short"
    if n_words > bounds.max_ratio * c_words + bounds.slack_words or len(text) > bounds.max_chars:
        return "too_long"
    if norm in seen:
        return "duplicate"
    return None


def select_negatives(caption: str, candidates: Iterable[tuple[str, str | None]], k: int, bounds: Bounds,
                     rejects: Counter, rng: random.Random | None = None) -> list[dict]:
    """Up to ``k`` valid negatives ``{"kind", "text"}`` from (kind, text) candidates, in order.

    Candidates are checked in the given order (shuffle first with ``rng`` for a balanced mix of
    kinds); a candidate of None means the backend could not make that kind ("not_applicable").
    Every rejected candidate increments ``rejects[reason]``; candidates after the k-th accepted one
    are not checked (they are not rejects, just unused).
    """
    items = list(candidates)
    if rng is not None:
        rng.shuffle(items)
    out: list[dict] = []
    seen: set[str] = set()
    for kind, text in items:
        if len(out) >= k:
            break
        if kind not in KINDS:
            rejects["unknown_kind"] += 1
            continue
        if text is None:
            rejects["not_applicable"] += 1
            continue
        reason = check_negative(caption, text, seen, bounds)
        if reason is not None:
            rejects[reason] += 1
            continue
        seen.add(normalise(text))
        out.append({"kind": kind, "text": text.strip()})
    return out
