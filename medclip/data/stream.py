"""Resumable, fault-tolerant, weighted multi-source training stream over WebDataset shards.

Every data-loader worker of every rank is a *slot* (``rank * workers + worker``). For each epoch a
slot reads a fully deterministic sequence of raw samples, derived from (seed, epoch, slot) only:

1. each source is read in passes; a pass deals a freshly shuffled shard list out to the slots
   (:mod:`medclip.data.slots`), so in one pass each sample is read by exactly one slot;
2. a source's weight sets how many passes (visits per sample) it gets in an epoch, a fraction
   of a pass being a random subset of exact size (:mod:`medclip.data.mixing`); the sources are
   interleaved by seeded draws in proportion to their samples this epoch;
3. a seeded shuffle buffer reorders the raw (undecoded) samples;
4. a position counter counts raw samples leaving the buffer. Resuming skips the first
   ``position`` samples of each slot without decoding them, so the resumed epoch continues with
   exactly the samples that had not been delivered.

Decoding, caption choice and the random image augmentation (both seeded by (seed, epoch, key,
position), hence identical after a resume and independent of how the DataLoader seeds its
workers), tokenization with concept spans and batching happen after the counter
(:mod:`medclip.data.decode`, :mod:`medclip.data.batching`). Bad data is skipped and counted by kind;
workers send their counts with every batch and at their end.

The consumer records, for every message it takes from a worker, that worker's position and counts
and which worker is due next; a resumed epoch hands the DataLoader's first worker the slot that was
due, so the batches come in the uninterrupted order whatever the DataLoader had prefetched.

Images leave the workers as uint8 when the transform ends in ToTensor (+ Normalize), as
open_clip's do (``StreamConfig.uint8_images``, on by default): 4x less to copy between processes.
The consumer then calls ``medclip.data.images.normalize_images(batch["images"],
stream.image_mean, stream.image_std, device)``, which gives the exact float pixels the full
transform would have. ``stream.image_mean`` is None when the batches carry float images. With
``StreamConfig.device_decode`` the JPEGs leave the workers undecoded, their crops drawn, and
``normalize_batch`` decodes them on the consumer's device (:mod:`medclip.data.device_decode`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medclip.data.batching import collate, collate_images
from medclip.data.decode import DecodedSample, SampleDecoder, draw_caption
from medclip.data.manifest import Manifest, as_manifest, refuse_commands
from medclip.data.mixing import MixPlan, plan_mix, raw_samples
from medclip.data.shard_reader import SHARD_FAILURES
from medclip.data.slots import seeded_rng
from medclip.data.stream_config import StreamConfig, check_first_caption_share
from medclip.data.text import SpanTokenizer
from medclip.data.workers import as_is, exit_with_parent, for_transfer, from_transfer
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

__all__ = ["StreamConfig", "TrainStream", "build_train_stream", "check_first_caption_share", "collate",
           "collate_images", "draw_caption", "seeded_rng"]


@dataclass
class WorkerState:
    """Where one loader worker of this rank stands in the current epoch, as its consumer last heard."""

    position: int = 0  # raw samples of the worker's epoch sequence already delivered (or dropped)
    skips: dict[str, int] = field(default_factory=dict)  # its skip counts this epoch at that position
    finished: bool = False  # its last message of the epoch has been consumed


def _message(batch, worker: int, position: int, skips: Counter, final: bool = False, words=None) -> dict:
    return {"batch": batch, "worker": worker, "position": position, "skips": dict(skips), "final": final,
            "words": words}


class _EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of every worker of this rank, continuing from ``states``.

    The DataLoader asks its workers for items in turn, starting with its worker 0, and leaves out a
    worker once it has stopped. Loader worker ``j`` therefore plays the rank's worker
    ``(first + j) % W``: a resumed epoch starts with the worker whose batch was due next, and the
    batches come in the order the uninterrupted epoch had. A finished worker yields nothing.
    """

    def __init__(self, sources, plan: MixPlan, decoder: SampleDecoder, cfg: StreamConfig, epoch: int,
                 states: list[WorkerState], first: int):
        self.sources, self.plan, self.decoder, self.cfg, self.epoch = sources, plan, decoder, cfg, epoch
        self.states, self.first = states, first

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = self.cfg.workers_per_rank
        worker = (self.first + (info.id if info is not None else 0)) % workers
        state = self.states[worker]
        if state.finished:
            return
        slot, n_slots = self.cfg.rank * workers + worker, self.cfg.world_size * workers
        skips: Counter = Counter()
        position, start = 0, state.position
        pending: list[DecodedSample] = []
        for raw in raw_samples(self.sources, self.plan, self.cfg, self.epoch, slot, n_slots, skips):
            position += 1
            if position <= start:  # delivered before the interruption: skipped without decoding
                if position == start:  # the replay counted the shard failures up to here once more
                    skips.clear()
                    skips.update(state.skips)
                continue
            decoded = self.decoder(raw, position, self.epoch, skips)
            if decoded is not None:
                pending.append(decoded)
            if len(pending) == self.cfg.batch_size:
                yield _message(for_transfer(collate(pending), info), worker, position, skips)
                pending = []
        batch = for_transfer(collate(pending), info) if pending and not self.cfg.drop_last else None
        # The final message also carries the worker's last counts (and position when samples were dropped),
        # and the words its tokenizer learnt: the next epoch's workers (copies of the parent's) start with them.
        yield _message(batch, worker, max(position, start), skips if position >= start else state.skips,
                       final=True, words=self.decoder.tokenizer.take_new_words())


class TrainStream:
    """Iterate for (the rest of) one epoch of batches; ``state_dict`` after any batch resumes right after it."""

    def __init__(self, sources: list[Manifest], tokenizer, transform, cfg: StreamConfig):
        if not sources:
            raise MedclipError("no data sources given")
        refuse_commands(sources, cfg.allow_pipe)
        self.sources = sources
        self.cfg = cfg
        self.plan = plan_mix(sources, cfg.epoch_samples)
        span_tokenizer = tokenizer if isinstance(tokenizer, SpanTokenizer) else SpanTokenizer(tokenizer)
        self.decoder = SampleDecoder(sources, span_tokenizer, transform, cfg)
        # Set when batches carry uint8 images: what medclip.data.images.normalize_images needs.
        split = self.decoder.split
        self.image_mean: tuple[float, float, float] | None = split.mean if split else None
        self.image_std: tuple[float, float, float] | None = split.std if split else None
        self.epoch = 0
        self._skips_before: Counter = Counter()  # finished epochs
        self._start_epoch()

    def _start_epoch(self) -> None:
        self._workers = [WorkerState() for _ in range(self.cfg.workers_per_rank)]
        self._next_worker = 0  # the worker whose message is due next

    def set_epoch(self, epoch: int) -> None:
        self._end_epoch()
        self.epoch = int(epoch)

    def _end_epoch(self) -> None:
        for w in self._workers:
            self._skips_before.update(w.skips)
        self.epoch += 1
        self._start_epoch()

    def __iter__(self) -> Iterator[dict]:
        resumed = any(w.position or w.finished for w in self._workers)
        produced = yield from self._epoch(whole=not resumed)
        if resumed and not produced:  # the state was taken after the epoch's last batch: go on with the next
            yield from self._epoch(whole=True)

    def _epoch(self, whole: bool) -> Generator[dict, None, int]:
        """The batches of the current epoch from where its workers stand; returns how many there were.

        ``whole``: the epoch is read from its start; if not one sample of it could be read because its
        shards failed, stop with one line (the failures were counted and logged one by one).
        """
        states = [dataclasses.replace(w, skips=dict(w.skips)) for w in self._workers]  # as they stand now
        dataset = _EpochDataset(self.sources, self.plan, self.decoder, self.cfg, self.epoch, states,
                                self._next_worker)
        if self.cfg.num_workers == 0:
            items = iter(dataset)
        else:
            # Its own generator for the workers' base seed: drawn from torch's global RNG, creating the loader
            # mid-run (a resume) would shift every later dropout mask of the model.
            seed = seeded_rng(self.cfg.seed, self.epoch, self.cfg.rank, "loader").getrandbits(63)
            items = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=as_is,
                prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False, worker_init_fn=exit_with_parent,
                generator=torch.Generator().manual_seed(seed)))
        batches = 0
        for item in items:
            self._receive(item)
            if item["batch"] is not None:
                batches += 1
                yield from_transfer(item["batch"])
        if whole and not any(w.position for w in self._workers):
            self._stop_if_nothing_readable()
        self._end_epoch()
        return batches

    def _stop_if_nothing_readable(self) -> None:
        failed = Counter()
        for w in self._workers:
            failed.update({k: n for k, n in w.skips.items() if k in SHARD_FAILURES})
        if failed:
            counts = ", ".join(f"{n} {k}" for k, n in sorted(failed.items()))
            raise MedclipError(f"no training data could be read: every shard failed ({counts}; each is logged "
                               f"above); check the manifests with `medclip data check`")

    def _receive(self, item: dict) -> None:
        """Record a worker's message (before its batch is handed out) and whose message is due next."""
        worker = item["worker"]
        state = self._workers[worker]
        state.position, state.skips = item["position"], item["skips"]
        if item["final"]:
            state.finished = True
            self.decoder.tokenizer.add_words(item["words"])
        n = len(self._workers)
        due = [(worker + k) % n for k in range(1, n + 1) if not self._workers[(worker + k) % n].finished]
        self._next_worker = due[0] if due else 0

    def skip_counts(self) -> dict[str, int]:
        total = Counter(self._skips_before)
        for w in self._workers:
            total.update(w.skips)
        return dict(sorted(total.items()))

    def _identity(self) -> dict:
        """What the sample sequence depends on besides the state: must match for an exact resume."""
        return {"seed": self.cfg.seed, "num_workers": len(self._workers), "world_size": self.cfg.world_size,
                "rank": self.cfg.rank, "sources": [m.name for m in self.sources],
                "visits": [self.plan.visits.get(i, 0.0) for i in range(len(self.sources))]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "workers": [dataclasses.asdict(w) for w in self._workers],
                "next_worker": self._next_worker, "skips_before": dict(self._skips_before),
                "skips": self.skip_counts(), **self._identity()}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in self._identity().items():
            if state.get(key, mine if key == "visits" else None) != mine:  # checkpoints of 466328e lack "visits"
                raise MedclipError(f"cannot resume the data stream: {key} was {state.get(key)!r}, now {mine!r} "
                                   f"(exact resume needs the same seed, sources, weights, world size and workers)")
        self.epoch = int(state["epoch"])
        if "workers" in state:
            self._workers = [WorkerState(int(w["position"]), dict(w["skips"]), bool(w["finished"]))
                             for w in state["workers"]]
            self._next_worker = int(state["next_worker"])
            self._skips_before = Counter(state["skips_before"])
        else:  # a checkpoint of medclip <= 466328e: positions only, its worker order is lost
            self._workers = [WorkerState(int(p)) for p in state["positions"]]
            self._next_worker = 0
            self._skips_before = Counter(state.get("skips", {}))


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
