"""Long captions (data.long_captions: window): a run of whole sentences that fits the context, its concepts
moved with it, drawn per visit and replayed by the sample's seed; head (the default) truncates as before."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pytest
from engine_helpers import write_shard
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from torchvision import transforms

from medclip.data.manifest import Manifest
from medclip.data.stream import build_train_stream
from medclip.data.text import SpanTokenizer
from medclip.data.windows import caption_window, fitting_windows, most_concepts, sentence_bounds
from medclip.errors import MedclipError

SENTENCES = [f"Finding {i} shows a small nodule in the upper lobe of the right lung." for i in range(11)]
LONG = " ".join(SENTENCES[:-1] + ["The last sentence names a pleural effusion."])
TRANSFORM = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


def _concept(text: str, phrase: str, cui: str) -> dict:
    start = text.index(phrase)
    return {"start": start, "end": start + len(phrase), "cui": cui}


def test_sentences_and_fitting_windows():
    text = "One two.  Three? Four; five six.\nSeven"
    assert [text[a:b] for a, b in sentence_bounds(text)] == ["One two.", "Three?", "Four;", "five six.", "Seven"]
    assert fitting_windows([3, 4, 9, 2], budget=8) == [(0, 2), (1, 2), (3, 4)]  # 9 fits nowhere
    assert fitting_windows([9], budget=8) == []


def test_window_fits_keeps_whole_sentences_and_moves_concepts():
    tokenizer = SpanTokenizer(SimpleTokenizer())
    budget = 75
    assert tokenizer.count_tokens(LONG) == len(SimpleTokenizer().encode(LONG)) > budget  # counted untruncated
    concepts = [_concept(LONG, "pleural effusion", "C0032227"), _concept(LONG, "Finding 0", "C0000001")]
    seen_starts, effusion_kept = set(), 0
    for seed in range(40):
        skips = Counter()
        window, kept = caption_window(random.Random(seed), LONG, concepts, tokenizer.count_tokens, budget, skips)
        assert tokenizer.count_tokens(window) <= budget and window in LONG
        pieces = [window[a:b] for a, b in sentence_bounds(window)]
        assert all(p in SENTENCES or p == "The last sentence names a pleural effusion." for p in pieces)
        for c in kept:
            assert window[c["start"]:c["end"]] in ("pleural effusion", "Finding 0")
        assert len(kept) + skips["concept_dropped"] == 2
        seen_starts.add(pieces[0])
        effusion_kept += any(c["cui"] == "C0032227" for c in kept)
    assert len(seen_starts) > 3 and effusion_kept > 0  # the end of the caption is reached on some visits


def test_concepts_rule_draws_among_the_windows_that_keep_the_most_concepts():
    tokenizer = SpanTokenizer(SimpleTokenizer())
    # two concepts in the first sentences, one in the last: no window holds all three
    concepts = [_concept(LONG, "Finding 0", "C1"), _concept(LONG, "Finding 1", "C2"),
                _concept(LONG, "pleural effusion", "C3")]
    kept_by_rule = {}
    for keep in (False, True):
        kept_by_rule[keep] = Counter()
        for seed in range(60):
            skips = Counter()
            _, kept = caption_window(random.Random(seed), LONG, concepts, tokenizer.count_tokens, 75, skips,
                                     keep_concepts=keep)
            kept_by_rule[keep][len(kept)] += 1
            assert len(kept) + skips["concept_dropped"] == 3
    assert kept_by_rule[True] == Counter({2: 60})  # every visit keeps the two concepts of the head
    assert kept_by_rule[False][0] > 0  # a uniform start often keeps none
    bounds = sentence_bounds(LONG)
    windows = fitting_windows([tokenizer.count_tokens(LONG[a:b]) for a, b in bounds], 75)
    assert most_concepts(windows, bounds, []) == windows  # no concepts: every window ties
    assert len(most_concepts(windows, bounds, concepts[2:])) < len(windows)


def test_a_caption_that_fits_is_left_alone():
    tokenizer = SpanTokenizer(SimpleTokenizer())
    rng = random.Random(0)
    state = rng.getstate()
    concepts = [_concept(SENTENCES[0], "nodule", "C0028259")]
    assert caption_window(rng, SENTENCES[0], concepts, tokenizer.count_tokens, 75, Counter()) == \
        (SENTENCES[0], concepts)
    assert rng.getstate() == state  # no draw: a head run's other draws are unchanged
    one_long_sentence = " ".join(["word"] * 100)
    assert caption_window(rng, one_long_sentence, [], tokenizer.count_tokens, 75, Counter())[0] == one_long_sentence


def _long_caption_shard(tmp_path) -> Manifest:
    image = io.BytesIO()
    Image.new("RGB", (40, 40), (90, 90, 90)).save(image, format="JPEG")
    meta = {"captions": [LONG], "concepts": [{**_concept(LONG, "pleural effusion", "C0032227"), "caption_index": 0}]}
    path = write_shard(tmp_path / "long.tar", {f"s{i}": {"jpg": image.getvalue(), "json": json.dumps(meta).encode()}
                                               for i in range(4)})
    return Manifest("long", [str(path)], samples=4, caption_fields=["captions"])


@pytest.mark.parametrize("rule", ["head", "window", "concepts"])
def test_stream_windows_long_captions_and_keeps_their_concepts(tmp_path, tiny_encoder, rule):
    manifest = _long_caption_shard(tmp_path)
    stream = build_train_stream([manifest], tiny_encoder.tokenizer, TRANSFORM, batch_size=4, seed=1,
                                long_captions=rule)
    bpe = SimpleTokenizer()
    context = tiny_encoder.tokenizer.context_length
    mapped = []
    for epoch in range(6):
        stream.set_epoch(epoch)
        for batch in stream:
            for ids, spans, mask in zip(batch["text"], batch["concept_spans"], batch["concept_mask"]):
                tokens = [t for t in ids.tolist() if t]
                if rule != "head":  # whole sentences with room for the end token: nothing truncated
                    assert len(tokens) < context and tokens[-1] == bpe.encoder["<end_of_text>"]
                    assert bpe.decode(tokens[1:-1]).strip().endswith(".")
                mapped += [bpe.decode(ids[s:e].tolist()).strip() for (s, e), m in zip(spans.tolist(), mask) if m]
    if rule == "head":  # the concept sits past the context: dropped on every visit
        assert mapped == [] and stream.skip_counts()["concept_dropped"] == 24
    else:
        assert mapped and set(mapped) == {"pleural effusion"}
        if rule == "concepts":  # the window always keeps the one concept
            assert len(mapped) == 24 and stream.skip_counts().get("concept_dropped", 0) == 0


def test_stream_rejects_an_unknown_rule(tmp_path, tiny_encoder):
    with pytest.raises(MedclipError, match="long_captions must be one of head, window, concepts"):
        build_train_stream([_long_caption_shard(tmp_path)], tiny_encoder.tokenizer, TRANSFORM, batch_size=4,
                           long_captions="tail")
