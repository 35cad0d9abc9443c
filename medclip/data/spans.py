"""Concept annotations of the drawn caption -> token spans, concept ids, polarity and name tokens.

A concept is ``{"start", "end", "cui", "negated"?, "name"?, "caption_index"?}`` with character
offsets into its caption. The tokenizer maps them to token positions; a concept that is malformed,
truncated away or on no token is dropped and counted (``concept_dropped``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from medclip.data.concepts import concept_key
from medclip.data.text import CharSpan, SpanTokenizer


@dataclass
class TokenConcepts:
    """The caption's token ids and its concepts that survived tokenization."""

    ids: torch.Tensor
    spans: list[tuple[int, int]] = field(default_factory=list)
    cuis: list[int] = field(default_factory=list)
    positive: list[bool] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


def caption_concepts(meta: dict, concept_field: str, choice: int, max_concepts: int | None) -> list[dict]:
    """The concept dicts of caption ``choice`` (at most ``max_concepts``)."""
    concepts = [c for c in (meta.get(concept_field) or []) if isinstance(c, dict)]
    concepts = [c for c in concepts if int(c.get("caption_index", 0) or 0) == choice]
    return concepts if max_concepts is None else concepts[:max_concepts]


def span_text_slice(concept: dict) -> slice:
    return slice(int(concept["start"]), int(concept["end"]))


def tokenize_with_concepts(tokenizer: SpanTokenizer, caption: str, concepts: list[dict],
                           skips: Counter) -> TokenConcepts:
    """Tokenize ``caption`` and map each concept's characters to its tokens."""
    char_spans, valid = [], []
    for c in concepts:
        try:
            span, cui = CharSpan(int(c["start"]), int(c["end"])), concept_key(c["cui"])
        except (KeyError, TypeError, ValueError):
            skips["concept_dropped"] += 1
            continue
        char_spans.append(span)
        valid.append((c, cui))
    tokenized = tokenizer(caption, char_spans)
    out = TokenConcepts(tokenized.ids)
    for span, (c, cui) in zip(tokenized.spans, valid):
        if span is None:  # truncated away or not on any token
            skips["concept_dropped"] += 1
            continue
        out.spans.append(span)
        out.cuis.append(cui)
        out.positive.append(not c.get("negated", False))
        out.names.append(str(c.get("name") or caption[span_text_slice(c)]))
    return out


class NameTokenizer:
    """Concept names tokenized like captions (start/end tokens), ``length`` tokens each, and the pad id."""

    def __init__(self, tokenizer: SpanTokenizer, length: int):
        self.tokenizer = tokenizer.tokenizer
        self.length = length
        self._pad: int | None = None

    def __call__(self, names: list[str]) -> tuple[torch.Tensor, int]:
        if self._pad is None:
            self._pad = int(self.tokenizer([""], context_length=self.length)[0, -1])  # "" = start, end, padding
        if not names:
            return torch.empty(0, self.length, dtype=torch.long), self._pad
        return self.tokenizer(names, context_length=self.length), self._pad
