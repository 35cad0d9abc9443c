"""Shard builder: JSONL/CSV tables, class folders with caption templates, DICOM, MedConcept-23M.

Images are decoded, optionally shrunk to a maximum side and re-encoded in a process pool; the
results are consumed in input order, so the output is identical for any number of processes.
Bad inputs are skipped, counted by kind and listed in the summary; a build that writes no sample
fails. The shards replace an earlier build's only once complete (:mod:`medclip.data.build_output`).

Sample order: a table sorted by label (or a class folder, read class after class) written in input
order gives shards of long one-label runs that the loader's shard shuffle and bounded sample buffer
cannot mix, so batches come out of one label. By default (``shuffle_seed`` set) the records of a part
are therefore read into memory (paths and captions, not images: about 1 KB each; use parts for tens
of millions of rows), permuted exactly with the seed and dealt into shards in that order, and a small
part is split into ``min_shards`` shards (of at least ``MIN_SHARD_SAMPLES``) so that the loader's
shard shuffle has something to shuffle. ``shuffle_seed=None`` streams the input in its order.

``part=(i, n)`` builds a disjoint part: rows are grouped in blocks of ``PART_BLOCK`` and block
``b`` belongs to part ``b % n`` (works on a stream, no need to count rows first). Sample keys are
the global row index, so parts never collide. Once every part is built, :func:`merge_parts`
(``medclip shards merge``) checks that none is missing and writes the one summary and manifest of
the whole collection.
"""

from __future__ import annotations

import io
import json
import logging
import math
import multiprocessing as mp
import shutil
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from medclip import jsonio
from medclip.data import build_output
from medclip.data.build_output import shard_brace_pattern, shard_name_pattern
from medclip.data.manifest import write_manifest
from medclip.data.records import (
    RecordError,
    SourceRecord,
    clean_captions,
    record_json,
    reindex_concepts,
    validate_concepts,
)
from medclip.data.shards import ShardInfo, ShardSink, read_summary, write_summary
from medclip.data.slots import seeded_rng
from medclip.data.user_files import class_folders, csv_rows, folder_images, text_lines
from medclip.errors import MedclipError
from medclip.imaging import Window, load_image

log = logging.getLogger(__name__)

PART_BLOCK = 1000
MIN_SHARD_SAMPLES = 64  # a small source is not cut into shards smaller than this
MAX_LISTED_SKIPS = 10_000


@dataclass
class BuildConfig:
    out_dir: str | Path
    prefix: str = "shard"
    max_samples: int = 10_000  # per shard
    max_bytes: int = 1 << 30  # per shard
    max_side: int | None = None  # shrink larger images at write time
    image_format: str = "jpg"  # jpg | png
    jpeg_quality: int = 90
    processes: int = 1
    part: tuple[int, int] = (0, 1)
    window: tuple[float, float] | None = None  # DICOM/16-bit window (center, width)
    shuffle_seed: int | None = 0  # permute each part's records with this seed (None: keep the input order)
    min_shards: int = 8  # shuffled builds: shards per part where the size allows (see the module doc)

    def __post_init__(self):
        if self.image_format not in ("jpg", "png"):
            raise MedclipError(f"image_format must be jpg or png, got {self.image_format!r}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise MedclipError(f"part must be i/n with 0 <= i < n, got {i}/{n}")
        if self.max_samples < 1 or self.max_bytes < 1 or self.min_shards < 1:
            raise MedclipError("max_samples, max_bytes and min_shards must be positive")
        if self.max_side is not None and self.max_side < 8:
            raise MedclipError(f"max_side must be at least 8, got {self.max_side}")


@dataclass
class BuildReport:
    out_dir: Path
    summary_path: Path
    shards: list[ShardInfo]
    samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_items: list[dict] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # files of an earlier build this one replaced


# ---------------------------------------------------------------- readers


def parse_part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError as exc:
        raise MedclipError(f"--part must look like i/n (e.g. 0/8), got {text!r}") from exc
    if not (n >= 1 and 0 <= i < n):
        raise MedclipError(f"--part must satisfy 0 <= i < n, got {text!r}")
    return i, n


def _table_rows(path: Path, image_field: str) -> Iterator[tuple[int, dict | Exception]]:
    """(line number, row or why the line is not one) of a JSONL or CSV table."""
    if not path.is_file():
        raise MedclipError(f"input file not found: {path}")
    if path.suffix.lower() == ".csv":
        yield from csv_rows(path, need=image_field)
        return
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("row is not a JSON object")
            yield number, row
        except ValueError as exc:
            yield number, exc


def _captions_from(row: dict, fields: Sequence[str], separator: str | None) -> list[str]:
    out: list[str] = []
    for name in fields:
        value = row.get(name)
        if isinstance(value, str) and separator:
            value = [v.strip() for v in value.split(separator)]
        out.extend(clean_captions(value))
    return out


def read_table(
    path: str | Path,
    image_field: str = "image",
    caption_fields: Sequence[str] = ("caption",),
    caption_separator: str | None = None,
    label_fields: Sequence[str] | None = None,
    modality_field: str = "modality",
    concept_field: str = "concepts",
    licence: str = "",
    source: str = "",
) -> Iterator[SourceRecord | RecordError]:
    """Rows of a UTF-8 JSONL or CSV file (:mod:`medclip.data.user_files`); image paths are relative to its folder.

    Every other scalar field goes into ``labels`` unless ``label_fields`` names them explicitly.
    """
    path = Path(path)
    reserved = {image_field, *caption_fields, concept_field, "licence", "license", "boxes"}
    for line, row in _table_rows(path, image_field):
        origin = f"{path}:{line}"
        if isinstance(row, Exception):
            yield RecordError("bad_json", f"{origin}: {row}")
            continue
        image = row.get(image_field)
        if not image:
            yield RecordError("missing_image", f"{origin}: no {image_field!r} field")
            continue
        names = label_fields if label_fields is not None else [k for k in row if k not in reserved]
        labels = {k: row[k] for k in names if k in row and isinstance(row[k], (str, int, float, bool, list))}
        row_licence = row.get("licence") or row.get("license") or licence
        yield SourceRecord(
            image=path.parent / str(image),
            captions=_captions_from(row, caption_fields, caption_separator),
            labels=labels,
            modality=str(row.get(modality_field) or ""),
            source=source or str(row.get("source") or path.parent.name),
            licence=str(row_licence or ""),
            concepts=row.get(concept_field) or [],
            boxes=row.get("boxes") or [],
            origin=origin,
        )


def read_medconcept(path: str | Path, source: str = "MedConcept-23M", licence: str = "") -> Iterator:
    """MedConcept-23M JSONL: ``caption``, ``image`` and ``umls_meta_info`` character spans."""
    for rec in read_table(path, caption_fields=("caption",), concept_field="umls_meta_info",
                          label_fields=("pmid", "pmc", "fig_id", "fig_label"), source=source, licence=licence):
        if isinstance(rec, SourceRecord):
            caption = rec.captions[0] if rec.captions else ""
            rec.concepts = [
                {"start": m.get("start_char"), "end": m.get("end_char"), "cui": m.get("umls_cui"),
                 "name": caption[int(m["start_char"]):int(m["end_char"])] if caption else "", "caption_index": 0}
                for m in rec.concepts
                if isinstance(m, dict) and m.get("umls_cui") is not None and m.get("start_char") is not None
                and m.get("end_char") is not None
            ]
        yield rec


def read_class_folder(
    root: str | Path,
    templates: dict[str, list[str]] | list[str],
    modality: str = "",
    source: str = "",
    licence: str = "",
    class_names: dict[str, str] | None = None,
) -> Iterator[SourceRecord]:
    """One subfolder per class; each image gets every caption template of its class.

    ``templates`` is either a list with ``{}`` for the class name, or per-class lists (a ``"*"``
    entry applies to classes without their own).
    """
    root = Path(root)
    if not root.is_dir():
        raise MedclipError(f"image folder not found: {root}")
    for folder in class_folders(root):
        cls = folder.name
        name = (class_names or {}).get(cls, cls.replace("_", " "))
        if isinstance(templates, dict):
            chosen = templates.get(cls) or templates.get("*")
            if not chosen:
                raise MedclipError(f"no caption templates for class {cls!r} (add it or a '*' entry)")
        else:
            chosen = templates
        captions = [t.format(name) if "{}" in t else t for t in chosen]
        for image in folder_images(folder):
            yield SourceRecord(image=image, captions=captions, labels={"class": name}, modality=modality,
                               source=source or root.name, licence=licence, origin=str(image))


def load_templates(path: str | Path) -> dict[str, list[str]] | list[str]:
    path = Path(path)
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            data = [t for t in path.read_text().splitlines() if t.strip()]
    except FileNotFoundError as exc:
        raise MedclipError(f"templates file not found: {path}") from exc
    except Exception as exc:
        raise MedclipError(f"cannot read templates {path}: {exc}") from exc
    if not isinstance(data, (dict, list)) or not data:
        raise MedclipError(f"templates {path} must be a non-empty list or a class -> list mapping")
    return data


# ---------------------------------------------------------------- encoding


def _encode_image(image: Any, cfg: BuildConfig) -> tuple[bytes, str, float]:
    window = Window(*cfg.window) if cfg.window else None
    if isinstance(image, bytes):
        with Image.open(io.BytesIO(image)) as im:
            im.load()
            image = im.copy()
    img = load_image(image, window)  # raises MedclipError for unreadable files
    scale = 1.0
    if cfg.max_side and max(img.size) > cfg.max_side:
        scale = cfg.max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    if cfg.image_format == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.save(buf, format="JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue(), cfg.image_format, scale


def encode_record(args: tuple[int, SourceRecord | RecordError, BuildConfig]) -> tuple[int, Any]:
    """(index, members dict) or (index, RecordError); runs in worker processes."""
    index, rec, cfg = args
    if isinstance(rec, RecordError):
        return index, rec
    captions = clean_captions(rec.captions)
    if not captions:
        return index, RecordError("missing_caption", f"{rec.origin}: no caption")
    concepts, dropped = validate_concepts(reindex_concepts(rec.concepts, rec.captions), captions)
    try:
        data, ext, scale = _encode_image(rec.image, cfg)
    except FileNotFoundError as exc:
        return index, RecordError("missing_image", f"{rec.origin}: {exc}")
    except (MedclipError, OSError, ValueError, SyntaxError) as exc:
        kind = "missing_image" if "not found" in str(exc) else "unreadable_image"
        return index, RecordError(kind, f"{rec.origin}: {exc}")
    if scale != 1.0 and rec.boxes:
        rec.boxes = [{**b, "bbox": [round(v * scale, 2) for v in b["bbox"]]} for b in rec.boxes]
    meta = record_json(rec, captions, concepts)
    members = {ext: data, "txt": captions[0].encode("utf-8"), "json": jsonio.dumps(meta, sort_keys=True).encode()}
    return index, (members, dropped)


def _selected(records: Iterable, part: tuple[int, int]) -> Iterator[tuple[int, Any]]:
    i, n = part
    for index, rec in enumerate(records):
        if (index // PART_BLOCK) % n == i:
            yield index, rec


def _ordered(records: Iterable, cfg: BuildConfig) -> tuple[Iterable[tuple[int, Any]], int]:
    """This part's (index, record) pairs in the order they are written, and the samples per shard."""
    selected = _selected(records, cfg.part)
    if cfg.shuffle_seed is None:
        return selected, cfg.max_samples
    items = list(selected)
    seeded_rng(cfg.shuffle_seed, *cfg.part, "build").shuffle(items)
    # min_shards where each holds MIN_SHARD_SAMPLES, more when max_samples says so; equal sizes.
    shards = max(math.ceil(len(items) / cfg.max_samples), min(cfg.min_shards, len(items) // MIN_SHARD_SAMPLES), 1)
    return items, math.ceil(len(items) / shards)


def build_shards(records: Iterable[SourceRecord | RecordError], cfg: BuildConfig) -> BuildReport:
    """Write ``records`` (this part of them) as shards plus ``PREFIX-summary[-PART].json``.

    The shards replace those of an earlier build of the same prefix (and part) in ``out_dir`` only once
    this build has written at least one sample (:mod:`medclip.data.build_output`).
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    i, n = cfg.part
    name_pattern = shard_name_pattern(cfg.prefix, cfg.part)
    summary_path = out / build_output.summary_name(cfg.prefix, cfg.part)
    ordered, shard_samples = _ordered(records, cfg)  # a shuffled build reads its rows here, before staging
    staged = build_output.staging_dir(out, cfg.prefix, cfg.part)
    sink = ShardSink(staged, name_pattern, shard_samples, cfg.max_bytes)
    skipped: Counter[str] = Counter()
    skipped_items: list[dict] = []
    work = ((index, rec, cfg) for index, rec in ordered)
    pool = mp.get_context("fork").Pool(cfg.processes) if cfg.processes > 1 else None
    results = pool.imap(encode_record, work, chunksize=16) if pool else map(encode_record, work)
    try:
        for index, result in results:
            if isinstance(result, RecordError):
                skipped[result.kind] += 1
                if len(skipped_items) < MAX_LISTED_SKIPS:
                    skipped_items.append({"index": index, "kind": result.kind, "reason": str(result)})
                continue
            members, dropped = result
            if dropped:
                skipped["bad_concept_span"] += dropped
            sink.write(f"{cfg.prefix}{index:09d}", members)
        shards = sink.close()
        skipped_items.sort(key=lambda item: item["index"])  # input order, whatever order they were written in
        _check_not_empty(shards, skipped, skipped_items, cfg)
    except BaseException:
        sink.abort()
        shutil.rmtree(staged, ignore_errors=True)
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    removed = build_output.install(staged, out, shards, cfg.prefix, cfg.part)
    config = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
              for k, v in asdict(cfg).items() if k not in ("out_dir", "processes")}
    write_summary(summary_path, shards, part=[i, n], skipped=dict(sorted(skipped.items())),
                  skipped_items=skipped_items, config=config)
    for kind, count in sorted(skipped.items()):
        log.warning("skipped %d input(s): %s", count, kind)
    return BuildReport(out, summary_path, shards, sum(s.samples for s in shards), dict(skipped), skipped_items,
                       removed)


def _check_not_empty(shards: list[ShardInfo], skipped: Counter[str], items: list[dict], cfg: BuildConfig) -> None:
    """A build that wrote nothing fails, saying why; a part given no rows (a short input) is fine."""
    if shards:
        return
    kept = f"{cfg.out_dir} is left as it was"
    if skipped:
        counts = ", ".join(f"{kind} {count}" for kind, count in sorted(skipped.items()))
        raise MedclipError(f"no sample written: all {sum(skipped.values())} input(s) were skipped ({counts}), "
                           f"e.g. {items[0]['reason']}; {kept}")
    if cfg.part[1] == 1:
        raise MedclipError(f"no sample written: the input holds no rows or images; {kept}")


def merge_parts(out_dir: str | Path, prefix: str, name: str | None = None, **manifest_fields) -> BuildReport:
    """Join the summaries of a ``--part i/n`` build into ``PREFIX-summary.json`` and a manifest ``PREFIX.yaml``.

    Fails, naming them, when parts are missing, built with different settings, or their shards are
    not all on disk; ``manifest_fields`` (weight, modality, licence, ...) go into the manifest.
    """
    out = Path(out_dir)
    paths = sorted(out.glob(f"{prefix}-summary-[0-9][0-9][0-9].json"))
    if not paths:
        raise MedclipError(f"no part summaries {prefix}-summary-NNN.json in {out}")
    summaries = [read_summary(p) for p in paths]
    counts = {tuple(s.get("part", (0, 1)))[1] for s in summaries}
    if len(counts) != 1:
        raise MedclipError(f"{out}: part summaries of {prefix} come from builds with different n: {sorted(counts)}")
    n = counts.pop()
    found = [int(s["part"][0]) for s in summaries]
    missing = sorted(set(range(n)) - set(found))
    if missing:
        raise MedclipError(f"{out}: {prefix} is missing part(s) {', '.join(f'{i}/{n}' for i in missing)} of {n}")
    configs = {json.dumps({k: v for k, v in s.get("config", {}).items() if k != "part"}, sort_keys=True)
               for s in summaries}
    if len(configs) != 1:
        raise MedclipError(f"{out}: the parts of {prefix} were built with different settings")
    summaries.sort(key=lambda s: s["part"][0])
    shards = [ShardInfo(**entry) for s in summaries for entry in s["shards"]]
    absent = [sh.name for sh in shards if not (out / sh.name).is_file()]
    if absent:
        raise MedclipError(f"{out}: {len(absent)} shard(s) listed by the part summaries are missing, "
                           f"e.g. {absent[0]}")
    skipped: Counter[str] = Counter()
    items: list[dict] = []
    for s in summaries:
        skipped.update(s.get("skipped", {}))
        items += s.get("skipped_items", [])
    summary_path = write_summary(out / build_output.summary_name(prefix, (0, 1)), shards, parts=n,
                                 skipped=dict(sorted(skipped.items())), skipped_items=items[:MAX_LISTED_SKIPS],
                                 config=json.loads(configs.pop()))
    counts = [((int(s["part"][0]), n), len(s["shards"])) for s in summaries]
    report = BuildReport(out, summary_path, shards, sum(sh.samples for sh in shards), dict(skipped), items)
    write_prefix_manifest(report, prefix, counts, name, **manifest_fields)
    return report


def write_prefix_manifest(report: BuildReport, prefix: str, part_counts: list[tuple[tuple[int, int], int]] | None = None,
                          name: str | None = None, **manifest_fields) -> Path:
    """``PREFIX.yaml`` beside the shards, naming them relative to itself: a whole build's (``part_counts``
    None) or, from merge_parts, every part's ``((i, n), shard count)``."""
    part_counts = part_counts if part_counts is not None else [((0, 1), len(report.shards))]
    patterns = ["{root}/" + shard_brace_pattern(prefix, part, count) for part, count in part_counts if count]
    return write_manifest(report.out_dir / f"{prefix}.yaml", name=name or prefix, urls=patterns,
                          shards=len(report.shards), samples=report.samples,
                          summary=f"{{root}}/{report.summary_path.name}", **manifest_fields)
