"""Grounding scores: does a concept's heatmap point into the finding's known box?

* pointing game: hit when the heatmap's maximum lies inside the box (Zhang et al.), optionally
  with a tolerance margin in pixels; a constant heatmap points nowhere and counts as a miss.
* energy in box: the share of the heatmap's mass inside the box after min-max scaling to [0, 1]
  (the energy-based pointing game of Score-CAM); 0 for a constant heatmap.
Heatmaps and boxes are in the pixels of the stored image; boxes are [x0, y0, x1, y1].
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from medclip.concepts.explain import explain
from medclip.concepts.scoring import ConceptScorer
from medclip.concepts.shards import expand_shards, iter_shard_samples, sample_image
from medclip.errors import MedclipError
from medclip.imaging import load_image

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
    # One entry per scored record (key, concept, box, hit, energy): to compare methods box by box.
    per_record: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"n": self.n, "pointing_accuracy": self.pointing_accuracy, "mean_energy": self.mean_energy,
                "method": self.method, "per_concept": self.per_concept, "skipped": self.skipped,
                "per_record": self.per_record}


def _image_size(image) -> tuple[int, int]:
    """(width, height) of a record's image (as ``explain`` reads it) without running a model."""
    return (image if isinstance(image, Image.Image) else load_image(image)).size


def _random_point(width: int, height: int, box, tolerance: float) -> tuple[float, float]:
    """A uniformly random pixel: P(hit) is the share of pixels in the grown box; its expected energy
    (all the mass on that pixel) is the share of pixels in the box itself."""
    rows, cols = _box_slices(box, height, width, margin=tolerance)
    inner_rows, inner_cols = _box_slices(box, height, width)
    area = width * height
    return ((rows.stop - rows.start) * (cols.stop - cols.start) / area,
            (inner_rows.stop - inner_rows.start) * (inner_cols.stop - inner_cols.start) / area)


def _centre_point(width: int, height: int, box, tolerance: float) -> tuple[float, float]:
    """All the heatmap's mass on the image's centre pixel."""
    heat = torch.zeros(height, width)
    heat[height // 2, width // 2] = 1.0
    return float(pointing_game(heat, box, tolerance)), energy_in_box(heat, box)


# Model-free references for the pointing game: name -> (width, height, box, tolerance) -> (hit, energy).
GROUNDING_BASELINES = {"random": _random_point, "centre": _centre_point}


def baseline_grounding(records: Iterable[GroundingRecord], kind: str, tolerance: float = 0.0) -> GroundingResult:
    """Pointing game and energy of a model-free reference (expected values for ``random``)."""
    if kind not in GROUNDING_BASELINES:
        raise MedclipError(f"unknown grounding baseline {kind!r}; known: {sorted(GROUNDING_BASELINES)}")
    score = GROUNDING_BASELINES[kind]
    sizes: dict[object, tuple[int, int]] = {}
    scored: list[tuple[GroundingRecord, float, float]] = []
    skipped: dict[str, int] = {}
    for record in records:
        ident = str(record.image) if isinstance(record.image, (str, Path)) else id(record.image)
        if ident not in sizes:
            sizes[ident] = _image_size(record.image)
        try:
            scored.append((record, *score(*sizes[ident], record.box, tolerance)))
        except MedclipError as exc:
            _count_skip(skipped, record, exc)
    return _summarize(scored, kind, skipped)


def _fractional_boxes(fit_records: Iterable[GroundingRecord]) -> list[tuple[str, tuple[float, ...]]]:
    """(concept, box as fractions of its own image's width and height), each image's size read once."""
    sizes: dict[str, tuple[int, int]] = {}  # a file holding several boxes is opened once
    boxes = []
    for record in fit_records:
        if isinstance(record.image, Image.Image):
            fit_w, fit_h = record.image.size
        else:
            path = str(record.image)
            if path not in sizes:
                sizes[path] = _image_size(path)
            fit_w, fit_h = sizes[path]
        x0, y0, x1, y1 = record.box
        boxes.append((record.concept, (x0 / fit_w, y0 / fit_h, x1 / fit_w, y1 / fit_h)))
    return boxes


def box_prior_maps(fractional_boxes: Iterable[tuple[str, tuple[float, ...]]], width: int,
                   height: int) -> dict[str, torch.Tensor]:
    """Per concept, how many of the boxes (``_fractional_boxes``) cover each pixel of a ``width`` x
    ``height`` image: where that concept's findings usually are."""
    maps: dict[str, torch.Tensor] = {}
    for concept, (x0, y0, x1, y1) in fractional_boxes:
        rows, cols = _box_slices((x0 * width, y0 * height, x1 * width, y1 * height), height, width)
        maps.setdefault(concept, torch.zeros(height, width))[rows, cols] += 1.0
    return maps


def prior_grounding(fit_records: Iterable[GroundingRecord], records: Iterable[GroundingRecord],
                    tolerance: float = 0.0) -> GroundingResult:
    """Pointing game and energy of the concept prior: for every image, the concept's box-coverage map over
    ``fit_records`` (e.g. the training split), the same map whatever the image shows. A model whose maps
    beat it looks at the image; one that only matches it has learned where a finding usually is. On a flat
    top every pixel counts as the maximum, which favours the prior."""
    fitted = _fractional_boxes(fit_records)
    priors: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # one set of maps per image size
    scored: list[tuple[GroundingRecord, float, float]] = []
    skipped: dict[str, int] = {}
    for record in records:
        width, height = _image_size(record.image)
        if (width, height) not in priors:
            priors[width, height] = box_prior_maps(fitted, width, height)
        try:
            if record.concept not in priors[width, height]:
                raise MedclipError(f"no box of {record.concept!r} in the records the prior is fitted on")
            heat = priors[width, height][record.concept]
            scored.append((record, float(pointing_game(heat, record.box, tolerance)), energy_in_box(heat, record.box)))
        except MedclipError as exc:
            _count_skip(skipped, record, exc)
    return _summarize(scored, "prior", skipped)


def _count_skip(skipped: dict[str, int], record: GroundingRecord, exc: MedclipError) -> None:
    reason = str(exc).split(" [")[0]
    skipped[reason] = skipped.get(reason, 0) + 1
    log.warning("grounding: skipping %s / %s: %s", record.key, record.concept, exc)


def _summarize(scored: list[tuple[GroundingRecord, float, float]], method: str, skipped: dict) -> GroundingResult:
    if not scored:
        raise MedclipError("no usable (image, concept, box) record to evaluate grounding on")
    per_concept: dict[str, list[tuple[float, float]]] = {}
    for record, hit, energy in scored:
        per_concept.setdefault(record.concept, []).append((hit, energy))
    summary = {name: {"n": len(v), "pointing_accuracy": sum(h for h, _ in v) / len(v),
                      "mean_energy": sum(e for _, e in v) / len(v)} for name, v in sorted(per_concept.items())}
    n = len(scored)
    per_record = [{"key": record.key, "concept": record.concept, "box": list(record.box), "hit": float(hit),
                   "energy": energy} for record, hit, energy in scored]
    return GroundingResult(n, sum(float(h) for _, h, _ in scored) / n, sum(e for _, _, e in scored) / n, method,
                           summary, skipped, per_record)


def evaluate_grounding(encoder, records: Iterable[GroundingRecord], tolerance: float = 0.0,
                       use_heads: bool | None = None, stride: int | None = None) -> GroundingResult:
    """Pointing-game accuracy and mean energy-in-box of ``encoder``'s concept maps over ``records``
    (maps every ``stride`` input pixels by shift-and-stitch, ``explain``; default one per patch).

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
    scored: list[tuple[GroundingRecord, float, float]] = []
    skipped: dict[str, int] = {}
    for ident, group in by_image.items():
        names = list(dict.fromkeys(r.concept for r in group))
        heat = explain(encoder, images[ident], names, scorer=scorer, stride=stride).source_heatmaps()
        for record in group:
            c = names.index(record.concept)
            try:
                scored.append((record, float(pointing_game(heat[c], record.box, tolerance)),
                               energy_in_box(heat[c], record.box)))
            except MedclipError as exc:
                _count_skip(skipped, record, exc)
    return _summarize(scored, scorer.method, skipped)


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
            image = sample_image(sample, shard)
            for box in boxes:
                name, bbox = box.get("name"), box.get("bbox")
                if not name or not isinstance(bbox, list) or len(bbox) != 4:
                    raise MedclipError(f"{shard}: {sample.get('key')} has a malformed box {box!r} "
                                       f"(want {{'cui', 'name', 'bbox': [x0, y0, x1, y1]}})")
                records.append(GroundingRecord(image, str(name), tuple(float(v) for v in bbox), sample["key"]))
    if not records:
        raise MedclipError("the shards hold no samples with boxes")
    return records
