"""Grounding scores: does a concept's heatmap point into the finding's known box?

* pointing game: hit when the heatmap's maximum lies inside the box (Zhang et al.), optionally
  with a tolerance margin in pixels; a constant heatmap points nowhere and counts as a miss.
* energy in box: the share of the heatmap's mass inside the box after min-max scaling to [0, 1]
  (the energy-based pointing game of Score-CAM); 0 for a constant heatmap.
Heatmaps and boxes are in the pixels of the stored image; boxes are [x0, y0, x1, y1].
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from medclip.concepts.explain import explain
from medclip.concepts.scoring import ConceptScorer
from medclip.concepts.shards import expand_shards, iter_shard_samples
from medclip.errors import MedclipError

log = logging.getLogger(__name__)


def _box_slices(box: Sequence[float], height: int, width: int, margin: float = 0.0) -> tuple[slice, slice]:
    if len(box) != 4:
        raise MedclipError(f"a box is [x0, y0, x1, y1], got {list(box)}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0) or any(math.isnan(v) for v in (x0, y0, x1, y1)):
        raise MedclipError(f"empty or inverted box {list(box)}")
    cols = slice(max(0, math.floor(x0 - margin)), min(width, math.ceil(x1 + margin)))
    rows = slice(max(0, math.floor(y0 - margin)), min(height, math.ceil(y1 + margin)))
    if cols.start >= cols.stop or rows.start >= rows.stop:
        raise MedclipError(f"box {list(box)} lies outside the {width}x{height} image")
    return rows, cols


def _as_2d(heatmap) -> torch.Tensor:
    heat = torch.as_tensor(heatmap, dtype=torch.float32)
    if heat.ndim != 2:
        raise MedclipError(f"a heatmap is [H, W], got shape {tuple(heat.shape)}")
    if not torch.isfinite(heat).all():
        raise MedclipError("heatmap has NaN or infinite values")
    return heat


def pointing_game(heatmap, box: Sequence[float], tolerance: float = 0.0) -> bool:
    """True when the heatmap's maximum lies inside ``box`` (grown by ``tolerance`` pixels)."""
    heat = _as_2d(heatmap)
    rows, cols = _box_slices(box, *heat.shape, margin=tolerance)
    top = heat.max()
    if bool(top == heat.min()):
        return False
    return bool(heat[rows, cols].max() == top)


def energy_in_box(heatmap, box: Sequence[float]) -> float:
    """Share of the min-max scaled heatmap's mass inside ``box``, in [0, 1]."""
    heat = _as_2d(heatmap)
    rows, cols = _box_slices(box, *heat.shape)
    lo, hi = heat.min(), heat.max()
    if bool(hi == lo):
        return 0.0
    scaled = (heat - lo) / (hi - lo)
    return float(scaled[rows, cols].sum() / scaled.sum())


@dataclass
class GroundingRecord:
    image: object  # path, PIL image or array
    concept: str
    box: tuple[float, float, float, float]
    key: str = ""


@dataclass
class GroundingResult:
    n: int
    pointing_accuracy: float
    mean_energy: float
    method: str
    per_concept: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"n": self.n, "pointing_accuracy": self.pointing_accuracy, "mean_energy": self.mean_energy,
                "method": self.method, "per_concept": self.per_concept, "skipped": self.skipped}


def evaluate_grounding(encoder, records: Iterable[GroundingRecord], tolerance: float = 0.0,
                       use_heads: bool | None = None) -> GroundingResult:
    """Pointing-game accuracy and mean energy-in-box of ``encoder``'s concept maps over ``records``.

    Records of the same image are scored in one pass. A record with an unusable box is skipped and
    counted (``skipped``); an evaluation with no usable record is an error.
    """
    scorer = ConceptScorer(encoder, use_heads)
    by_image: dict[object, list[GroundingRecord]] = {}
    images: dict[object, object] = {}
    for record in records:
        ident = str(record.image) if isinstance(record.image, (str, Path)) else id(record.image)
        images.setdefault(ident, record.image)
        by_image.setdefault(ident, []).append(record)
    hits, energies, skipped = [], [], {}
    per_concept: dict[str, list[tuple[bool, float]]] = {}
    for ident, group in by_image.items():
        names = list(dict.fromkeys(r.concept for r in group))
        maps = explain(encoder, images[ident], names, scorer=scorer)
        heat = maps.source_heatmaps()
        for record in group:
            try:
                c = names.index(record.concept)
                hit = pointing_game(heat[c], record.box, tolerance)
                energy = energy_in_box(heat[c], record.box)
            except MedclipError as exc:
                reason = str(exc).split(" [")[0]
                skipped[reason] = skipped.get(reason, 0) + 1
                log.warning("grounding: skipping %s / %s: %s", record.key, record.concept, exc)
                continue
            hits.append(hit)
            energies.append(energy)
            per_concept.setdefault(record.concept, []).append((hit, energy))
    if not hits:
        raise MedclipError("no usable (image, concept, box) record to evaluate grounding on")
    summary = {name: {"n": len(v), "pointing_accuracy": sum(h for h, _ in v) / len(v),
                      "mean_energy": sum(e for _, e in v) / len(v)} for name, v in sorted(per_concept.items())}
    return GroundingResult(len(hits), sum(hits) / len(hits), sum(energies) / len(energies), scorer.method,
                           summary, skipped)


def grounding_records_from_shards(paths) -> list[GroundingRecord]:
    """One record per box of every sample with ``boxes`` in its JSON (the demo set's format)."""
    records: list[GroundingRecord] = []
    for shard in expand_shards(paths):
        for sample in iter_shard_samples(shard):
            boxes = (sample.get("json") or {}).get("boxes") or []
            if not boxes:
                continue
            if "image" not in sample:
                log.warning("grounding: %s has boxes but no image; skipped", sample.get("key"))
                continue
            try:
                image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
            except Exception as exc:  # PIL raises several types for broken images
                raise MedclipError(f"{shard}: image of {sample.get('key')} cannot be decoded: {exc}") from exc
            for box in boxes:
                name, bbox = box.get("name"), box.get("bbox")
                if not name or not isinstance(bbox, list) or len(bbox) != 4:
                    raise MedclipError(f"{shard}: {sample.get('key')} has a malformed box {box!r} "
                                       f"(want {{'cui', 'name', 'bbox': [x0, y0, x1, y1]}})")
                records.append(GroundingRecord(image, str(name), tuple(float(v) for v in bbox), sample["key"]))
    if not records:
        raise MedclipError("the shards hold no samples with boxes")
    return records
