"""Which raw samples each slot (one loader worker of one rank) reads in an epoch, and in what order.

The sequence depends on (seed, epoch, slot) only, so it can be replayed after a resume.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

from medclip.data.manifest import Manifest
from medclip.data.shard_reader import read_shard
from medclip.data.stream_config import StreamConfig


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


def source_samples(m: Manifest, source_index: int, cfg: StreamConfig, epoch: int, slot: int, n_slots: int,
                   cycle: bool, skips: Counter) -> Iterator[dict]:
    pass_index = 0
    while True:
        rng = seeded_rng(cfg.seed, epoch, source_index, pass_index)
        produced = 0
        for url, keep, report in slot_shards(m.urls, rng, slot, n_slots, cfg.shuffle_shards):
            for sample in read_shard(url, keep, skips, report):
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
    iters = {i: source_samples(m, i, cfg, epoch, slot, n_slots, cycle, skips)
             for i, m in enumerate(sources) if m.weight > 0}
    weights = {i: sources[i].weight for i in iters}
    quota = None
    if cycle:
        quota = cfg.epoch_samples // n_slots + (1 if slot < cfg.epoch_samples % n_slots else 0)
    mix_rng = seeded_rng(cfg.seed, epoch, slot, "mix")
    shuffle_rng = seeded_rng(cfg.seed, epoch, slot, "shuffle")
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
