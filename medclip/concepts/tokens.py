"""Token-level helpers: annotator spans onto token positions, and the content tokens of concept names.

Span mapping is the training loader's own (``medclip.data.text.SpanTokenizer``), so the positions an
annotation gets here are exactly the ones PC-Align trains on (position 0 = start token).
"""

from __future__ import annotations

from collections.abc import Sequence

from medclip.errors import MedclipError


def char_to_token_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """[(token_start, token_end)] (end exclusive, start token at 0) for character spans of ``text``;
    None for a span lost to truncation."""
    from medclip.data.text import CharSpan, SpanTokenizer

    for start, end in spans:
        if not 0 <= start < end <= len(text):
            raise MedclipError(f"span ({start}, {end}) is outside the caption of {len(text)} characters")
    return SpanTokenizer(tokenizer)(text, [CharSpan(s, e) for s, e in spans]).spans


def name_token_mask(token_ids, pad_id: int):
    """[N, L] bool: the content tokens of tokenized concept names (not start, end or padding)."""
    import torch

    valid = token_ids != pad_id
    lengths = valid.sum(dim=1)
    positions = torch.arange(token_ids.shape[1], device=token_ids.device).expand_as(token_ids)
    return (positions >= 1) & (positions < (lengths - 1).unsqueeze(1)) & valid


def pad_token_id(tokenizer) -> int:
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and getattr(hf, "pad_token_id", None) is not None:
        return int(hf.pad_token_id)
    return 0  # open_clip's SimpleTokenizer pads with 0
