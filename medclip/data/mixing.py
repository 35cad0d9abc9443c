"""Weighted mixing of sources: how often each source's samples are visited, and the interleaved order.

A source's weight is an upsampling factor, as open_clip's ``--train-data-upsampling-factors``: each
of its samples is visited ``weight`` times per epoch on average (1: once; 2: two reshuffled passes;
0.5: a random half, another half each epoch), so its share of the samples drawn is
``weight * size / sum(weight * size)``. An epoch is therefore ``sum(weight * size)`` samples over all
ranks and workers; ``epoch_samples`` rescales every weight by one factor to make it that many (the
shares stay). With every weight 1 and no ``epoch_samples``, an epoch reads each sample exactly once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medclip.data.manifest import Manifest, count_tar_samples, is_local
from medclip.data.slots import seeded_rng, source_samples
from medclip.data.stream_config import StreamConfig
from medclip.errors import MedclipError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixPlan:
    visits: dict[int, float]  # source index -> visits per sample this epoch (sources with weight > 0)
    draw_weights: dict[int, float]  # source index -> chance of being drawn next (∝ its samples this epoch)

    def shares(self) -> dict[int, float]:
        """Intended share of each source in the samples of an epoch."""
        total = sum(self.draw_weights.values())
        return {i: w / total for i, w in self.draw_weights.items()}


def source_size(m: Manifest) -> int | None:
    """The manifest's sample count; for local shards without one, counted from their tar headers."""
    if m.samples is not None:
        return m.samples
    if not all(is_local(u) and Path(u).is_file() for u in m.urls):
        return None
    log.info("counting the samples of %s (%d local shards; 'samples' in its manifest saves this)",
             m.name, len(m.urls))
    return sum(count_tar_samples(u) for u in m.urls)


def plan_mix(sources: list[Manifest], epoch_samples: int | None) -> MixPlan:
    """Visits per sample of each source (see the module doc) and the interleaving weights."""
    used = {i: m for i, m in enumerate(sources) if m.weight > 0}
    if not used:
        raise MedclipError("all data sources have weight 0")
    samples = {i: source_size(m) for i, m in used.items()}
    counted = all(n is not None for n in samples.values())
    if epoch_samples is not None and not counted:
        missing = next(used[i].name for i, n in samples.items() if n is None)
        raise MedclipError(f"data source {missing!r} has no sample count ('samples' in its manifest), needed "
                           f"to scale the weights to epoch_samples={epoch_samples}; add it or drop epoch_samples")
    # Interleave by samples per epoch; without counts, shards stand in for them.
    size = {i: samples[i] if counted else len(m.urls) for i, m in used.items()}
    scale = 1.0
    if epoch_samples is not None:
        scale = epoch_samples / sum(m.weight * size[i] for i, m in used.items())
    visits = {i: m.weight * scale for i, m in used.items()}
    return MixPlan(visits, {i: visits[i] * size[i] for i in used})


def raw_samples(sources: list[Manifest], plan: MixPlan, cfg: StreamConfig, epoch: int, slot: int, n_slots: int,
                skips: Counter) -> Iterator[dict]:
    """The deterministic sequence of undecoded samples of one slot for one epoch.

    The next sample comes from a source drawn with ``plan.draw_weights`` (seeded), through a seeded
    shuffle buffer of ``cfg.shuffle_buffer`` raw samples.
    """
    iters = {i: source_samples(sources[i], i, v, cfg, epoch, slot, n_slots, skips) for i, v in plan.visits.items()}
    mix_rng = seeded_rng(cfg.seed, epoch, slot, "mix")
    shuffle_rng = seeded_rng(cfg.seed, epoch, slot, "shuffle")
    buffer: list[dict] = []

    def draw() -> dict | None:
        while iters:
            keys = list(iters)
            i = keys[0] if len(keys) == 1 else mix_rng.choices(keys, [plan.draw_weights[k] for k in keys])[0]
            try:
                return next(iters[i])
            except StopIteration:
                del iters[i]
        return None

    while True:
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
