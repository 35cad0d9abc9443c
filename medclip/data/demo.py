"""Embedded demo set: a SYNTHETIC image-text-concept collection generated offline in seconds.

It is not medical data. It exists so pretraining, tests and evaluation run anywhere without a
download, and it is built to be learnable by a tiny CLIP: six modalities with distinct
appearance (X-ray radiograph, CT slice, MRI slice, ultrasound fan, histology patch, fundus
photo), a finding drawn as a visible shape at a known box (stored in ``KEY.json`` as ``boxes``),
laterality (left/right half of the image; radiological convention: the patient's left is the
image's right for X-ray, CT and MRI) and captions that name modality, finding, side and anatomy,
with concept spans carrying real UMLS CUIs (negated mentions for normal studies).

Labels in ``KEY.json`` (used by the zero-shot ``demo`` suite): ``modality`` (one of
:data:`MODALITIES`), ``finding`` (one of :data:`FINDINGS`), ``laterality`` (left/right/none),
``anatomy``.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medclip.data.builder import BuildConfig, build_shards
from medclip.data.records import SourceRecord
from medclip.data.tar_samples import member_groups, sample_parts
from medclip.errors import MedclipError

MODALITIES = ("X-ray", "CT", "MRI", "ultrasound", "histology", "fundus")

# Finding name -> UMLS CUI (well-known concepts).
CUIS = {
    "pneumothorax": "C0032326",
    "pleural effusion": "C0032227",
    "nodule": "C0028259",
    "mass": "C0577559",
    "fracture": "C0016658",
    "cardiomegaly": "C0018800",
    "cyst": "C0010709",
    "hemorrhage": "C0019080",
    "carcinoma": "C0007097",
}
FINDINGS = ("normal", *CUIS)

# Per modality: anatomy named in captions, the findings it can show, caption words for the modality.
_SPEC = {
    "X-ray": ("chest", ("normal", "pneumothorax", "pleural effusion", "nodule", "cardiomegaly", "fracture"),
              ("chest radiograph", "chest X-ray", "frontal radiograph of the chest")),
    "CT": ("lung", ("normal", "nodule", "mass", "pleural effusion"),
           ("axial CT slice", "CT of the chest", "computed tomography image")),
    "MRI": ("brain", ("normal", "mass", "hemorrhage"),
            ("brain MRI", "axial MRI slice of the brain", "magnetic resonance image of the head")),
    "ultrasound": ("liver", ("normal", "cyst", "mass"),
                   ("ultrasound image", "abdominal ultrasound", "sonogram of the liver")),
    "histology": ("tissue", ("normal", "carcinoma"),
                  ("histology patch", "H&E stained histopathology slide", "microscopy image of tissue")),
    "fundus": ("retina", ("normal", "hemorrhage"),
               ("fundus photograph", "retinal fundus image", "color fundus photo")),
}
_LATERAL = {"pneumothorax", "pleural effusion", "nodule", "fracture", "mass", "cyst", "hemorrhage"}
# Where a finding sits in the image. anatomical: at its usual place (an effusion at a lung base), so a model-free
# map of where each concept's boxes lie predicts it. random: the same scene moved as a whole so that the finding's
# box centre lands at a uniformly random point of the image, drawn independently of the concept; the finding
# keeps its place in the anatomy (inside the lung, the brain, the fan), the anatomy moves with it.
LAYOUTS = ("anatomical", "random")
_RANDOM_CENTRE = (0.05, 0.95)  # box centres of the random layout: uniform over this square (fractions)


@dataclass
class DemoSample:
    key: str
    image: Image.Image
    captions: list[str]
    labels: dict
    boxes: list[dict]
    concepts: list[dict]


def _grid(n: int):
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return x, y


def _disk(x, y, cx, cy, r):
    return ((x - cx) ** 2 + (y - cy) ** 2) < r * r


@dataclass
class _Scene:
    """What one modality painter needs: the pixel grid, the finding and where it sits."""

    x: np.ndarray  # [n, n] column coordinate in [0, 1)
    y: np.ndarray  # [n, n] row coordinate in [0, 1)
    finding: str
    cx: float  # the finding's centre (fractions of the image)
    cy: float
    rng: np.random.Generator

    @property
    def n(self) -> int:
        return self.x.shape[0]


def _finding_centre(modality: str, side: str, rng: np.random.Generator) -> tuple[float, float]:
    """Left/right half of the image for the side (radiological convention for X-ray, CT and MRI)."""
    image_right = (side == "left") if modality in ("X-ray", "CT", "MRI") else (side == "right")
    cx = (0.68 if image_right else 0.32) + rng.uniform(-0.05, 0.05)
    return cx, rng.uniform(0.35, 0.65)


def _gray(g: np.ndarray) -> np.ndarray:
    return np.stack([g] * 3, -1)


def _paint_xray(s: _Scene):
    x, y, cx, cy = s.x, s.y, s.cx, s.cy
    g = np.full((s.n, s.n), 0.85, np.float32)
    lungs = _disk(x / 0.8, y / 1.2, 0.34 / 0.8, 0.5 / 1.2, 0.19) | _disk(x / 0.8, y / 1.2, 0.66 / 0.8, 0.5 / 1.2, 0.19)
    g[lungs] = 0.25
    heart_r = 0.17 if s.finding == "cardiomegaly" else 0.1
    g[_disk(x, y, 0.52, 0.62, heart_r)] = 0.8
    for k in range(5):  # ribs
        g[np.abs(y - (0.3 + 0.09 * k) - 0.05 * np.abs(x - 0.5)) < 0.008] += 0.15
    g[(x < 0.05) | (x > 0.95)] = 0.05
    box = None
    if s.finding == "cardiomegaly":
        box = (0.52 - heart_r, 0.62 - heart_r, 0.52 + heart_r, 0.62 + heart_r)
    elif s.finding == "pneumothorax":
        g[lungs & (np.abs(x - cx) < 0.12) & (y < 0.45)] = 0.02
        box = (cx - 0.12, 0.25, cx + 0.12, 0.45)
    elif s.finding == "pleural effusion":
        g[lungs & (np.abs(x - cx) < 0.16) & (y > 0.6)] = 0.75
        box = (cx - 0.16, 0.6, cx + 0.16, 0.75)
    elif s.finding == "nodule":
        g[_disk(x, y, cx, cy, 0.04)] = 0.95
        box = (cx - 0.04, cy - 0.04, cx + 0.04, cy + 0.04)
    elif s.finding == "fracture":
        g[(np.abs(x - cx) < 0.012) & (np.abs(y - 0.39) < 0.05)] = 0.0
        box = (cx - 0.05, 0.33, cx + 0.05, 0.45)
    return _gray(g), box


def _paint_ct(s: _Scene):
    x, y, cx = s.x, s.y, s.cx
    g = np.zeros((s.n, s.n), np.float32)
    g[_disk(x / 1.0, y / 0.8, 0.5, 0.5 / 0.8, 0.45)] = 0.5  # body
    g[_disk(x, y, 0.32, 0.48, 0.15) | _disk(x, y, 0.68, 0.48, 0.15)] = 0.08  # lungs
    g[_disk(x, y, 0.5, 0.8, 0.06)] = 1.0  # spine
    box = None
    if s.finding in ("nodule", "mass"):
        r = 0.035 if s.finding == "nodule" else 0.08
        cy = 0.48 + s.rng.uniform(-0.04, 0.04)
        g[_disk(x, y, cx, cy, r)] = 0.55
        box = (cx - r, cy - r, cx + r, cy + r)
    elif s.finding == "pleural effusion":
        g[_disk(x, y, cx, 0.48, 0.15) & (y > 0.52)] = 0.4
        box = (cx - 0.15, 0.52, cx + 0.15, 0.63)
    return _gray(g), box


def _paint_mri(s: _Scene):
    x, y, cx, cy = s.x, s.y, s.cx, s.cy
    g = np.zeros((s.n, s.n), np.float32)
    g[_disk(x / 0.8, y, 0.5 / 0.8, 0.5, 0.42)] = 0.9  # skull/scalp ring
    brain = _disk(x / 0.8, y, 0.5 / 0.8, 0.5, 0.37)
    g[brain] = 0.45 + 0.1 * np.sin(x[brain] * 40) * np.sin(y[brain] * 40)
    g[(np.abs(x - 0.5) < 0.01) & brain] = 0.2
    box = None
    if s.finding == "mass":
        g[_disk(x, y, cx, cy, 0.08)] = 0.95
        g[_disk(x, y, cx, cy, 0.04)] = 0.3
        box = (cx - 0.08, cy - 0.08, cx + 0.08, cy + 0.08)
    elif s.finding == "hemorrhage":
        g[_disk(x, y, cx, cy, 0.05)] = 0.05
        box = (cx - 0.05, cy - 0.05, cx + 0.05, cy + 0.05)
    return _gray(g), box


def _paint_ultrasound(s: _Scene):
    x, y, cx = s.x, s.y, s.cx
    ang = np.arctan2(x - 0.5, y + 0.05)
    rad = np.hypot(x - 0.5, y + 0.05)
    fan = (np.abs(ang) < 0.6) & (rad > 0.15) & (rad < 1.0)
    speckle = s.rng.gamma(2.0, 0.15, (s.n, s.n)).astype(np.float32)
    g = np.where(fan, np.clip(speckle, 0, 1) * 0.8, 0.0).astype(np.float32)
    cy = s.rng.uniform(0.5, 0.75)  # deeper than the other modalities' findings
    box = None
    if s.finding == "cyst":
        g[_disk(x, y, cx, cy, 0.07) & fan] = 0.02
        g[_disk(x, y, cx, cy + 0.1, 0.05) & fan] *= 1.6  # posterior acoustic enhancement
        box = (cx - 0.07, cy - 0.07, cx + 0.07, cy + 0.07)
    elif s.finding == "mass":
        g[_disk(x, y, cx, cy, 0.08) & fan] = 0.9
        box = (cx - 0.08, cy - 0.08, cx + 0.08, cy + 0.08)
    g = np.clip(g, 0, 1)
    return np.stack([g, g, g * 0.95], -1), box


def _paint_histology(s: _Scene):
    x, y, cx = s.x, s.y, s.cx
    rgb = np.empty((s.n, s.n, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0.95, 0.72, 0.85  # eosin pink
    nuclei = np.zeros((s.n, s.n), bool)
    for _ in range(int(s.n * s.n / 220)):
        px, py = s.rng.uniform(0, 1, 2)
        nuclei |= _disk(x, y, px, py, 0.018)
    box = None
    if s.finding == "carcinoma":  # a dense cluster of enlarged nuclei
        cy = s.rng.uniform(0.3, 0.7)
        for _ in range(40):
            px, py = cx + s.rng.normal(0, 0.07), cy + s.rng.normal(0, 0.07)
            nuclei |= _disk(x, y, px, py, 0.03)
        box = (cx - 0.18, cy - 0.18, cx + 0.18, cy + 0.18)
    rgb[nuclei] = (0.35, 0.2, 0.6)  # hematoxylin purple
    return rgb, box


def _paint_fundus(s: _Scene):
    x, y, cy = s.x, s.y, s.cy
    rgb = np.zeros((s.n, s.n, 3), np.float32)
    eye = _disk(x, y, 0.5, 0.5, 0.46)
    shade = 1.0 - 0.6 * np.hypot(x - 0.5, y - 0.5)
    rgb[eye] = np.stack([0.85 * shade, 0.4 * shade, 0.15 * shade], -1)[eye]
    disc_x = 0.7 if s.rng.random() < 0.5 else 0.3
    rgb[_disk(x, y, disc_x, 0.5, 0.07)] = (1.0, 0.9, 0.6)
    for k in range(4):  # vessels
        vessel = np.abs(y - 0.5 - (x - disc_x) * (k - 1.5) * 0.5) < 0.008
        rgb[vessel & eye] = (0.55, 0.1, 0.05)
    box = None
    if s.finding == "hemorrhage":  # on the side away from the optic disc
        cx = 1.0 - disc_x + s.rng.uniform(-0.05, 0.05)
        rgb[_disk(x, y, cx, cy, 0.045)] = (0.35, 0.02, 0.02)
        box = (cx - 0.045, cy - 0.045, cx + 0.045, cy + 0.045)
    return rgb, box


# Modality -> painter: (RGB float image in [0, 1] of shape [n, n, 3], finding box as fractions or None).
_PAINTERS = {"X-ray": _paint_xray, "CT": _paint_ct, "MRI": _paint_mri, "ultrasound": _paint_ultrasound,
             "histology": _paint_histology, "fundus": _paint_fundus}
_NOISELESS = {"ultrasound"}  # speckle is its own noise


def _random_offset(scene: _Scene, painter, layout_rng: np.random.Generator) -> tuple[float, float]:
    """The shift that moves the scene's finding box centre (the body's centre on a normal image) to a uniformly
    random point. The box comes from painting a copy of the scene's random stream, so the real painting draws
    the same finding at the same place in the anatomy."""
    _, box = painter(dataclasses.replace(scene, rng=copy.deepcopy(scene.rng)))
    cx, cy = (0.5, 0.5) if box is None else ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    tx, ty = layout_rng.uniform(*_RANDOM_CENTRE, 2)
    return float(tx - cx), float(ty - cy)


def _render(modality: str, finding: str, side: str, n: int, rng: np.random.Generator,
            layout_rng: np.random.Generator | None = None):
    """RGB uint8 image and the finding box (fractions of the image) or None. ``layout_rng``: the random layout,
    the scene shifted by an offset drawn from it (its own stream: the anatomical layout's draws are unchanged)."""
    noise = rng.normal(0, 0.03, (n, n)).astype(np.float32)  # drawn first: the random stream's order is the set
    scene = _Scene(*_grid(n), finding, *_finding_centre(modality, side, rng), rng)
    painter = _PAINTERS[modality]
    dx = dy = 0.0
    if layout_rng is not None:
        dx, dy = _random_offset(scene, painter, layout_rng)
        scene = dataclasses.replace(scene, x=scene.x - dx, y=scene.y - dy)  # image point = scene point + offset
    rgb, box = painter(scene)
    if box is not None and layout_rng is not None:
        box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
    if modality not in _NOISELESS:
        rgb = rgb + noise[..., None]
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8), box


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]  # str.capitalize would lower-case "X-ray" and "MRI"


def _captions(modality: str, finding: str, side: str, rng: random.Random) -> tuple[list[str], list[dict]]:
    anatomy, _, names = _SPEC[modality]
    captions, concepts = [], []

    def add(text: str, mentions: list[tuple[str, bool]]):
        idx = len(captions)
        captions.append(text)
        for name, negated in mentions:
            start = text.lower().index(name)
            c = {"start": start, "end": start + len(name), "cui": CUIS[name], "name": name, "caption_index": idx}
            if negated:
                c["negated"] = True
            concepts.append(c)

    picks = rng.sample(names, 2)
    if finding == "normal":
        absent = [f for f in _SPEC[modality][1] if f != "normal"][:2]
        add(f"{_cap(picks[0])}: no {absent[0]} in the {anatomy}.", [(absent[0], True)])
        add(f"Normal {picks[1]}: no {' or '.join(absent)} seen.", [(a, True) for a in absent])
        add(f"{modality} image of a normal {anatomy}.", [])
    else:
        where = f"{side} {anatomy}" if side != "none" else anatomy
        add(f"{_cap(picks[0])} showing a {finding} in the {where}.", [(finding, False)])
        add(f"{_cap(finding)} of the {where} on {picks[1]}.", [(finding, False)])
        add(f"{modality}: {side + ' ' if side != 'none' else ''}{finding}.", [(finding, False)])
    return captions, concepts


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise MedclipError(f"unknown demo layout {layout!r}; known: {', '.join(LAYOUTS)}")


def demo_records(n: int, seed: int, image_size: int, prefix: str = "demo",
                 layout: str = "anatomical") -> Iterator[SourceRecord]:
    """``n`` synthetic records, balanced over modalities, deterministic for a seed and layout (:data:`LAYOUTS`)."""
    _check_layout(layout)
    rng = random.Random(f"medclip-demo/{seed}")
    nrng = np.random.default_rng(seed)
    layout_rng = np.random.default_rng([seed, 1]) if layout == "random" else None
    for i in range(n):
        modality = MODALITIES[i % len(MODALITIES)]
        anatomy, findings, _ = _SPEC[modality]
        finding = rng.choice(findings)
        side = rng.choice(("left", "right")) if finding in _LATERAL else "none"
        pixels, box = _render(modality, finding, side, image_size, nrng, layout_rng)
        captions, concepts = _captions(modality, finding, side, rng)
        boxes = []
        if box is not None:
            bbox = [round(min(max(v, 0.0), 1.0) * image_size, 1) for v in box]
            boxes.append({"cui": CUIS[finding], "name": finding, "bbox": bbox})
        yield SourceRecord(
            image=Image.fromarray(pixels, "RGB"), captions=captions,
            labels={"modality": modality, "finding": finding, "laterality": side, "anatomy": anatomy},
            modality=modality, source="medclip-demo (synthetic)", licence="CC0-1.0 (synthetic)",
            concepts=concepts, boxes=boxes, origin=f"{prefix}:{i}",
        )


def _manifest_text(name: str, prefix: str, shards: int, samples: int, split: str, layout: str) -> str:
    last = f"{shards - 1:06d}"
    urls = f"{{root}}/{prefix}-000000.tar" if shards == 1 else f"{{root}}/{prefix}-{{000000..{last}}}.tar"
    what = f"{split} split" if layout == "anatomical" else f"{split} split, {layout} layout"
    return (f"# Synthetic demo set ({what}), written by medclip.data.demo.build_demo. Not medical data.\n"
            f"name: {name}\nmodality: mixed\nurls: \"{urls}\"\nshards: {shards}\nsamples: {samples}\n"
            f"weight: 1.0\ncaption_fields: [captions, txt]\nconcept_field: concepts\n"
            f"summary: \"{{root}}/{prefix}-summary.json\"\nsplit: {split}\nlicence: CC0-1.0 (synthetic)\n"
            f"citation: medclip synthetic demo set\n")


def build_demo(out_dir: str | Path, n_train: int = 1800, n_val: int = 300, seed: int = 0, image_size: int = 96,
               shard_samples: int = 500, layout: str = "anatomical") -> Path:
    """Write train and val shards, their summaries and manifests (``demo-train.yaml``, ``demo-val.yaml``).

    Returns the train manifest path. Train and val use disjoint random streams (seed, seed + 10**6).
    ``layout``: where the findings sit (:data:`LAYOUTS`).
    """
    if image_size < 32 or n_train < 1 or n_val < 0:
        raise MedclipError("build_demo needs image_size >= 32, n_train >= 1, n_val >= 0")
    _check_layout(layout)
    out = Path(out_dir)
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 10**6)):
        if n == 0:
            continue
        prefix = f"demo-{split}"
        # The synthetic records come in random order already; input order keeps the documented demo results.
        report = build_shards(demo_records(n, split_seed, image_size, prefix, layout),
                              BuildConfig(out, prefix=prefix, max_samples=shard_samples, jpeg_quality=95,
                                          shuffle_seed=None))
        (out / f"{prefix}.yaml").write_text(
            _manifest_text(f"demo-{split}", prefix, len(report.shards), report.samples, split, layout))
    return out / "demo-train.yaml"


def built_layout(manifest: str | Path) -> str:
    """The layout a built demo set was made with, read from its manifest's first line (``_manifest_text``)."""
    first = Path(manifest).read_text().split("\n", 1)[0]
    return next((layout for layout in LAYOUTS[1:] if f", {layout} layout)" in first), LAYOUTS[0])


def iter_demo_split(out_dir: str | Path, split: str = "val") -> Iterator[DemoSample]:
    """Samples of a built demo split in key order, with labels and boxes (for zero-shot evaluation)."""
    shards = sorted(Path(out_dir).glob(f"demo-{split}-*.tar"))
    if not shards:
        raise MedclipError(f"no demo shards for split {split!r} in {out_dir} (run build_demo first)")
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {key: sample_parts(group, str(shard)) for key, group in member_groups(tar) if key is not None}
        for key in sorted(members):
            m = members[key]
            meta = json.loads(m["json"])
            with Image.open(io.BytesIO(m.get("jpg") or m["png"])) as im:
                image = im.convert("RGB")
            yield DemoSample(key, image, meta["captions"], meta["labels"], meta.get("boxes", []),
                             meta.get("concepts", []))
