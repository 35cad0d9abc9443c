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

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from medclip.data.batching import collate, collate_images
from medclip.data.decode import DecodedSample, SampleDecoder, draw_caption
from medclip.data.manifest import Manifest, as_manifest
from medclip.data.slots import raw_samples, seeded_rng
from medclip.data.stream_config import StreamConfig, check_first_caption_share
from medclip.data.text import SpanTokenizer
from medclip.data.workers import as_is, for_transfer, from_transfer
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

__all__ = ["StreamConfig", "TrainStream", "build_train_stream", "check_first_caption_share", "collate",
           "collate_images", "draw_caption", "seeded_rng"]


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
                yield {"batch": for_transfer(collate(pending), info), "worker": worker, "position": position,
                       "skips": dict(skips)}
                pending = []
        batch = for_transfer(collate(pending), info) if pending and not self.cfg.drop_last else None
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
                dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=as_is,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))
        for item in items:
            worker = item["worker"]
            self._positions[worker] = item["position"]
            self._skips_now[worker] = Counter(item["skips"])
            if "words" in item:  # a worker's last message
                self.decoder.tokenizer.add_words(item["words"])
            if item["batch"] is not None:
                yield from_transfer(item["batch"])
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
