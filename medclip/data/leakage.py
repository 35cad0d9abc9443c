"""Leakage between training and evaluation images: exact copies (identical bytes) and near copies (a 64-bit
perceptual hash, ``imagehash.phash``, within ``max_distance`` bits), reported with both keys and the distance.

The evaluation side (the smaller) is hashed into memory; the training side is streamed and each of its
images compared with all evaluation hashes at once (XOR + popcount over a numpy array of uint64: a few
thousand comparisons per image cost microseconds, the decode and hash cost about a millisecond).

The default ``max_distance`` of 10 bits (of 64) was calibrated on real MedPix and COVID-19 chest X-ray
images (README, "Leakage check"): copies resized to half, re-encoded at JPEG quality 60 or cropped by
2-4 % stay within it, while distinct images of the shipped splits are further apart.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from medclip._deps import require
from medclip.data.leakage_sources import ImageRef, Side
from medclip.errors import MedclipError
from medclip.imaging import DICOM_SUFFIXES, load_image

log = logging.getLogger(__name__)

NEEDS_IMAGEHASH = "medclip data leakage"

DEFAULT_MAX_DISTANCE = 8
CHUNK = 32  # images per task handed to a worker


@dataclass
class LeakageCheckConfig:
    """A recipe's ``data.leakage_check``: run before the first step against these evaluation sides."""

    against: list[str] = field(default_factory=list)  # suite names, folders, tables, shard globs, manifests
    max_distance: int = DEFAULT_MAX_DISTANCE
    allow_leakage: bool = False  # findings are logged and the run starts anyway


@dataclass
class Hashed:
    key: str
    phash: int | None  # None: unreadable
    sha256: str
    error: str = ""


@dataclass
class Finding:
    train_key: str
    eval_key: str
    distance: int
    same_bytes: bool
    others: int  # further evaluation images within the distance

    @property
    def kind(self) -> str:
        return "exact" if self.same_bytes or self.distance == 0 else "near"

    def line(self) -> str:
        how = "identical bytes" if self.same_bytes else f"distance {self.distance}"
        more = f" (+{self.others} more evaluation images within the distance)" if self.others else ""
        return f"LEAK {self.kind} {how}: {self.train_key} ~ {self.eval_key}{more}"


@dataclass
class LeakageReport:
    findings: list[Finding]
    train_images: int
    eval_images: int
    skipped: Counter
    seconds: float
    max_distance: int

    def summary(self) -> str:
        exact = sum(f.kind == "exact" for f in self.findings)
        rate = (self.train_images + self.eval_images) / self.seconds if self.seconds > 0 else float("inf")
        skipped = f"; {sum(self.skipped.values())} unreadable images skipped" if self.skipped else ""
        verdict = "no leakage found" if not self.findings else \
            f"{len(self.findings)} training images match evaluation images ({exact} exact, " \
            f"{len(self.findings) - exact} near)"
        return (f"{verdict}: {self.train_images} training images against {self.eval_images} evaluation images, "
                f"max distance {self.max_distance} bits, {self.seconds:.1f} s ({rate:.0f} images hashed/s)"
                f"{skipped}")


def hash_image(ref: ImageRef) -> Hashed:
    """pHash and sha256 of one image; an unreadable image gives ``phash=None`` and the reason."""
    imagehash = require("imagehash", NEEDS_IMAGEHASH)
    try:
        in_memory = isinstance(ref.image, (bytes, bytearray))
        raw = ref.image if in_memory else Path(ref.image).read_bytes()
        if in_memory or Path(ref.image).suffix.lower() not in DICOM_SUFFIXES:
            with Image.open(io.BytesIO(raw)) as img:  # the bytes just read for the sha256, not the file again
                image = load_image(img)
        else:
            image = load_image(ref.image)  # DICOM through its display pipeline, as everywhere else
        bits = imagehash.phash(image).hash.flatten()
    except Exception as exc:  # PIL raises many types for a broken file; it is counted, not fatal
        return Hashed(ref.key, None, "", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return Hashed(ref.key, int.from_bytes(np.packbits(bits).tobytes(), "big"), hashlib.sha256(raw).hexdigest())


def _hash_chunk(refs: list[ImageRef]) -> list[Hashed]:
    return [hash_image(r) for r in refs]


def _chunks(refs: Iterator[ImageRef], size: int) -> Iterator[list[ImageRef]]:
    chunk: list[ImageRef] = []
    for ref in refs:
        chunk.append(ref)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def hash_stream(refs: Iterator[ImageRef], workers: int) -> Iterator[Hashed]:
    """Hashes in input order; ``workers`` > 0 hashes in that many processes."""
    if workers == 0:
        yield from map(hash_image, refs)
        return
    with get_context("spawn").Pool(workers) as pool:
        for hashed in pool.imap(_hash_chunk, _chunks(refs, CHUNK)):
            yield from hashed


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy < 2.0 has no bitwise_count)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)


class EvalIndex:
    """The evaluation side's hashes, compared with one training hash at a time."""

    def __init__(self, hashed: list[Hashed]):
        self.keys = [h.key for h in hashed]
        self.hashes = np.array([h.phash for h in hashed], dtype=np.uint64)
        self.by_sha: dict[str, int] = {}
        for i, h in enumerate(hashed):
            self.by_sha.setdefault(h.sha256, i)

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, h: Hashed, max_distance: int) -> Finding | None:
        distances = popcount(self.hashes ^ np.uint64(h.phash))
        same = self.by_sha.get(h.sha256)
        nearest = int(distances.argmin()) if same is None else same
        within = int((distances <= max_distance).sum())
        if same is None and distances[nearest] > max_distance:
            return None
        return Finding(h.key, self.keys[nearest], int(distances[nearest]), same is not None,
                       max(0, within - 1))


def _progress(total: int | None, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not show)


def _usable(hashed: Iterator[Hashed], skipped: Counter, bar) -> Iterator[Hashed]:
    for h in hashed:
        bar.update(1)
        if h.phash is None:
            skipped[h.error.split(":")[0]] += 1
            log.warning("leakage check: cannot read %s (%s); skipped", h.key, h.error)
            continue
        yield h


def check_leakage(train: list[Side], against: list[Side], max_distance: int = DEFAULT_MAX_DISTANCE,
                  workers: int = 0, progress: bool = False,
                  on_finding: Callable[[Finding], None] | None = None) -> LeakageReport:
    """Every training image against every evaluation image; ``on_finding`` is called as each is found."""
    if not 0 <= max_distance < 64:
        raise MedclipError(f"max distance must be 0-63 bits of the 64-bit hash, got {max_distance}")
    if workers < 0:
        raise MedclipError(f"workers must be 0 (hash in this process) or more, got {workers}")
    require("imagehash", NEEDS_IMAGEHASH)  # a core install: one line before any image is read
    start = time.perf_counter()
    skipped: Counter = Counter()
    with _progress(sum(s.total or 0 for s in against), "hashing evaluation images", progress) as bar:
        index = EvalIndex([h for side in against for h in _usable(hash_stream(side.images, workers), skipped, bar)])
    if not len(index):
        raise MedclipError(f"no readable evaluation image in {', '.join(s.name for s in against)}")
    findings, n_train = [], 0
    totals = [s.total for s in train]
    with _progress(None if None in totals else sum(totals), "checking training images", progress) as bar:
        for side in train:
            for h in _usable(hash_stream(side.images, workers), skipped, bar):
                n_train += 1
                if (finding := index.match(h, max_distance)) is not None:
                    findings.append(finding)
                    if on_finding:
                        on_finding(finding)
    if not n_train:
        raise MedclipError(f"no readable training image in {', '.join(s.name for s in train)}")
    return LeakageReport(findings, n_train, len(index), skipped, time.perf_counter() - start, max_distance)
