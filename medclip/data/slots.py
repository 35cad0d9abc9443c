"""Which shards and samples each slot (one loader worker of one rank) reads in an epoch.

Every loader worker of every rank is a *slot* (``rank * workers + worker`` of ``world_size *
workers``). A source is read in passes; each pass shuffles the source's shard list with an RNG of
(seed, epoch, source, pass) — the same list in every slot — and deals it out: with at least as
many shards as slots, slot ``s`` reads shards ``s, s + S, ...``; with fewer, the slots sharing a
shard take every k-th sample of it. So in one pass every sample is read by exactly one slot, no
slot idles, and nothing depends on timing: the sequence can be replayed after a resume.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterator

from medclip.data.manifest import Manifest
from medclip.data.shard_reader import read_shard
from medclip.data.stream_config import StreamConfig

THIN_BLOCK = 64  # raw samples among which a partial pass picks its share at random


def seeded_rng(*parts) -> random.Random:
    # random.Random seeds from a str deterministically (not via the salted hash()).
    return random.Random("/".join(str(p) for p in parts))


def slot_shards(urls: list[str], rng: random.Random, slot: int, n_slots: int, shuffle: bool):
    """(url, keep(sample_index), report) triples this slot reads; ``report``: it counts the shard's failures.

    With fewer shards than slots, the k slots sharing a shard take every k-th sample of it, and the
    first of them alone counts a failure of the shard (it is one shard failing, not k).
    """
    urls = list(urls)
    if shuffle:
        rng.shuffle(urls)
    n = len(urls)
    if n >= n_slots:
        return [(u, lambda i: True, True) for u in urls[slot::n_slots]]
    shard = slot % n
    sharing = len(range(shard, n_slots, n))
    rank_in_shard = slot // n
    return [(urls[shard], lambda i, k=sharing, r=rank_in_shard: i % k == r, rank_in_shard == 0)]


def thinned(samples: Iterator[dict], fraction: float, rng: random.Random) -> Iterator[dict]:
    """``floor(n * fraction + phase)`` of the ``n`` samples (phase uniform in [0, 1): n * fraction on average).

    The samples are taken in blocks of :data:`THIN_BLOCK`; each block keeps its exact share, chosen at
    random, so the count is exact without knowing ``n`` and the kept samples are spread over the pass.
    """
    phase = rng.random()
    seen = 0
    block: list[dict] = []

    def pick() -> list[dict]:
        keep = math.floor((seen + len(block)) * fraction + phase) - math.floor(seen * fraction + phase)
        return [block[j] for j in sorted(rng.sample(range(len(block)), keep))]

    for sample in samples:
        block.append(sample)
        if len(block) == THIN_BLOCK:
            yield from pick()
            seen += len(block)
            block = []
    yield from pick()


def source_samples(m: Manifest, source_index: int, visits: float, cfg: StreamConfig, epoch: int, slot: int,
                   n_slots: int, skips: Counter) -> Iterator[dict]:
    """The slot's raw samples of one source for one epoch: ``visits`` passes over the source.

    ``floor(visits)`` whole passes, then a random ``visits % 1`` of a last one; each pass deals out a
    newly shuffled shard list.
    """
    for pass_index in range(math.ceil(visits)):
        rng = seeded_rng(cfg.seed, epoch, source_index, pass_index)
        shards = slot_shards(m.urls, rng, slot, n_slots, cfg.shuffle_shards)
        samples = _pass_samples(shards, source_index, skips, cfg.allow_pipe)
        fraction = min(1.0, visits - pass_index)
        if fraction < 1.0:
            samples = thinned(samples, fraction, seeded_rng(cfg.seed, epoch, source_index, pass_index, slot, "thin"))
        yield from samples


def _pass_samples(shards, source_index: int, skips: Counter, allow_commands: bool) -> Iterator[dict]:
    for url, keep, report in shards:
        for sample in read_shard(url, keep, skips, report, allow_commands):
            sample["__source__"] = source_index
            yield sample
