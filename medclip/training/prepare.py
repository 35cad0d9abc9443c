"""Recipe-level data preparation: tables (JSONL/CSV) -> concept-annotated shards + a manifest.

For collections small enough to convert at the start of a run (such as ../shared/data), a recipe can
list them under ``data.build`` instead of pre-built manifests. Each entry is built once, by rank 0,
into ``output_dir/shards/NAME``; a later run (or a resume) reuses the shards when their summary exists.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from medclip.errors import MedclipError

log = logging.getLogger(__name__)


@dataclass
class BuildSpec:
    name: str
    input: str  # JSONL or CSV table with image paths relative to it
    caption_fields: list[str] = field(default_factory=lambda: ["caption"])
    # Extra captions written from each row's label fields, e.g. "{modality} of the {location}": one caption
    # per template whose fields are all present (UniMed's way of giving label-only data text).
    label_captions: list[str] = field(default_factory=list)
    vocab: list[str] = field(default_factory=list)  # concept vocabularies (MeSH TSV, CheXpert folder, ...)
    max_side: int | None = 256
    weight: float = 1.0
    processes: int = 1


def _label_caption(template: str, labels: dict) -> str | None:
    try:
        text = template.format(**{k: str(v) for k, v in labels.items() if v not in (None, "")})
    except (KeyError, IndexError):
        return None  # a field this row does not have
    return text.strip() or None


def _records(spec: BuildSpec, annotator) -> Iterator:
    from medclip.data.builder import read_table
    from medclip.data.records import RecordError

    for record in read_table(spec.input, caption_fields=spec.caption_fields, source=spec.name):
        if isinstance(record, RecordError):
            yield record
            continue
        extra = [c for t in spec.label_captions if (c := _label_caption(t, record.labels))]
        captions = list(dict.fromkeys(record.captions + extra))  # keep order, drop repeats
        concepts = list(record.concepts)
        if annotator is not None:
            own = {(c.get("caption_index", 0), c.get("start"), c.get("end")) for c in concepts}
            concepts += [m for m in annotator.annotate_captions(captions)
                         if (m["caption_index"], m["start"], m["end"]) not in own]
        yield replace(record, captions=captions, concepts=concepts)


def _annotator(vocab_paths: list[str]):
    if not vocab_paths:
        return None
    from medclip.concepts.annotator import ConceptAnnotator
    from medclip.concepts.vocab import load_vocabularies

    return ConceptAnnotator(load_vocabularies(vocab_paths))


def build_source(spec: BuildSpec, out_root: Path) -> Path:
    """Build (or reuse) the shards of one spec; returns its manifest path."""
    from medclip.data.builder import BuildConfig, build_shards
    from medclip.data.manifest import write_manifest

    if not Path(spec.input).is_file():
        raise MedclipError(f"data.build {spec.name}: input not found: {spec.input}")
    folder = out_root / spec.name
    manifest = folder / f"{spec.name}.yaml"
    if manifest.is_file():
        return manifest
    log.info("building shards for %s from %s", spec.name, spec.input)
    report = build_shards(_records(spec, _annotator(spec.vocab)),
                          BuildConfig(folder, prefix=spec.name, max_side=spec.max_side, processes=spec.processes))
    if report.samples == 0:
        raise MedclipError(f"data.build {spec.name}: no usable sample in {spec.input} (skipped: {report.skipped})")
    # The manifest appears only once the shards are complete: its presence means "reuse".
    return write_manifest(
        manifest, name=spec.name, urls=[str(folder.resolve() / s.name) for s in report.shards],
        samples=report.samples, shards=len(report.shards), weight=spec.weight,
        caption_fields=["captions", "txt"], concept_field="concepts", summary=str(report.summary_path),
        description=f"built from {spec.input} by the recipe's data.build")
