"""Does a shard hold its samples in long same-label blocks? (``medclip data check`` warns when it does.)

The loader mixes a shard's samples only through a bounded shuffle buffer: a shard written from a
table sorted by label, or from a class folder class by class, yields batches of one label (false
negatives for the contrastive loss, one-modality BatchNorm statistics). The labels looked at are a
sample's ``modality`` and each scalar field of its ``labels`` (its ``.json`` member), where the shard
holds between 2 and ``MAX_VALUES`` distinct values (an id per case is not a label to mix).

Runs test: in a random order of ``n`` samples with ``n_k`` of value ``k``, the expected number of runs
(maximal blocks of one value) is ``n - sum n_k (n_k - 1) / n``. A field with fewer than half of that
(blocks twice as long as chance, on average) is reported; random orders come nowhere near it once a
shard holds ``MIN_SAMPLES`` (the runs count's spread is about its square root). It is a warning, not a
failure: the shards are readable and some orders are deliberate.
"""

from __future__ import annotations

import json
from collections import Counter

MAX_VALUES = 20
MIN_SAMPLES = 32


def sample_labels(sample: dict) -> dict[str, str]:
    """The categorical fields of one raw sample (its ``json`` member); empty when it has none."""
    try:
        meta = json.loads(sample.get("json") or b"{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    labels = meta.get("labels") if isinstance(meta.get("labels"), dict) else {}
    fields = {**labels, **({"modality": meta["modality"]} if meta.get("modality") else {})}
    return {k: str(v) for k, v in fields.items() if isinstance(v, (str, int, bool)) and v != ""}


def expected_runs(counts: Counter) -> float:
    n = sum(counts.values())
    return n - sum(c * (c - 1) for c in counts.values()) / n


def blocked_fields(labels: list[dict[str, str]]) -> list[tuple[str, int, float]]:
    """(field, runs, runs expected in random order) of each field that runs in long blocks, worst first."""
    found = []
    if len(labels) < MIN_SAMPLES:
        return found
    for name in sorted({k for row in labels for k in row}):
        values = [row.get(name, "") for row in labels]
        counts = Counter(values)
        if not 2 <= len(counts) <= MAX_VALUES:
            continue
        runs = 1 + sum(a != b for a, b in zip(values, values[1:]))
        expected = expected_runs(counts)
        if runs < expected / 2:
            found.append((name, runs, expected))
    return sorted(found, key=lambda f: f[1] / f[2])


def order_warning(source: str, shard: str, labels: list[dict[str, str]]) -> str | None:
    """One line naming a shard whose samples run in long same-label blocks (None when none do)."""
    blocked = blocked_fields(labels)
    if not blocked:
        return None
    name, runs, expected = blocked[0]
    also = f" (also {', '.join(f[0] for f in blocked[1:])})" if len(blocked) > 1 else ""
    return (f"{source}: shard {shard}: {len(labels)} samples in {runs} same-{name} blocks where a random order "
            f"has ~{expected:.0f}{also}; batches will be drawn from few labels: rebuild it with "
            f"`medclip shards build` (shuffled by default)")
