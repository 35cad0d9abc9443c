"""Caption tokenization with concept spans mapped from characters to token positions.

open_clip's tokenizers clean the text before tokenizing (ftfy + HTML unescape, whitespace
collapsing, and lower-casing for the BPE tokenizer), so character offsets in the stored caption
do not index the tokenized text. We clean the caption ourselves while keeping a map from every
cleaned character back to the original one, hand the cleaned text to the tokenizer (its own
cleaning is then the identity), and intersect token character ranges with concept spans:

- HF (WordPiece) tokenizers: the fast tokenizer's ``return_offsets_mapping``;
- open_clip's SimpleTokenizer (BPE) has no offsets: its word split and per-word BPE, read through the
  one adapter over its internals (:mod:`medclip.data.openclip_bpe`), give each token's byte length and
  so its characters.

Positions include the start token at position 0, as in the ids open_clip's tokenizer returns.
"""

from __future__ import annotations

import html
import re
from bisect import bisect_left
from dataclasses import dataclass

import ftfy
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from medclip.data.openclip_bpe import OpenClipBPE
from medclip.errors import MedclipError


@dataclass(frozen=True)
class CharSpan:
    start: int
    end: int  # exclusive


@dataclass
class TokenizedCaption:
    ids: torch.Tensor  # long [L]
    spans: list[tuple[int, int] | None]  # per input span: (token start, token end) or None if lost


# ASCII text without these is left unchanged by ftfy.fix_text and html.unescape: ftfy's other fixes
# (mojibake, quotes, ligatures, widths, NFC) only touch non-ASCII characters, and it rewrites line
# breaks, which the whitespace pass collapses anyway. Skipping ftfy there saves most of the cost.
_NEEDS_FIX = re.compile(r"[&\x00-\x08\x0b\x0e-\x1f\x7f]")


def _fix_text(segment: str) -> str:
    # The tokenizer's basic_clean without its final strip (strip is done by the whitespace pass).
    if segment.isascii() and not _NEEDS_FIX.search(segment):
        return segment
    return html.unescape(html.unescape(ftfy.fix_text(segment)))


def clean_with_offsets(text: str, boundaries: list[int], lower: bool) -> tuple[str, list[int]]:
    """Cleaned text and, for each cleaned char, the original char index (plus a final sentinel).

    Text is fixed segment by segment between span ``boundaries`` so that a change of length inside
    one segment cannot shift another span's offsets.
    """
    cuts = sorted({0, len(text), *(b for b in boundaries if 0 <= b <= len(text))})
    chars: list[str] = []
    origin: list[int] = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        seg = text[a:b]
        fixed = _fix_text(seg)
        if fixed == seg:
            chars.extend(seg)
            origin.extend(range(a, b))
        else:  # length may change: every fixed char maps to the segment start (span ends stay exact)
            chars.extend(fixed)
            origin.extend([a] * len(fixed))
    # Collapse whitespace runs to one space and strip, as open_clip's whitespace_clean does.
    out_chars: list[str] = []
    out_origin: list[int] = []
    pending_space = -1
    for ch, o in zip(chars, origin):
        if ch.isspace():
            if out_chars and pending_space < 0:
                pending_space = o
            continue
        if pending_space >= 0:
            out_chars.append(" ")
            out_origin.append(pending_space)
            pending_space = -1
        piece = ch.lower() if lower else ch
        out_chars.extend(piece)
        out_origin.extend([o] * len(piece))
    out_origin.append(len(text))
    return "".join(out_chars), out_origin


def _map_char_span(origin: list[int], span: CharSpan) -> tuple[int, int]:
    """Original char span -> cleaned char span [s, e) (cleaned chars whose origin is inside it).

    ``origin`` never decreases (cleaning keeps the order of characters), so both ends are a bisection.
    """
    start = bisect_left(origin, span.start, 0, len(origin) - 1)
    end = bisect_left(origin, span.end, start, len(origin) - 1)
    return (start, end) if start < end else (0, 0)


WORD_CACHE_SIZE = 200_000  # distinct words whose BPE tokens are kept (captions repeat most words)


class SpanTokenizer:
    """Wraps an open_clip tokenizer (SimpleTokenizer or HFTokenizer) to also map concept spans."""

    def __init__(self, tokenizer, context_length: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = int(context_length or getattr(tokenizer, "context_length", 77) or 77)
        # BPE words seen before: (token ids, (token id, char start, char end) per token)
        self._word_cache: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]] = {}
        self._new_words: dict[str, tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]] = {}
        self.bpe = OpenClipBPE(tokenizer) if isinstance(tokenizer, SimpleTokenizer) else None
        self.kind = "bpe" if self.bpe is not None else "hf" if isinstance(tokenizer, HFTokenizer) else None
        if self.kind is None:
            raise MedclipError(f"unsupported tokenizer for span mapping: {type(tokenizer).__name__}")
        if self.kind == "hf":
            if getattr(tokenizer, "tokenizer_mode", "") or getattr(tokenizer, "strip_sep_token", False):
                raise MedclipError("span mapping supports the standard HF tokenizer mode only")
            if not getattr(tokenizer.tokenizer, "is_fast", False):
                raise MedclipError("span mapping needs a fast HF tokenizer (offset mapping)")

    def __call__(self, text: str, spans: list[CharSpan] = ()) -> TokenizedCaption:
        if not spans:  # fast path: no character bookkeeping needed
            cleaned = " ".join(_fix_text(text).split())
            if self.kind == "bpe":
                return TokenizedCaption(ids=self._bpe(cleaned.lower(), offsets=False)[0], spans=[])
            return TokenizedCaption(ids=self._encode(cleaned)[0], spans=[])
        boundaries = [b for s in spans for b in (s.start, s.end)]
        cleaned, origin = clean_with_offsets(text, boundaries, lower=self.kind == "bpe")
        ids, offsets = self._encode(cleaned)
        out: list[tuple[int, int] | None] = []
        for span in spans:
            cs, ce = _map_char_span(origin, span)
            hit = [i for i, (a, b) in enumerate(offsets) if b > a and a < ce and b > cs]
            out.append((hit[0], hit[-1] + 1) if cs < ce and hit else None)
        return TokenizedCaption(ids=ids, spans=out)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without the start and end tokens, however many the context holds."""
        cleaned = " ".join(_fix_text(text).split())
        if self.kind == "hf":
            return len(self.tokenizer.tokenizer(cleaned, add_special_tokens=False)["input_ids"])
        return sum(len(self._word(word)[0]) for _, word in self.bpe.words(cleaned.lower()))

    def take_new_words(self) -> dict:
        """Word cache entries added since the last call (a loader worker hands them to its parent)."""
        new, self._new_words = self._new_words, {}
        return new

    def add_words(self, words: dict) -> None:
        """Merge entries from :meth:`take_new_words` of a copy of this tokenizer (e.g. in a worker)."""
        for word, cached in words.items():
            if len(self._word_cache) >= WORD_CACHE_SIZE:
                break
            self._word_cache.setdefault(word, cached)

    def _encode(self, cleaned: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        return self._bpe(cleaned) if self.kind == "bpe" else self._hf(cleaned)

    # -- WordPiece through the fast tokenizer's offsets
    def _hf(self, cleaned: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        enc = self.tokenizer.tokenizer(
            cleaned, max_length=self.context_length, padding="max_length", truncation=True,
            return_offsets_mapping=True,
        )
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)
        special = set(self.tokenizer.tokenizer.all_special_ids)
        offsets = [(0, 0) if t in special else (int(a), int(b))
                   for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        return ids, offsets

    # -- BPE: SimpleTokenizer.encode's words and pieces, with character bookkeeping
    def _bpe(self, cleaned: str, offsets: bool = True) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Token ids [context_length] and, with ``offsets``, each token's character range (else [])."""
        ids = [self.bpe.sot_token_id]
        spans = [(0, 0)]
        for start, word in self.bpe.words(cleaned):
            if len(ids) > self.context_length:  # the rest would be truncated anyway
                break
            cached = self._word(word)
            ids.extend(cached[0])
            if offsets:
                spans.extend((start + a, start + b) for _, a, b in cached[1])
        ids.append(self.bpe.eot_token_id)
        if len(ids) > self.context_length:  # truncate like open_clip: keep a final end token
            ids = ids[: self.context_length]
            ids[-1] = self.bpe.eot_token_id
        out = torch.tensor(ids + [0] * (self.context_length - len(ids)), dtype=torch.long)
        if not offsets:
            return out, []
        spans = spans[: len(ids) - 1] + [(0, 0)]  # the end token (kept or moved by truncation) has none
        return out, spans + [(0, 0)] * (self.context_length - len(spans))

    def _word(self, word: str) -> tuple[tuple[int, ...], tuple[tuple[int, int, int], ...]]:
        """(token ids, (token id, char start, char end) per token) of one BPE word, through the cache."""
        cached = self._word_cache.get(word)
        if cached is None:
            pieces = self._bpe_word(word)
            cached = (tuple(p[0] for p in pieces), pieces)
            if len(self._word_cache) < WORD_CACHE_SIZE:
                self._word_cache[word] = self._new_words[word] = cached
        return cached

    def _bpe_word(self, word: str) -> tuple[tuple[int, int, int], ...]:
        """(token id, char start, char end) of each BPE token of one word, offsets within the word."""
        # byte offset -> char offset inside the word (a token may end inside a multi-byte char)
        if word.isascii():
            byte_to_char = range(len(word) + 1)
        else:
            byte_to_char = []
            for ci, ch in enumerate(word):
                byte_to_char.extend([ci] * len(ch.encode("utf-8")))
            byte_to_char.append(len(word))
        pos = 0
        out = []
        for token, n_bytes in self.bpe.word_pieces(word):
            a = byte_to_char[pos]
            pos += n_bytes
            b = byte_to_char[pos] if pos < len(byte_to_char) - 1 else len(word)
            out.append((token, a, max(b, a + 1)))
        return tuple(out)
