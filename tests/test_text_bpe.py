"""Pins open_clip's BPE tokenizer behaviour that the span mapping's adapter (data/openclip_bpe.py) relies on:
on every real MedPix and COVID-19 caption, the ids equal open_clip's own tokenizer's, with and without
spans, and each word's tokens decode (open_clip's public ``decode``) back to that word."""

from __future__ import annotations

import json
import re

import open_clip
import pytest
import torch
from conftest import require_shared

from medclip.data.openclip_bpe import OpenClipBPE
from medclip.data.text import CharSpan, SpanTokenizer
from medclip.errors import MedclipError

# Cases the real captions lack: cleaning (entities, control and non-ASCII characters, whitespace runs),
# contractions, digits, and truncation at the context length.
EDGE_CASES = [
    "Chest  X-ray:\tLARGE right-sided Pleural Effusion &amp;amp; small Pneumothorax; no cardiomegaly.",
    "Patient's T2-weighted MRI — “hyperintense” lesion, 3.5×2 cm (Ø), café-au-lait spots, naïve\x07 ﬁbrosis",
    "mojibake: cafÃ© au lait; emoji 🫁 lung; CJK 肺; it'll they're we've I'm",
    "   leading and trailing whitespace\n\n",
    "a " * 120 + "pneumothorax",
]


def _captions() -> list[str]:
    captions = []
    for folder, splits in (("medpix", ("train", "dev")), ("covid-cxr", ("train", "test"))):
        for split in splits:
            path = require_shared(folder, f"{split}.jsonl")
            captions += [json.loads(line)["caption"] or "" for line in path.read_text().splitlines() if line.strip()]
    return [c for c in captions if c.strip()] + EDGE_CASES


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.SimpleTokenizer(context_length=77)


def test_ids_equal_open_clips_tokenizer_on_real_captions(tokenizer):
    captions = _captions()
    assert len(captions) > 2000
    expected = tokenizer(captions)
    st = SpanTokenizer(tokenizer)
    for caption, ids in zip(captions, expected):
        assert torch.equal(st(caption).ids, ids), caption


def test_spans_map_every_word_to_its_tokens_on_real_captions(tokenizer):
    """Every word of every third caption as a span: same ids, and the word's tokens decode to the word."""
    captions = _captions()[::3] + EDGE_CASES
    expected = tokenizer(captions)
    st = SpanTokenizer(tokenizer)
    checked = 0
    for caption, ids in zip(captions, expected):
        words = [(m.start(), m.end()) for m in re.finditer(r"\S+", caption)]
        out = st(caption, [CharSpan(a, b) for a, b in words])
        assert torch.equal(out.ids, ids), caption
        for (a, b), span in zip(words, out.spans):
            word = caption[a:b]
            if span is None or span[1] >= st.context_length - 1 or not word.isascii() or "&" in word:
                continue  # (partly) truncated away, or changed by the tokenizer's cleaning
            decoded = tokenizer.decode(out.ids[span[0]:span[1]].tolist())
            assert "".join(decoded.split()) == word.lower(), (caption, word, decoded)
            checked += 1
    assert checked > 10_000


def test_adapter_pieces_are_the_tokenizers_encoding(tokenizer):
    bpe = OpenClipBPE(tokenizer)
    for word in ["pneumothorax", "café", "肺", "'s", "🫁"]:
        pieces = bpe.word_pieces(word)
        assert [t for t, _ in pieces] == tokenizer.encode(word)
        assert sum(n for _, n in pieces) == len(word.encode("utf-8"))
    assert [w for _, w in bpe.words("it's 3.5 cm")] == ["it", "'s", "3", ".", "5", "cm"]


def test_a_tokenizer_without_the_internals_is_a_clear_error():
    class Stripped(open_clip.SimpleTokenizer):
        def __getattribute__(self, name):
            if name == "pat":
                raise AttributeError(name)
            return super().__getattribute__(name)

    with pytest.raises(MedclipError, match="SimpleTokenizer has no pat"):
        SpanTokenizer(Stripped())
    with pytest.raises(MedclipError, match="unsupported tokenizer"):
        SpanTokenizer(object())
