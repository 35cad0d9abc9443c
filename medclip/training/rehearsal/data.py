"""The rehearsal's training data: the recipe's own shards when they are on disk, else stand-ins.

A stand-in is written in the format its manifest declares, at the exact shard names its URL
pattern expands to (under a rehearsal root that the rehearsed recipe passes as the source's
``root``), with a builder summary, so the shipped manifest file itself is what the run reads:

* ``caption_separator`` with a ``txt`` field: ``KEY.jpg`` + ``KEY.txt`` holding several captions
  joined by the separator (UniMed-CLIP's layout for label-only sources);
* a JSON caption field: medclip's shard format (``KEY.json`` with the captions under the
  manifest's field name, concepts with character spans under its ``concept_field``, boxes);
* ``input_format: medconcept``: MedConcept-23M rows (``caption``, ``image``, ``umls_meta_info``
  character spans with UMLS CUIs) converted by the same reader ``medclip shards build --format
  medconcept`` uses.

Images and captions come from the synthetic demo generator (learnable, with concepts and boxes).
Recipe-level builds (``data.build``) keep their real input table, cut to its first rows; a missing
input gets a stand-in table with the caption and label fields the spec reads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from medclip import jsonio, resources
from medclip.errors import MedclipError
from medclip.training.prepare import template_fields

log = logging.getLogger(__name__)

POOL_SIZE = 64  # distinct synthetic image-caption pairs; stand-in samples cycle through them
BUILD_ROWS = 64  # rows of a data.build input table the rehearsal converts


@dataclass
class SourceData:
    """What the rehearsal found (or wrote) for one training source."""

    name: str
    where: str  # manifest path or build input
    kind: str  # real | stand-in | subset
    detail: str


def stand_in_pool(image_size: int, seed: int = 0) -> list:
    from medclip.data.demo import demo_records

    return list(demo_records(POOL_SIZE, seed, max(image_size, 32), prefix="rehearsal"))


# ----------------------------------------------------------------------------- shard formats

def _encoded(record) -> dict[str, bytes]:
    """The members medclip's shard builder writes for a record (jpg, txt, json)."""
    from medclip.data.builder import BuildConfig, encode_record
    from medclip.data.records import RecordError

    _, result = encode_record((0, record, BuildConfig(out_dir=".", image_format="jpg", jpeg_quality=90)))
    if isinstance(result, RecordError):
        raise MedclipError(f"stand-in sample could not be encoded: {result}")
    return result[0]


def _json_caption_field(manifest) -> str | None:
    return next((f for f in manifest.caption_fields if f != "txt"), None)


def medclip_members(record, manifest) -> dict[str, bytes]:
    """medclip's own shard layout, with the manifest's caption and concept field names."""
    members = _encoded(record)
    meta = json.loads(members["json"])
    field = _json_caption_field(manifest)
    captions, concepts = meta.pop("captions"), meta.pop("concepts")
    meta[field] = captions
    meta[manifest.concept_field] = concepts
    members["json"] = jsonio.dumps(meta, sort_keys=True).encode()
    return members


def joined_txt_members(record, manifest) -> dict[str, bytes]:
    """Image + one text member with every caption, joined by the manifest's separator."""
    members = _encoded(record)
    separator = manifest.caption_separator or ""
    text = separator.join(record.captions) if separator else record.captions[0]
    return {"jpg": members["jpg"], "txt": text.encode("utf-8")}


def medconcept_members(record, manifest, work_dir: Path) -> dict[str, bytes]:
    """A MedConcept-23M row (caption + umls_meta_info spans), converted by the MedConcept reader."""
    from medclip.data.builder import read_medconcept

    work_dir.mkdir(parents=True, exist_ok=True)
    image = work_dir / f"{record.origin.replace(':', '-')}.png"
    record.image.save(image)
    caption = " ".join(record.captions)  # one long caption per figure, as MedConcept's
    offsets, position = [], 0
    for text in record.captions:
        offsets.append(position)
        position += len(text) + 1
    spans = [{"start_char": offsets[c["caption_index"]] + c["start"], "end_char": offsets[c["caption_index"]] + c["end"],
              "umls_cui": c["cui"], "name": c["name"], "semantic_type": "T047"} for c in record.concepts]
    row = {"image": str(image), "caption": caption, "umls_meta_info": spans, "pmid": "0", "pmc": "PMC0",
           "fig_id": record.origin, "fig_label": "Figure 1"}
    table = work_dir / "medconcept.jsonl"
    table.write_text(jsonio.dumps(row) + "\n")
    (converted,) = list(read_medconcept(table))
    return medclip_members(converted, manifest)


def shard_format(manifest, raw: dict) -> str:
    """Which layout a manifest reads (see the module doc)."""
    if raw.get("input_format") in INPUT_FORMATS:
        return raw["input_format"]
    if manifest.caption_separator and "txt" in manifest.caption_fields:
        return "joined_txt"
    return "medclip" if _json_caption_field(manifest) else "joined_txt"


INPUT_FORMATS: dict[str, Callable] = {"medconcept": medconcept_members}
SHARD_FORMATS: dict[str, Callable] = {"medclip": medclip_members, "joined_txt": joined_txt_members}


def _members_for(fmt: str, record, manifest, work_dir: Path) -> dict[str, bytes]:
    if fmt in INPUT_FORMATS:
        return INPUT_FORMATS[fmt](record, manifest, work_dir)
    return SHARD_FORMATS[fmt](record, manifest)


# ----------------------------------------------------------------------------- manifests

def local_path(url: str) -> Path | None:
    from medclip.data.manifest import is_local

    if not is_local(url):
        return None
    return Path(url[len("file:"):] if url.startswith("file:") else url)


def write_stand_in_shards(manifest, raw: dict, pool: list, work_dir: Path, min_samples: int) -> int:
    """Shards at the manifest's URLs (expanded under the stand-in root) and its summary; returns samples."""
    from medclip.data.shards import ShardSink, write_summary

    fmt = shard_format(manifest, raw)
    pool_members = [_members_for(fmt, record, manifest, work_dir / "inputs") for record in pool]
    paths = [local_path(u) for u in manifest.urls]
    if any(p is None for p in paths):
        raise MedclipError(f"manifest {manifest.name}: stand-in shards need local URLs")
    total = max(len(paths), min_samples)
    key_stem = manifest.name.replace(".", "_")
    infos = []
    for shard_index, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        literal = path.name.replace("{", "{{").replace("}", "}}")
        sink = ShardSink(path.parent, literal, max_samples=total)
        for sample in range(shard_index, total, len(paths)):
            sink.write(f"{key_stem}-{sample:09d}", pool_members[sample % len(pool_members)])
        infos.extend(sink.close())
    if manifest.summary:
        write_summary(Path(manifest.summary), infos, rehearsal_stand_in=fmt)
    return total


def prepare_source(source: dict, pool: list, data_dir: Path, min_samples: int) -> SourceData:
    """Use the recipe source's shards when all are on disk; else write stand-ins and point ``root`` at them."""
    from medclip.data.manifest import load_manifest

    path = resources.resolve("manifests", source["manifest"])  # a shipped manifest's name works too
    raw = yaml.safe_load(path.read_text()) or {}
    root = data_dir / str(raw.get("name") or path.stem)
    # Without any data root a shipped manifest's shards cannot be on disk: stand-ins, under a root of ours.
    given = source.get("root") or os.environ.get("MEDCLIP_DATA_ROOT") or raw.get("root")
    manifest = load_manifest(path, root=source.get("root") if given else str(root))
    paths = [local_path(u) for u in manifest.urls]
    present = [p for p in paths if given and p is not None and p.is_file()]
    if present:
        missing = len(paths) - len(present)
        detail = f"{len(present)} of {len(paths)} shards on disk" + (f" ({missing} missing)" if missing else "")
        return SourceData(manifest.name, source["manifest"], "real", detail)
    stand_in = load_manifest(source["manifest"], root=str(root))
    samples = write_stand_in_shards(stand_in, raw, pool, data_dir / "work" / manifest.name, min_samples)
    source["root"] = str(root)
    where = ("with no data root given" if not given else "remote" if any(p is None for p in paths)
             else f"not under {Path(paths[0]).parent}")
    return SourceData(manifest.name, source["manifest"], "stand-in",
                      f"{len(paths)} shards {where}; wrote {len(paths)} stand-in shards ({shard_format(manifest, raw)} "
                      f"format, {samples} samples) under {root}")


# ----------------------------------------------------------------------------- data.build tables

def subset_table(src: Path, dst: Path, rows: int, image_field: str = "image") -> int:
    """The first ``rows`` rows of a JSONL table, image paths made absolute (the images are read in place)."""
    kept = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            if len(kept) == rows:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, dict) and row.get(image_field):
                row[image_field] = str((src.parent / str(row[image_field])).resolve())
            kept.append(row)
    dst.write_text("".join(jsonio.dumps(r) + "\n" for r in kept))
    return len(kept)


def stand_in_table(spec: dict, pool: list, dst: Path) -> int:
    """Rows with an image, the spec's caption fields and the label fields its templates name."""
    images = dst.parent / f"{dst.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, record in enumerate(pool):
        path = images / f"{i:04d}.png"
        record.image.save(path)
        row = {"image": str(path), **{k: str(v) for k, v in record.labels.items()}}
        for j, name in enumerate(spec.get("caption_fields") or ["caption"]):
            row[name] = record.captions[j % len(record.captions)]
        for name in sorted(template_fields(spec.get("label_captions") or [])):
            row.setdefault(name, f"{name} {i % 3}")
        rows.append(row)
    dst.write_text("".join(jsonio.dumps(r) + "\n" for r in rows))
    return len(rows)


def prepare_build(spec: dict, pool: list, data_dir: Path) -> SourceData:
    src = Path(spec["input"])
    dst = data_dir / "build" / f"{spec['name']}.jsonl"
    dst.parent.mkdir(parents=True, exist_ok=True)
    spec["input"] = str(dst)
    missing_vocab = [v for v in spec.get("vocab") or [] if not Path(v).exists()]
    if src.suffix.lower() == ".jsonl" and src.is_file():
        rows = subset_table(src, dst, BUILD_ROWS)
        kind, detail = "subset", f"first {rows} rows of {src} (images read in place)"
    else:
        rows = stand_in_table(spec, pool, dst)
        kind, detail = "stand-in", f"{src} not found: stand-in table of {rows} rows"
    if missing_vocab:
        spec["vocab"] = [v for v in spec["vocab"] if v not in missing_vocab]
        detail += f"; vocabularies not found, not used: {', '.join(missing_vocab)}"
    return SourceData(spec["name"], str(src), kind, detail)


def prepare_training_data(values: dict, pool: list, data_dir: Path, min_samples: int) -> list[SourceData]:
    """Point the rehearsed recipe's data section (``values['data']``, edited in place) at runnable data.

    A stand-in source holds at least ``min_samples`` samples: as many as the run could read from it
    alone, so no source runs dry and the measured shares are the mixing's own.
    """
    data = values["data"]
    found = [prepare_source(source, pool, data_dir, min_samples) for source in data.get("sources") or []]
    found += [prepare_build(spec, pool, data_dir) for spec in data.get("build") or []]
    if data.get("demo"):
        found.append(SourceData("demo-train", "data.demo", "real", "the embedded synthetic demo set, built by the run"))
    return found


# ----------------------------------------------------------------------------- what the run read

def run_manifests(recipe, output_dir: Path) -> list:
    """The manifests a run of ``recipe`` read, in the trainer's order (demo, builds, sources), with weights."""
    from medclip.data.manifest import load_manifest
    from medclip.training.components import demo_dir, expand_placeholders

    manifests = []
    if recipe.data.demo:
        manifests.append(load_manifest(demo_dir(output_dir) / "demo-train.yaml"))
    for spec in recipe.data.build:
        manifests.append(load_manifest(output_dir / "shards" / spec.name / f"{spec.name}.yaml"))
    for source in recipe.data.sources:
        manifest = load_manifest(expand_placeholders(source.manifest, output_dir),
                                 root=expand_placeholders(source.root, output_dir))
        manifests.append(manifest if source.weight is None else replace(manifest, weight=source.weight))
    return manifests


def shard_keys(manifest) -> dict[str, str]:
    """Sample key -> source name, from the tar headers of a manifest's local shards."""
    import tarfile

    from medclip.data.tar_samples import member_groups

    keys = {}
    for url in manifest.urls:
        path = local_path(url)
        if path is None or not path.is_file():
            continue
        try:
            with tarfile.open(path) as tar:
                keys.update((key, manifest.name) for key, _ in member_groups(tar, read=False) if key is not None)
        except (tarfile.TarError, OSError) as exc:
            log.warning("cannot list %s: %s", path, exc)
    return keys
