"""Character spans of concept mentions -> token positions of the model's tokenizer.

The training batch contract puts concept spans in the positions of the tokenized caption
(position 0 = start token). Mentions from the annotator start and end on word boundaries, and
both of open_clip's tokenizers (BPE SimpleTokenizer, HF WordPiece) split words independently, so
the tokens before a span are exactly the tokens of the text before it: token_start = 1 +
len(tokens(text[:start])) and likewise for the end. This avoids relying on offset mappings, which
open_clip's text cleaning (whitespace collapsing) would invalidate.
"""

from __future__ import annotations

from collections.abc import Sequence

from medclip.errors import MedclipError


def plain_token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without start/end tokens, cleaned as the tokenizer cleans full captions."""
    hf = getattr(tokenizer, "tokenizer", None)
    if hf is not None and callable(hf):  # open_clip HFTokenizer
        text = tokenizer.clean_fn(text) if hasattr(tokenizer, "clean_fn") else text
        return list(hf(text, add_special_tokens=False)["input_ids"])
    if hasattr(tokenizer, "encode"):  # open_clip SimpleTokenizer (BPE)
        return list(tokenizer.encode(text))
    raise MedclipError(f"cannot map spans onto tokens of a {type(tokenizer).__name__}")


def context_length(tokenizer) -> int:
    length = getattr(tokenizer, "context_length", None)
    if not length:
        raise MedclipError(f"{type(tokenizer).__name__} has no context_length")
    return int(length)


def char_to_token_spans(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int] | None]:
    """[(token_start, token_end)] (end exclusive, start token at 0) for character spans of ``text``.

    A span cut by truncation is shortened to the last content position; a span starting past it
    (or empty) gives None.
    """
    last_content = context_length(tokenizer) - 1  # the final position holds the end token
    cache: dict[int, int] = {}

    def position(char: int) -> int:
        if char not in cache:
            cache[char] = 1 + len(plain_token_ids(tokenizer, text[:char]))
        return cache[char]

    out: list[tuple[int, int] | None] = []
    for start, end in spans:
        if not 0 <= start < end <= len(text):
            raise MedclipError(f"span ({start}, {end}) is outside the caption of {len(text)} characters")
        t_start, t_end = position(start), min(position(end), last_content)
        out.append((t_start, t_end) if t_start < t_end else None)
    return out


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
