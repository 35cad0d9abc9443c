"""Long captions: a window of whole sentences that fits the text context, drawn per visit.

The tokenizer truncates a caption longer than the text context (77 tokens for open_clip's BPE models) at
its end, so the end of long radiologist reports and clinical notes, and the concepts annotated there, are
never trained on (a run counts them as ``concept_dropped``). With ``data.long_captions: window`` a caption
that does not fit is cut to a run of consecutive sentences that does, starting at a sentence drawn
uniformly, from the sample's seeded RNG (replayed exactly after a resume). The concepts inside the window
move with it; those outside are dropped and counted. With ``data.long_captions: concepts`` the window is
drawn among those that keep the most of the caption's concept spans (PC-Align's targets), so a drawn start
does not throw away the concepts a report names in its first sentences. A caption that fits is left as it
is, and so is one whose every sentence is too long on its own (the tokenizer truncates it as before).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable

from medclip.errors import MedclipError

# head: truncated at the end, as open_clip's tokenizers do; window: a fitting window drawn uniformly;
# concepts: drawn among the fitting windows that keep the most concept spans.
LONG_CAPTION_RULES = ("head", "window", "concepts")

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


def _span(concept: dict) -> tuple[int, int] | None:
    try:
        return int(concept["start"]), int(concept["end"])
    except (KeyError, TypeError, ValueError):
        return None


def most_concepts(windows: list[tuple[int, int]], bounds: list[tuple[int, int]], concepts: list[dict]):
    """The windows (sentence ranges) holding the most whole concept spans."""
    spans = [s for s in map(_span, concepts) if s is not None]
    counts = [sum(bounds[first][0] <= a and b <= bounds[last - 1][1] for a, b in spans) for first, last in windows]
    most = max(counts)
    return [w for w, n in zip(windows, counts) if n == most]


def caption_window(rng: random.Random, caption: str, concepts: list[dict], count_tokens: Callable[[str], int],
                   budget: int, skips: Counter, keep_concepts: bool = False) -> tuple[str, list[dict]]:
    """``caption`` and its ``concepts``, cut to a window of whole sentences of at most ``budget`` tokens
    (``keep_concepts``: one of the windows that keep the most concepts)."""
    if count_tokens(caption) <= budget:
        return caption, concepts
    bounds = sentence_bounds(caption)
    windows = fitting_windows([count_tokens(caption[a:b]) for a, b in bounds], budget)
    if not windows:
        return caption, concepts
    if keep_concepts:
        windows = most_concepts(windows, bounds, concepts)
    first, last = windows[rng.randrange(len(windows))]
    start, end = bounds[first][0], bounds[last - 1][1]
    kept = []
    for concept in concepts:
        span = _span(concept)
        if span is None:
            kept.append(concept)  # malformed: tokenize_with_concepts counts it
            continue
        a, b = span
        if start <= a and b <= end:
            kept.append({**concept, "start": a - start, "end": b - start})
        else:
            skips["concept_dropped"] += 1
    return caption[start:end], kept
