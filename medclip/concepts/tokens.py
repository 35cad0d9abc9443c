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


def pad_token_id(tokenizer) -> int:
    """The id ``tokenizer`` (an open_clip tokenizer: BPE, HF, SigLIP's) pads with.

    Read from what it writes rather than from attributes, which differ between tokenizer kinds:
    the empty text at a context of 3 is start (or end) token, end token, then padding.
    """
    ids = tokenizer([""], context_length=3)
    return int(ids[0, -1])


def name_token_mask(token_ids, pad_id: int):
    """[N, L] bool: the content tokens of tokenized concept names, i.e. strictly between the start
    token (position 0) and the end token (the last position that is not padding).

    Padding only trails the end token, so an id equal to ``pad_id`` before it is a real token
    (open_clip's BPE gives "!" the id 0 it also pads with). A name cut at the context length
    keeps its end token at the last position.
    """
    import torch

    positions = torch.arange(token_ids.shape[1], device=token_ids.device)
    end = torch.where(token_ids != pad_id, positions, 0).amax(dim=1, keepdim=True)
    return (positions > 0) & (positions < end)


def embed_names(model, heads, token_ids, pad_id: int):
    """[N, D] PC-Align embeddings (not normalized) of concept names tokenized like captions.

    The one path from a name to the concept head, shared by training (``use_concept_names``) and
    queries (``ConceptScorer``), so the heads are queried the way they were trained: the mean of the
    name's content-token states, then the concept head, as a caption span is pooled in training.
    """
    from medclip.models import towers

    _, states = towers.text_tokens(model, token_ids)
    return heads.embed_names(states, name_token_mask(token_ids, pad_id).to(states.dtype))
