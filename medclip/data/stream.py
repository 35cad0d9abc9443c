"""Resumable, fault-tolerant, weighted multi-source training stream over WebDataset shards.

Every data-loader worker of every rank is a *slot* (``rank * num_workers + worker``). For each
epoch a slot reads a fully deterministic sequence of raw samples, derived from (seed, epoch,
slot) only:

1. per source, the shard list is shuffled with an RNG of (seed, epoch, source, pass); with at
   least as many shards as slots, slot ``s`` reads shards ``s, s + S, ...``; with fewer shards,
   the slots sharing a shard take every k-th sample of it (so no slot idles, nothing is read
   twice, and nothing hangs or asserts);
2. sources are mixed by drawing the next source with probability proportional to its manifest
   weight (seeded RNG). With ``epoch_samples`` set, sources are cycled (reshuffled each pass)
   and the slot stops at its share of ``epoch_samples``; otherwise each source is read once;
3. a seeded shuffle buffer reorders the raw (undecoded) samples;
4. a position counter counts raw samples leaving the buffer. Resuming skips the first
   ``position`` samples of each slot without decoding them, so the resumed epoch continues with
   exactly the samples that had not been delivered.

Decoding, caption choice and the random image augmentation (both seeded by (seed, epoch, key,
position), hence identical after a resume and independent of how the DataLoader seeds its
workers), tokenization with concept spans and batching happen after the counter. Bad data is
skipped and counted by kind; workers send their counts with every batch and at their end.

Images leave the workers as uint8 when the transform ends in ToTensor (+ Normalize), as
open_clip's do (``StreamConfig.uint8_images``, on by default): 4x less to copy between processes.
The consumer then calls ``medclip.data.images.normalize_images(batch["images"],
stream.image_mean, stream.image_std, device)``, which gives the exact float pixels the full
transform would have. ``stream.image_mean`` is None when the batches carry float images.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import group_by_keys, tar_file_expander

from medclip.data.concepts import concept_key
from medclip.data.images import (
    SplitTransform,
    gray_plane,
    gray_transform,
    seeded_augmentation,
    split_transform,
    to_uint8_planes,
)
from medclip.data.manifest import Manifest, as_manifest
from medclip.data.text import CharSpan, SpanTokenizer
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FSSPEC_SCHEMES = ("s3", "gcs", "az", "abfs", "abfss", "oss", "r2", "webhdfs")

SKIP_KINDS = ("truncated_tar", "unreadable_shard", "bad_json", "corrupt_image", "missing_image",
              "missing_caption", "transform_error")


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    import fsspec

    return fsspec.open(url, mode).open()


for _scheme in FSSPEC_SCHEMES:  # webdataset's documented dispatch table; keep any existing handler
    wds.gopen_schemes.setdefault(_scheme, _gopen_fsspec)


@dataclass
class StreamConfig:
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 1000  # raw samples held per worker (0: no sample shuffling)
    shuffle_shards: bool = True
    epoch_samples: int | None = None  # all ranks together; None = one pass over every source
    drop_last: bool = False
    max_concepts: int | None = None  # cap per caption (None: all)
    prefetch_factor: int = 4
    # Ship uint8 images (the consumer normalises them, see the module doc) when the transform allows.
    uint8_images: bool = True
    # > 0: also emit `concept_name_tokens` [B, C, L] (each concept's name tokenized like a caption, L tokens),
    # for PC-Align's objective.use_concept_names.
    concept_name_length: int = 0
    # uint8 images only: augment an image whose R = G = B on its single band (bit-identical pixels,
    # a third of the resampling; see medclip.data.images.gray_transform). False: always RGB.
    gray_shortcut: bool = True
    # Chance of drawing a sample's first caption (a table's own caption comes before its label captions,
    # see training.prepare); the others share the rest evenly. None: every caption equally likely.
    first_caption_share: float | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise MedclipError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0 <= self.rank < self.world_size):
            raise MedclipError(f"rank must be in [0, world_size), got {self.rank}/{self.world_size}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise MedclipError("num_workers and shuffle_buffer must be >= 0")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise MedclipError(f"epoch_samples must be positive, got {self.epoch_samples}")
        check_first_caption_share(self.first_caption_share)


def _rng(*parts) -> random.Random:
    # random.Random seeds from a str deterministically (not via the salted hash()).
    return random.Random("/".join(str(p) for p in parts))


def check_first_caption_share(share: float | None, name: str = "first_caption_share") -> None:
    if share is not None and not 0 <= share <= 1:
        raise MedclipError(f"{name} must be in [0, 1] (or null), got {share!r}")


def draw_caption(rng: random.Random, count: int, first_share: float | None) -> int:
    """Index of the caption to use this visit (see StreamConfig.first_caption_share)."""
    if first_share is None or count == 1:
        return rng.randrange(count)
    return 0 if rng.random() < first_share else 1 + rng.randrange(count - 1)


# ---------------------------------------------------------------- raw sample order (per slot)


class _ShardErrors:
    """webdataset exception handler: remembers the error kinds of the shard being read."""

    def __init__(self):
        self.kinds: set[str] = set()

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in str(exn).lower():
            self.kinds.add("truncated_tar")
        else:
            self.kinds.add("unreadable_shard")
        log.warning("shard error: %s", exn)
        return True  # continue with the next shard


class _TailStream:
    """File wrapper remembering the byte count and the last block read, to prove the tar was complete."""

    def __init__(self, raw):
        self.raw = raw
        self.total = 0
        self.tail = b""

    def read(self, n=-1):
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data[-512:])[-512:]  # never copy a whole (large) read
        return data

    def complete(self) -> bool:
        while self.read(1 << 16):  # drain the end padding
            pass
        # A whole tar is a sequence of 512-byte blocks ending in zero blocks. tarfile's stream mode
        # silently stops at a header cut in half, so this is the only way to see that truncation.
        return self.total % 512 == 0 and self.total > 0 and self.tail == bytes(512)

    def close(self):
        close = getattr(self.raw, "close", None)
        if close:
            close()


def _read_shard(url: str, keep: Callable[[int], bool], skips: Counter) -> Iterator[dict]:
    errors = _ShardErrors()
    try:
        stream = _TailStream(wds.gopen(url))
    except Exception as exn:
        errors(exn)
        stream = None
    if stream is not None:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=errors)
        for index, sample in enumerate(group_by_keys(files, handler=errors)):
            if keep(index):
                yield sample
        try:
            if not errors.kinds and not stream.complete():
                errors.kinds.add("truncated_tar")
                log.warning("shard error: %s ends before the tar end-of-archive marker", url)
        except Exception as exn:
            errors(exn)
        stream.close()
    for kind in errors.kinds:
        skips[kind] += 1


def _slot_shards(urls: list[str], rng: random.Random, slot: int, n_slots: int, shuffle: bool):
    """(url, keep(sample_index)) pairs this slot reads."""
    urls = list(urls)
    if shuffle:
        rng.shuffle(urls)
    n = len(urls)
    if n >= n_slots:
        return [(u, lambda i: True) for u in urls[slot::n_slots]]
    shard = slot % n
    sharing = len(range(shard, n_slots, n))
    rank_in_shard = slot // n
    return [(urls[shard], lambda i, k=sharing, r=rank_in_shard: i % k == r)]


def _source_samples(m: Manifest, source_index: int, cfg: StreamConfig, epoch: int, slot: int, n_slots: int,
                    cycle: bool, skips: Counter) -> Iterator[dict]:
    pass_index = 0
    while True:
        rng = _rng(cfg.seed, epoch, source_index, pass_index)
        produced = 0
        for url, keep in _slot_shards(m.urls, rng, slot, n_slots, cfg.shuffle_shards):
            for sample in _read_shard(url, keep, skips):
                sample["__source__"] = source_index
                produced += 1
                yield sample
        pass_index += 1
        if not cycle or produced == 0:  # an unreadable source must not loop forever
            return


def raw_samples(sources: list[Manifest], cfg: StreamConfig, epoch: int, slot: int, n_slots: int,
                skips: Counter) -> Iterator[dict]:
    """The deterministic sequence of undecoded samples of one slot for one epoch."""
    cycle = cfg.epoch_samples is not None
    iters = {i: _source_samples(m, i, cfg, epoch, slot, n_slots, cycle, skips)
             for i, m in enumerate(sources) if m.weight > 0}
    weights = {i: sources[i].weight for i in iters}
    quota = None
    if cycle:
        quota = cfg.epoch_samples // n_slots + (1 if slot < cfg.epoch_samples % n_slots else 0)
    mix_rng = _rng(cfg.seed, epoch, slot, "mix")
    shuffle_rng = _rng(cfg.seed, epoch, slot, "shuffle")
    buffer: list[dict] = []
    emitted = 0

    def draw() -> dict | None:
        while iters:
            keys = list(iters)
            i = keys[0] if len(keys) == 1 else mix_rng.choices(keys, weights=[weights[k] for k in keys])[0]
            try:
                return next(iters[i])
            except StopIteration:
                del iters[i]
        return None

    while quota is None or emitted < quota:
        while len(buffer) < max(1, cfg.shuffle_buffer):
            sample = draw()
            if sample is None:
                break
            buffer.append(sample)
        if not buffer:
            return
        j = shuffle_rng.randrange(len(buffer)) if cfg.shuffle_buffer > 0 else 0
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()
        emitted += 1


# ---------------------------------------------------------------- decoding and batching


@dataclass
class DecodedSample:
    key: str
    image: torch.Tensor | np.ndarray  # float [3, H, W], or uint8 planes [3 or 1, H, W] with a split transform
    ids: torch.Tensor
    spans: list[tuple[int, int]]
    cuis: list[int]
    positive: list[bool]
    names: torch.Tensor | None = None  # [n concepts, L] name tokens, with concept_name_length
    name_pad: int = 0


class SampleDecoder:
    def __init__(self, sources: list[Manifest], tokenizer: SpanTokenizer, transform, cfg: StreamConfig):
        self.sources = sources
        self.tokenizer = tokenizer
        self.transform = transform
        self.cfg = cfg
        self._name_pad: int | None = None
        # PIL-space part of the transform when images are shipped as uint8 (else None: float images).
        self.split: SplitTransform | None = split_transform(transform) if cfg.uint8_images else None
        # The same PIL steps for one gray band (None: the transform or the config rules the shortcut out).
        self.gray = gray_transform(self.split.pil_transform) if self.split and cfg.gray_shortcut else None

    def captions(self, m: Manifest, sample: dict, meta: dict) -> tuple[list[str], bool]:
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

    def __call__(self, sample: dict, position: int, epoch: int, skips: Counter) -> DecodedSample | None:
        m = self.sources[sample["__source__"]]
        meta: dict = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except ValueError:
                skips["bad_json"] += 1
                return None
        captions, indexed = self.captions(m, sample, meta)
        if not captions:
            skips["missing_caption"] += 1
            return None
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            skips["missing_image"] += 1
            return None
        try:
            image = Image.open(io.BytesIO(sample[ext]))  # in memory: nothing to close
            image.load()
            plane = gray_plane(image) if self.gray is not None else None
            if plane is None and image.mode != "RGB":
                image = image.convert("RGB")
        except Exception:  # PIL raises many types for broken files
            skips["corrupt_image"] += 1
            return None
        try:
            # Augmentation seeded per sample, like the caption draw: replayed exactly after a resume.
            # In a worker process nothing else uses the global RNGs: no need to restore them per sample.
            seed = _rng(self.cfg.seed, epoch, sample["__key__"], position, "augment").getrandbits(63)
            with seeded_augmentation(seed, restore=torch.utils.data.get_worker_info() is None):
                if plane is not None:  # R = G = B: one band through the same steps (see gray_transform)
                    pixels = to_uint8_planes(self.gray(plane))
                elif self.split is not None:
                    pixels = to_uint8_planes(self.split.pil_transform(image))
                else:
                    pixels = self.transform(image)
        except Exception as exc:
            log.warning("transform failed on %s: %s", sample["__key__"], exc)
            skips["transform_error"] += 1
            return None
        # One caption per visit, drawn from an RNG of the sample's stream position: same draw after resume.
        choice = draw_caption(_rng(self.cfg.seed, epoch, sample["__key__"], position), len(captions),
                              self.cfg.first_caption_share)
        caption = captions[choice]
        concepts = [c for c in (meta.get(m.concept_field) or []) if isinstance(c, dict)] if indexed else []
        concepts = [c for c in concepts if int(c.get("caption_index", 0) or 0) == choice]
        if self.cfg.max_concepts is not None:
            concepts = concepts[: self.cfg.max_concepts]
        char_spans, cuis, positive, valid = [], [], [], []
        for c in concepts:
            try:
                span, cui = CharSpan(int(c["start"]), int(c["end"])), concept_key(c["cui"])
            except (KeyError, TypeError, ValueError):
                skips["concept_dropped"] += 1
                continue
            char_spans.append(span)
            cuis.append(cui)
            positive.append(not c.get("negated", False))
            valid.append(c)
        tokenized = self.tokenizer(caption, char_spans)
        spans, kept_cuis, kept_pos, names = [], [], [], []
        for span, cui, pos, c in zip(tokenized.spans, cuis, positive, valid):
            if span is None:  # truncated away or not on any token
                skips["concept_dropped"] += 1
                continue
            spans.append(span)
            kept_cuis.append(cui)
            kept_pos.append(pos)
            names.append(str(c.get("name") or caption[span_text_slice(c)]))
        decoded = DecodedSample(sample["__key__"], pixels, tokenized.ids, spans, kept_cuis, kept_pos)
        if self.cfg.concept_name_length:
            decoded.names, decoded.name_pad = self.name_tokens(names)
        return decoded

    def name_tokens(self, names: list[str]) -> tuple[torch.Tensor, int]:
        """Concept names tokenized like captions (start/end tokens), and the tokenizer's pad id."""
        tok = self.tokenizer.tokenizer
        length = self.cfg.concept_name_length
        if self._name_pad is None:
            self._name_pad = int(tok([""], context_length=length)[0, -1])  # "" is start, end, then padding
        ids = tok(names, context_length=length) if names else torch.empty(0, length, dtype=torch.long)
        return ids, self._name_pad


def span_text_slice(concept: dict) -> slice:
    return slice(int(concept["start"]), int(concept["end"]))


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Empty batch tensor; in a DataLoader worker, allocated in shared memory from the start.

    The DataLoader sends a worker's tensors to the main process through shared memory and copies
    any tensor not already there (a 9.6 MB copy and 2,400 fresh page faults per 224 px uint8 batch
    of 64). torch's own default_collate allocates its batch in shared memory for the same reason.
    """
    if torch.utils.data.get_worker_info() is not None:
        new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
        if new_shared is not None:
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            return torch.empty(0, dtype=dtype).set_(new_shared(nbytes)).view(shape)
    return torch.empty(shape, dtype=dtype)


def collate_images(images: list[torch.Tensor | np.ndarray]) -> torch.Tensor:
    """float [3, H, W] tensors -> float [B, 3, H, W]; uint8 planes [3 or 1, H, W] -> uint8 [B, 3, H, W].

    The uint8 batch is filled in place (no per-sample tensors, no stack), contiguous channels-first
    (so the consumer's normalisation reads it in order); a single gray plane fills all 3 channels.
    """
    if not isinstance(images[0], np.ndarray):
        shape = images[0].shape
        if any(t.shape != shape for t in images):
            return torch.stack(images)  # raises torch's error about the differing sizes
        return torch.stack(images, out=_batch_tensor((len(images), *shape), images[0].dtype))
    size = images[0].shape[1:]
    if any(a.shape[1:] != size for a in images):
        raise MedclipError(f"images of one batch differ in size: {sorted({a.shape[1:] for a in images})}"
                           " (the transform must produce a fixed size)")
    batch = _batch_tensor((len(images), 3, *size), torch.uint8)
    view = batch.numpy()
    for i, a in enumerate(images):
        view[i] = a  # [1, H, W] broadcasts to the 3 channels
    return batch


def collate(samples: list[DecodedSample]) -> dict:
    """The training batch contract: images, text, concept_spans/ids/mask (C >= 1), keys.

    ``images`` is uint8 [B, 3, H, W] when the decoder ships uint8 (see the module doc), else float.
    """
    b = len(samples)
    c = max([1] + [len(s.spans) for s in samples])
    spans = torch.zeros(b, c, 2, dtype=torch.long)
    ids = torch.zeros(b, c, dtype=torch.long)
    mask = torch.zeros(b, c, dtype=torch.bool)
    for i, s in enumerate(samples):
        for j, (span, cui, pos) in enumerate(zip(s.spans, s.cuis, s.positive)):
            spans[i, j, 0], spans[i, j, 1] = span
            ids[i, j] = cui
            mask[i, j] = pos
    out = {
        "images": collate_images([s.image for s in samples]),
        "text": torch.stack([s.ids for s in samples]),
        "concept_spans": spans,
        "concept_ids": ids,
        "concept_mask": mask,
        "keys": [s.key for s in samples],
    }
    if samples and samples[0].names is not None:
        names = torch.full((b, c, samples[0].names.shape[1]), samples[0].name_pad, dtype=torch.long)
        for i, s in enumerate(samples):
            names[i, : len(s.names)] = s.names
        out["concept_name_tokens"] = names
    return out


SMALL_TENSOR_BYTES = 1 << 20


def _for_transfer(batch: dict, worker_info) -> dict:
    """In a worker: small tensors as NumPy arrays, which the DataLoader pickles inline.

    Every tensor a worker sends gets a shared-memory segment of its own, created in the worker
    and fetched by the parent over a new socket connection (~0.4 ms each here); text, spans,
    concept ids and masks are a few KB. The images (allocated in shared memory) stay tensors.
    """
    if worker_info is None:
        return batch
    return {k: v.numpy() if isinstance(v, torch.Tensor) and v.nbytes < SMALL_TENSOR_BYTES else v
            for k, v in batch.items()}


def _as_is(item):
    """The DataLoader's per-item collate_fn: items are whole batches already (its default would turn
    the NumPy arrays of :func:`_for_transfer` back into tensors in the worker)."""
    return item


def _from_transfer(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of every slot of this rank; each worker runs its own slot."""

    def __init__(self, sources, decoder: SampleDecoder, cfg: StreamConfig, epoch: int, start: list[int]):
        self.sources, self.decoder, self.cfg, self.epoch, self.start = sources, decoder, cfg, epoch, start

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        workers = max(1, self.cfg.num_workers)
        slot, n_slots = self.cfg.rank * workers + worker, self.cfg.world_size * workers
        skips: Counter = Counter()
        position = 0
        pending: list[DecodedSample] = []
        start = self.start[worker]
        for raw in raw_samples(self.sources, self.cfg, self.epoch, slot, n_slots, skips):
            position += 1
            if position <= start:  # already delivered before the interruption: skip without decoding
                continue
            decoded = self.decoder(raw, position, self.epoch, skips)
            if decoded is not None:
                pending.append(decoded)
            if len(pending) == self.cfg.batch_size:
                yield {"batch": _for_transfer(collate(pending), info), "worker": worker, "position": position,
                       "skips": dict(skips)}
                pending = []
        batch = _for_transfer(collate(pending), info) if pending and not self.cfg.drop_last else None
        # The final message also carries the worker's last counts (and position when samples were dropped),
        # and the words its tokenizer learnt: the next epoch's workers (copies of the parent's) start with them.
        yield {"batch": batch, "worker": worker, "position": max(position, start), "skips": dict(skips),
               "words": self.decoder.tokenizer.take_new_words()}


class TrainStream:
    """Iterate for one epoch of batches; ``state_dict`` after any batch resumes right after it."""

    def __init__(self, sources: list[Manifest], tokenizer, transform, cfg: StreamConfig):
        if not sources:
            raise MedclipError("no data sources given")
        if not any(m.weight > 0 for m in sources):
            raise MedclipError("all data sources have weight 0")
        self.sources = sources
        self.cfg = cfg
        span_tokenizer = tokenizer if isinstance(tokenizer, SpanTokenizer) else SpanTokenizer(tokenizer)
        self.decoder = SampleDecoder(sources, span_tokenizer, transform, cfg)
        # Set when batches carry uint8 images: what medclip.data.images.normalize_images needs.
        split = self.decoder.split
        self.image_mean: tuple[float, float, float] | None = split.mean if split else None
        self.image_std: tuple[float, float, float] | None = split.std if split else None
        self.epoch = 0
        self._workers = max(1, cfg.num_workers)
        self._positions = [0] * self._workers
        self._skips_before: Counter = Counter()  # finished epochs and restored state
        self._skips_now: list[Counter] = [Counter() for _ in range(self._workers)]

    def __len__(self) -> int:
        """Batches per epoch when ``epoch_samples`` fixes it (upper bound with drop_last=False)."""
        if self.cfg.epoch_samples is None:
            raise TypeError("length is only known with epoch_samples set")
        per_rank = self.cfg.epoch_samples // self.cfg.world_size
        per_worker = -(-per_rank // self._workers)
        return self._workers * -(-per_worker // self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self._finish_counts()
        self.epoch = int(epoch)
        self._positions = [0] * self._workers

    def _finish_counts(self) -> None:
        for c in self._skips_now:
            self._skips_before.update(c)
        self._skips_now = [Counter() for _ in range(self._workers)]

    def __iter__(self) -> Iterator[dict]:
        dataset = _EpochDataset(self.sources, self.decoder, self.cfg, self.epoch, list(self._positions))
        if self.cfg.num_workers == 0:
            items = iter(dataset)
        else:
            items = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_as_is,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))
        for item in items:
            worker = item["worker"]
            self._positions[worker] = item["position"]
            self._skips_now[worker] = Counter(item["skips"])
            if "words" in item:  # a worker's last message
                self.decoder.tokenizer.add_words(item["words"])
            if item["batch"] is not None:
                yield _from_transfer(item["batch"])
        self._finish_counts()
        self.epoch += 1
        self._positions = [0] * self._workers

    def skip_counts(self) -> dict[str, int]:
        total = Counter(self._skips_before)
        for c in self._skips_now:
            total.update(c)
        return dict(sorted(total.items()))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "positions": list(self._positions), "skips": self.skip_counts(),
                "seed": self.cfg.seed, "num_workers": self._workers, "world_size": self.cfg.world_size,
                "rank": self.cfg.rank, "sources": [m.name for m in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("seed", self.cfg.seed), ("num_workers", self._workers),
                          ("world_size", self.cfg.world_size), ("rank", self.cfg.rank),
                          ("sources", [m.name for m in self.sources])):
            if state.get(key) != mine:
                raise MedclipError(f"cannot resume the data stream: {key} was {state.get(key)!r}, now {mine!r} "
                                   f"(exact resume needs the same seed, sources, world size and workers)")
        self.epoch = int(state["epoch"])
        self._positions = [int(p) for p in state["positions"]]
        self._skips_before = Counter(state.get("skips", {}))
        self._skips_now = [Counter() for _ in range(self._workers)]


def build_train_stream(
    manifests: list[Manifest | str | Path],
    tokenizer,
    transform: Callable,
    batch_size: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    root: str | Path | None = None,
    **options,
) -> TrainStream:
    """Training stream over ``manifests`` (paths or :class:`Manifest`); ``options`` go to StreamConfig."""
    sources = [as_manifest(m, root) for m in manifests]
    cfg = StreamConfig(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                       num_workers=num_workers, **options)
    return TrainStream(sources, tokenizer, transform, cfg)
