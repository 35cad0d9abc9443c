"""Planted findings on real images: a grounding split with real anatomy around findings of known place.

Real chest X-rays and CT slices (COVID-19 collection) and CT/MRI slices (MedPix) of ``../shared/data`` are
read in place, made square (zero padding) at ``image_size``, and one or two lesion-like findings of known shape
and contrast are painted into each at a random position inside the body region (the thresholded image with its
holes filled, so the lungs count as body). Boxes (``{cui, name, bbox}``, plus the finding's contrast) and
captions naming the findings and the image's real modality and view are written as shards in the demo set's
format, so PC-Align trains on them and ``evaluate_grounding`` scores them. The training side is the tables'
train splits, the held-out side their test/dev splits (split by patient and by case in ``../shared/data``;
checked again here). The findings are SYNTHETIC; the images' real findings are not labelled.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medclip.data.builder import BuildConfig, BuildReport, build_shards, write_prefix_manifest
from medclip.data.demo import CUIS
from medclip.data.records import RecordError, SourceRecord
from medclip.errors import MedclipError
from medclip.imaging import load_image

# Table folder under the data root -> (training table, held-out table, the field naming a patient or case).
SOURCES = {"covid-cxr": ("train.jsonl", "test.jsonl", "patient_id"), "medpix": ("train.jsonl", "dev.jsonl", "case_id")}


@dataclass(frozen=True)
class Lesion:
    """A finding's look: soft-edged ``shape`` of ``radius`` (fractions of the image side), moving the local
    mean intensity by ``contrast`` (fraction of full scale; negative: darker)."""

    name: str
    cui: str
    shape: str  # blob (round) | patch (an ellipse at a random angle) | line (a thin stroke at a random angle)
    radius: tuple[float, float]
    contrast: float


LESIONS = (
    Lesion("nodule", CUIS["nodule"], "blob", (0.03, 0.045), 0.35),
    Lesion("mass", CUIS["mass"], "blob", (0.07, 0.1), 0.3),
    Lesion("consolidation", "C0521530", "patch", (0.08, 0.12), 0.22),  # a dense region, as an effusion looks
    Lesion("cyst", CUIS["cyst"], "blob", (0.04, 0.07), -0.35),  # a dark hole
    Lesion("fracture", CUIS["fracture"], "line", (0.06, 0.1), -0.4),
)
MIN_CONTRAST_SHARE = 0.6  # a place where clipping leaves less of the nominal contrast is redrawn
PLACE_TRIES = 30


@dataclass
class PlantedConfig:
    root: Path  # the data root (../shared/data)
    image_size: int = 96
    seed: int = 0
    n_train: int | None = None  # None: every image of the training tables
    n_val: int | None = None  # None: every image of the held-out tables
    max_findings: int = 2  # findings per image: 1 .. max_findings, distinct, boxes apart


def _rows(root: Path, side: int) -> list[tuple[str, dict]]:
    """(folder, row) of every table on one side (0: training, 1: held-out)."""
    rows = []
    for folder, tables in SOURCES.items():
        path = root / folder / tables[side]
        if not path.is_file():
            raise MedclipError(f"planted findings need {path} (the shared data's {folder} tables)")
        with open(path) as f:
            rows += [(folder, json.loads(line)) for line in f if line.strip()]
    return rows


def _check_apart(train: list[tuple[str, dict]], held_out: list[tuple[str, dict]]) -> None:
    """No patient (COVID-19) or case (MedPix) on both sides, and none unnamed (it could be on both)."""
    for folder, (*tables, field) in SOURCES.items():
        for table, side in zip(tables, (train, held_out)):
            if unnamed := sum(1 for f, r in side if f == folder and not r.get(field)):
                raise MedclipError(f"{folder}: {unnamed} row(s) of {table} have no {field}: planted findings cannot "
                                   f"keep their patients apart from the other side")
        ids = [{str(r.get(field)) for f, r in side if f == folder} for side in (train, held_out)]
        if both := ids[0] & ids[1]:
            raise MedclipError(f"{folder}: {len(both)} {field}(s) are in both the training and the held-out table, "
                               f"e.g. {sorted(both)[0]}: planted findings keep them apart")


def _square_gray(path: Path, size: int) -> np.ndarray:
    """The image in [0, 1], zero-padded to a square and resized to ``size``."""
    image = load_image(path).convert("L")
    side = max(image.size)
    square = Image.new("L", (side, side))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return np.asarray(square.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64, range=(0.0, 1.0))
    weights = np.cumsum(hist)
    means = np.cumsum(hist * edges[:-1])
    total, total_mean = weights[-1], means[-1]
    between = (total_mean * weights - means * total) ** 2 / np.maximum(weights * (total - weights), 1)
    return float(edges[int(np.argmax(between[:-1])) + 1])


def body_mask(gray: np.ndarray) -> np.ndarray:
    """Pixels of the body: the smoothed image above its Otsu threshold, holes (lungs, air in the bowel) filled."""
    smooth = Image.fromarray((gray * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    inside = np.asarray(smooth, np.float32) / 255.0 > _otsu(np.asarray(smooth) / 255.0)
    padded = Image.fromarray(np.pad(inside, 1).astype(np.uint8) * 255).copy()  # a copy: floodfill cannot write
    # into an image that shares the array's memory, and would leave it as it was
    ImageDraw.floodfill(padded, (0, 0), 128)  # the background is what the border reaches
    return (np.asarray(padded) != 128)[1:-1, 1:-1]


def _allowed_centres(body: np.ndarray, reach: int) -> np.ndarray:
    """(row, col) of the pixels whose ``reach``-pixel square neighbourhood is body."""
    eroded = Image.fromarray(body.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * reach + 1))
    return np.argwhere(np.asarray(eroded) > 0)


def _profile(lesion: Lesion, n: int, cx: float, cy: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """The lesion's weight per pixel in [0, 1]: 1 in its core, falling off smoothly over its outer third (a soft
    edge, at least two pixels wide) to 0 outside."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if lesion.shape == "blob":
        dist = np.hypot(dx, dy) - radius
    else:
        angle = rng.uniform(0, np.pi)
        along = dx * np.cos(angle) + dy * np.sin(angle)
        across = -dx * np.sin(angle) + dy * np.cos(angle)
        if lesion.shape == "patch":
            dist = (np.hypot(along / radius, across / (0.55 * radius)) - 1.0) * 0.55 * radius
        else:  # a line of the radius' half-length, about one pixel wide
            dist = np.maximum(np.abs(along) - radius, np.abs(across) - 0.6)
    edge = max(2.0, radius / 3) if lesion.shape != "line" else 1.0
    ramp = np.clip(0.5 - dist / edge, 0.0, 1.0)
    return ramp * ramp * (3 - 2 * ramp)  # smoothstep


def _plant(gray: np.ndarray, lesion: Lesion, centres: np.ndarray, taken: list[tuple], rng: np.random.Generator):
    """Add one lesion at a random allowed centre whose box is apart from ``taken`` and where clipping leaves most
    of its contrast; (image, box in pixels, mean contrast reached inside) or None when no place was found."""
    n = gray.shape[0]
    radius = rng.uniform(*lesion.radius) * n
    for _ in range(PLACE_TRIES):
        row, col = centres[rng.integers(len(centres))]
        mask = _profile(lesion, n, col + 0.5, row + 0.5, radius, rng)
        ys, xs = np.nonzero(mask > 0.5)
        if len(xs) == 0:
            continue
        box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        if any(box[0] < t[2] and t[0] < box[2] and box[1] < t[3] and t[1] < box[3] for t in taken):
            continue
        planted = np.clip(gray + lesion.contrast * mask, 0.0, 1.0)  # added: the texture underneath stays
        reached = float((planted - gray)[mask > 0.5].mean())
        if abs(reached) < MIN_CONTRAST_SHARE * abs(lesion.contrast):
            continue
        return planted, box, round(reached, 3)
    return None


def _describe(folder: str, row: dict) -> tuple[str, str]:
    """(the image's real modality, a phrase naming it with its view and region)."""
    modality = str(row.get("modality") or ("X-ray" if folder == "covid-cxr" else "CT"))
    if folder == "covid-cxr":
        view = row.get("view") or ""
        return modality, (f"{view} chest {modality}" if view else f"chest {modality}").strip()
    plane = str(row.get("plane") or "").lower()
    region = str(row.get("location_category") or "body").lower()
    return modality, " ".join(p for p in (plane, modality, "of the", region) if p)


def _captions(modality: str, phrase: str, names: list[str]) -> tuple[list[str], list[dict]]:
    listed = " and ".join(f"a {name}" for name in names)
    texts = [f"{phrase[:1].upper()}{phrase[1:]} showing {listed}.",
             f"{' and '.join(names).capitalize()} on {phrase}.",
             f"{modality}: {', '.join(names)}."]
    concepts = []
    for idx, text in enumerate(texts):
        start = 0
        for name in names:
            start = text.lower().index(name, start)
            concepts.append({"start": start, "end": start + len(name), "cui": _CUI[name], "name": name,
                             "caption_index": idx})
            start += len(name)
    return texts, concepts


_CUI = {lesion.name: lesion.cui for lesion in LESIONS}


def _record(folder: str, row: dict, cfg: PlantedConfig, rng: np.random.Generator, prefix: str, index: int):
    path = cfg.root / folder / str(row.get("image", ""))
    try:
        gray = _square_gray(path, cfg.image_size)
    except (OSError, ValueError, MedclipError) as exc:
        return RecordError("unreadable_image", f"{path}: {exc}")
    wanted = int(rng.integers(1, cfg.max_findings + 1))
    body = body_mask(gray)
    boxes, names = [], []
    for k in rng.permutation(len(LESIONS)):  # the next kind when one finds no place (a dark hole on a dark image)
        if len(boxes) == wanted:
            break
        lesion = LESIONS[int(k)]
        centres = _allowed_centres(body, int(np.ceil(lesion.radius[1] * cfg.image_size)) + 1)
        planted = _plant(gray, lesion, centres, [b["bbox"] for b in boxes], rng) if len(centres) else None
        if planted is None:
            continue
        gray, box, contrast = planted
        boxes.append({"cui": lesion.cui, "name": lesion.name, "bbox": [round(v, 1) for v in box],
                      "contrast": contrast})
        names.append(lesion.name)
    if not boxes:
        return RecordError("no_body_region", f"{path}: no place inside the body region for a finding")
    modality, phrase = _describe(folder, row)
    captions, concepts = _captions(modality, phrase, names)
    labels = {"modality": modality, "view": str(row.get("view") or row.get("plane") or ""),
              "region": str(row.get("location_category") or "chest"), "findings": names, "dataset": folder,
              "image": str(row.get("image", "")), "case": str(row.get(SOURCES[folder][2]) or "")}
    pixels = (np.clip(gray, 0, 1) * 255).round().astype(np.uint8)
    return SourceRecord(image=Image.fromarray(np.stack([pixels] * 3, -1), "RGB"), captions=captions, labels=labels,
                        modality=modality, source=f"medclip planted findings on {folder}",
                        licence=str(row.get("license") or "research and testing only (../shared/data)"),
                        concepts=concepts, boxes=boxes, origin=f"{prefix}:{index} ({path})")


def planted_records(rows: list[tuple[str, dict]], cfg: PlantedConfig, seed: int, n: int | None,
                    prefix: str) -> Iterator[SourceRecord | RecordError]:
    """Records of ``n`` rows (a seeded draw without repeats; None: all, in a seeded order)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))[: len(rows) if n is None else n]
    for index, i in enumerate(order):
        folder, row = rows[int(i)]
        yield _record(folder, row, cfg, rng, prefix, index)


def build_planted(out_dir: str | Path, cfg: PlantedConfig) -> dict[str, BuildReport]:
    """Write ``planted-train`` and ``planted-val`` shards, summaries and manifests (``planted-train.yaml``...);
    returns each split's build report (samples, skips). Train and val draw from disjoint random streams
    (seed, seed + 10**6) and from different tables."""
    if cfg.image_size < 32:
        raise MedclipError(f"planted findings need --image-size >= 32, got {cfg.image_size}")
    if not 1 <= cfg.max_findings <= len(LESIONS):  # an image's findings are distinct kinds
        raise MedclipError(f"planted findings need --max-findings from 1 to {len(LESIONS)} (the kinds of finding: "
                           f"{', '.join(lesion.name for lesion in LESIONS)}), got {cfg.max_findings}")
    for n in (cfg.n_train, cfg.n_val):
        if n is not None and n < 1:
            raise MedclipError(f"planted findings need --n-train and --n-val >= 1, got {n}")
    root = Path(cfg.root)
    cfg = dataclasses.replace(cfg, root=root)
    train, held_out = _rows(root, 0), _rows(root, 1)
    _check_apart(train, held_out)
    out = Path(out_dir)
    reports = {}
    for split, rows, n, seed in (("train", train, cfg.n_train, cfg.seed), ("val", held_out, cfg.n_val,
                                                                           cfg.seed + 10**6)):
        prefix = f"planted-{split}"
        report = reports[split] = build_shards(planted_records(rows, cfg, seed, n, prefix),
                              BuildConfig(out, prefix=prefix, max_samples=500, jpeg_quality=95, shuffle_seed=None))
        write_prefix_manifest(report, prefix, modality="mixed", weight=1.0, caption_fields=["captions", "txt"],
                              concept_field="concepts", split=split,
                              licence="per image (../shared/data); research and testing only",
                              citation="medclip planted findings on COVID-19 image data collection and MedPix 2.0")
    return reports
