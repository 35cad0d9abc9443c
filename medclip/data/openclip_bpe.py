"""The one adapter over open_clip's ``SimpleTokenizer`` internals.

open_clip's public BPE API gives token ids (``encode`` / ``__call__``) but no character offsets, which
concept spans need. This adapter reads the four internals that give them: the word-split regex
(``pat``), the byte-to-unicode table (``byte_encoder``), the per-word merge function (``bpe``) and the
vocabulary (``encoder``). Nothing else in medclip touches them. ``tests/test_text_bpe.py`` pins the
behaviour against open_clip's own tokenizer on the MedPix and COVID-19 captions of ../shared/data, so a
change in open_clip fails there rather than in a training run.
"""

from __future__ import annotations

from collections.abc import Iterator

from medclip.errors import MedclipError

INTERNALS = ("pat", "byte_encoder", "bpe", "encoder")


class OpenClipBPE:
    """Word split and per-word BPE of an open_clip ``SimpleTokenizer``, with byte lengths per token."""

    def __init__(self, tokenizer):
        missing = [name for name in INTERNALS if not hasattr(tokenizer, name)]
        if missing:
            import open_clip

            raise MedclipError(f"open_clip {open_clip.__version__}'s SimpleTokenizer has no {', '.join(missing)}: "
                               "concept span mapping supports open_clip 2.x-3.x's BPE tokenizer")
        self._tok = tokenizer
        self.sot_token_id = tokenizer.sot_token_id
        self.eot_token_id = tokenizer.eot_token_id

    def words(self, cleaned: str) -> Iterator[tuple[int, str]]:
        """(start offset, word) of each word of already-cleaned text, as ``SimpleTokenizer.encode`` splits it."""
        for match in self._tok.pat.finditer(cleaned):
            yield match.start(), match.group()

    def word_pieces(self, word: str) -> list[tuple[int, int]]:
        """(token id, number of UTF-8 bytes) of each BPE token of one word, in order."""
        encoded = "".join(self._tok.byte_encoder[b] for b in word.encode("utf-8"))
        # Each unicode symbol of a piece stands for one byte; "</w>" marks the word's end.
        return [(self._tok.encoder[piece], len(piece.removesuffix("</w>")))
                for piece in self._tok.bpe(encoded).split(" ")]
