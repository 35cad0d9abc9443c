"""One raw sample -> a training example: metadata, caption draw, image augmentation, concept spans.

Each step that meets bad data counts it in ``skips`` by kind and drops the sample (returns None).
The caption draw and the augmentation are seeded by (seed, epoch, key, position): identical after a
resume, whatever process decodes the sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from medclip.data.augment import SampleImages
from medclip.data.device_decode import DeferredJpeg
from medclip.data.manifest import Manifest
from medclip.data.slots import seeded_rng
from medclip.data.spans import NameTokenizer, caption_concepts, tokenize_with_concepts
from medclip.data.stream_config import StreamConfig
from medclip.data.text import SpanTokenizer
from medclip.data.windows import caption_window

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def draw_caption(rng: random.Random, count: int, first_share: float | None) -> int:
    """Index of the caption to use this visit (see StreamConfig.first_caption_share)."""
    if first_share is None or count == 1:
        return rng.randrange(count)
    return 0 if rng.random() < first_share else 1 + rng.randrange(count - 1)


def sample_captions(m: Manifest, sample: dict, meta: dict) -> tuple[list[str], bool]:
    """Captions from the manifest's fields (first that has any) and whether concepts index them."""
    for name in m.caption_fields:
        if name == "txt":
            raw = sample.get("txt")
            text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ""
            parts = text.split(m.caption_separator) if m.caption_separator else [text]
            caps = [c.strip() for c in parts if c.strip()]
            from_json = False
        else:
            value = meta.get(name)
            caps = [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []
            caps = [c for c in caps if isinstance(c, str) and c.strip()]
            from_json = name == "captions"
        if caps:
            return caps, from_json
    return [], False


def caption_key(caption: str) -> int:
    """A signed 64-bit key of a caption's text (stripped): equal texts, equal keys, in every process and run
    (distinct texts collide with probability ~2**-64 per pair)."""
    digest = hashlib.blake2b(caption.strip().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@dataclass
class DecodedSample:
    key: str
    # float [3, H, W], or uint8 planes [3 or 1, H, W] with a split transform, or a JPEG left for the device
    image: torch.Tensor | np.ndarray | DeferredJpeg
    ids: torch.Tensor
    spans: list[tuple[int, int]]
    cuis: list[int]
    positive: list[bool]
    names: torch.Tensor | None = None  # [n concepts, L] name tokens, with concept_name_length
    name_pad: int = 0
    # caption_key of the caption drawn this visit and of every caption in the sample's pool (the drawn one
    # first): a caption shared by several images (a label-derived one) describes each of them
    # (objective.it_positives: pool).
    pool_keys: tuple[int, ...] = ()


def pool_keys(captions: list[str], choice: int) -> tuple[int, ...]:
    """caption_key of ``captions[choice]``, then of every other caption of the pool."""
    keys = [caption_key(c) for c in captions]
    return (keys[choice], *keys[:choice], *keys[choice + 1:])


class SampleDecoder:
    def __init__(self, sources: list[Manifest], tokenizer: SpanTokenizer, transform, cfg: StreamConfig):
        self.sources = sources
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.images = SampleImages(transform, cfg.uint8_images, cfg.gray_shortcut, cfg.fast_decode, cfg.device_decode)
        self.names = NameTokenizer(tokenizer, cfg.concept_name_length) if cfg.concept_name_length else None

    @property
    def split(self):
        return self.images.split

    def __call__(self, sample: dict, position: int, epoch: int, skips: Counter) -> DecodedSample | None:
        m = self.sources[sample["__source__"]]
        meta = self._metadata(sample, skips)
        if meta is None:
            return None
        captions, indexed = sample_captions(m, sample, meta)
        if not captions:
            skips["missing_caption"] += 1
            return None
        pixels = self._pixels(sample, position, epoch, skips)
        if pixels is None:
            return None
        # One caption per visit, drawn from an RNG of the sample's stream position: same draw after resume.
        rng = seeded_rng(self.cfg.seed, epoch, sample["__key__"], position)
        choice = draw_caption(rng, len(captions), self.cfg.first_caption_share)
        caption = captions[choice]
        concepts = caption_concepts(meta, m.concept_field, choice, self.cfg.max_concepts) if indexed else []
        if self.cfg.long_captions != "head":  # the same RNG, after the draw: the window replays on resume
            caption, concepts = caption_window(rng, caption, concepts, self.tokenizer.count_tokens,
                                               self.tokenizer.context_length - 2, skips,
                                               keep_concepts=self.cfg.long_captions == "concepts")
        text = tokenize_with_concepts(self.tokenizer, caption, concepts, skips)
        decoded = DecodedSample(sample["__key__"], pixels, text.ids, text.spans, text.cuis, text.positive,
                                pool_keys=pool_keys(captions, choice))
        if self.names is not None:
            decoded.names, decoded.name_pad = self.names(text.names)
        return decoded

    @staticmethod
    def _metadata(sample: dict, skips: Counter) -> dict | None:
        """The sample's JSON object ({} without one); None (counted) when it is not a JSON object."""
        if "json" not in sample:
            return {}
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            skips["bad_json"] += 1
            return None
        return meta

    def _pixels(self, sample: dict, position: int, epoch: int, skips: Counter):
        """The augmented image; None (counted) when it is missing, corrupt or the transform fails."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            skips["missing_image"] += 1
            return None
        # Augmentation seeded per sample, like the caption draw: replayed exactly after a resume.
        seed = seeded_rng(self.cfg.seed, epoch, sample["__key__"], position, "augment").getrandbits(63)
        with self.images.seeded(seed):  # decoding draws the random crop first when it is reduced (fast_decode)
            try:
                opened = self.images.decode(sample[ext])
            except Exception:  # PIL raises many types for broken files
                skips["corrupt_image"] += 1
                return None
            try:
                return self.images.augment(opened)
            except Exception as exc:
                log.warning("transform failed on %s: %s", sample["__key__"], exc)
                skips["transform_error"] += 1
                return None
