"""Long captions: a window of whole sentences that fits the text context, drawn per visit.

The tokenizer truncates a caption longer than the text context (77 tokens for open_clip's BPE models) at
its end, so the end of long radiologist reports and clinical notes, and the concepts annotated there, are
never trained on (a run counts them as ``concept_dropped``). With ``data.long_captions: window`` a caption
that does not fit is cut to a run of consecutive sentences that does, starting at a sentence drawn
uniformly, from the sample's seeded RNG (replayed exactly after a resume). The concepts inside the window
move with it; those outside are dropped and counted. A caption that fits is left as it is, and so is one
whose every sentence is too long on its own (the tokenizer truncates it as before).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

from medclip.errors import MedclipError

LONG_CAPTION_RULES = ("head", "window")  # head: truncated at the end, as open_clip's tokenizers do

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")


def check_long_captions(rule: str, name: str = "long_captions") -> None:
    if rule not in LONG_CAPTION_RULES:
        raise MedclipError(f"{name} must be one of {', '.join(LONG_CAPTION_RULES)}, got {rule!r}")


def sentence_bounds(text: str) -> list[tuple[int, int]]:
    """(start, end) character range of each sentence, split after . ! ? ; and whitespace."""
    bounds, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        bounds.append((start, match.start()))
        start = match.end()
    if start < len(text):
        bounds.append((start, len(text)))
    return [(a, b) for a, b in bounds if b > a]


def fitting_windows(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """For each first sentence that fits alone: (first, last + 1), the longest run from it within budget."""
    windows = []
    for first in range(len(lengths)):
        total, last = 0, first
        while last < len(lengths) and total + lengths[last] <= budget:
            total += lengths[last]
            last += 1
        if last > first:
            windows.append((first, last))
    return windows


def caption_window(rng: random.Random, caption: str, concepts: list[dict], count_tokens: Callable[[str], int],
                   budget: int, skips: Counter) -> tuple[str, list[dict]]:
    """``caption`` and its ``concepts``, cut to a window of whole sentences of at most ``budget`` tokens."""
    if count_tokens(caption) <= budget:
        return caption, concepts
    bounds = sentence_bounds(caption)
    windows = fitting_windows([count_tokens(caption[a:b]) for a, b in bounds], budget)
    if not windows:
        return caption, concepts
    first, last = windows[rng.randrange(len(windows))]
    start, end = bounds[first][0], bounds[last - 1][1]
    kept = []
    for concept in concepts:
        try:
            a, b = int(concept["start"]), int(concept["end"])
        except (KeyError, TypeError, ValueError):
            kept.append(concept)  # malformed: tokenize_with_concepts counts it
            continue
        if start <= a and b <= end:
            kept.append({**concept, "start": a - start, "end": b - start})
        else:
            skips["concept_dropped"] += 1
    return caption[start:end], kept
