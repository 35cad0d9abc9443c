"""Recipe-level data preparation: tables (JSONL/CSV) -> concept-annotated shards + a manifest.

For collections small enough to convert at the start of a run (such as ../shared/data), a recipe can
list them under ``data.build`` instead of pre-built manifests. Each entry is built once, by rank 0,
into ``output_dir/shards/NAME``. The build summary records the entry's key: the settings that shape the
shards (input, caption fields, label captions, vocabularies, max side) and the size and modification
time of the input table and vocabulary files. A later run (or a resume) reuses the shards only under the
same key; otherwise it says what changed and builds them again (the new shards replace the stale ones
only once complete: medclip.data.build_output). Images the table points to are not part of the key
(edit the table, or delete the folder, to rebuild after replacing images in place).
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections import Counter
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
    # How a label value is written in those captions, per field: {finding: {ARDS: acute respiratory distress
    # syndrome, todo: null}}. The evaluation's class names belong here, so that training and zero-shot prompts
    # name a finding alike; null leaves a placeholder value out (no label caption from that row's templates
    # that use the field). Values not listed are written as they are.
    label_names: dict[str, dict[str, str | None]] = field(default_factory=dict)
    vocab: list[str] = field(default_factory=list)  # concept vocabularies (MeSH TSV, CheXpert folder, ...)
    max_side: int | None = 256
    seed: int = 0  # of the sample order in the shards (rows are permuted, not written in table order)
    weight: float = 1.0
    processes: int = 1


def template_fields(templates: list[str], where: str = "label_captions") -> set[str]:
    """The row fields label caption templates write ({finding}, {finding[0]} and {finding.x} all read finding)."""
    fields = set()
    for template in templates:
        try:
            parsed = list(string.Formatter().parse(template))
        except ValueError as exc:
            raise MedclipError(f"{where}: template {template!r} is not a format string: {exc} (write a literal "
                               f"brace as {{{{ or }}}})") from None
        fields |= {name.split(".")[0].split("[")[0] for _, name, _, _ in parsed if name}
    return fields


def check_label_names(spec: BuildSpec) -> None:
    """One line for a bad label caption template, or a label_names field no template writes (a typo would
    rename nothing)."""
    used = template_fields(spec.label_captions, f"data.build {spec.name}: label_captions")
    unused = sorted(set(spec.label_names) - used)
    if unused:
        raise MedclipError(f"data.build {spec.name}: label_names.{unused[0]} names values of a field no label_captions "
                           f"template writes (fields the templates use: {', '.join(sorted(used)) or 'none'})")


def _present_labels(labels: dict) -> dict[str, str]:
    """The row's non-empty label values as text, stripped as the evaluation compares labels."""
    present = {f: "" if v is None else str(v).strip() for f, v in labels.items()}
    return {f: text for f, text in present.items() if text}


def _named_labels(labels: dict[str, str], names: dict[str, dict[str, str | None]]) -> tuple[dict[str, str], list[tuple]]:
    """The present label values as captions write them (renamed by ``names``), and the (field, value) pairs
    left out because ``names`` maps them to null or to an empty name."""
    named, left_out = {}, []
    for field_name, text in labels.items():
        name = names.get(field_name, {}).get(text, text)
        if name:
            named[field_name] = name
        else:
            left_out.append((field_name, text))
    return named, left_out


def _label_caption(template: str, labels: dict[str, str]) -> str | None:
    try:
        text = template.format(**labels)
    except (KeyError, IndexError):
        return None  # a field this row does not have
    return text.strip() or None


def _records(spec: BuildSpec, annotator) -> Iterator:
    from medclip.data.builder import read_table
    from medclip.data.records import RecordError

    left_out = Counter()  # (field, value) named null, per row that had it
    seen: set[tuple[str, str]] = set()  # (field, value) of the rows, for the fields label_names lists
    for record in read_table(spec.input, caption_fields=spec.caption_fields, source=spec.name):
        if isinstance(record, RecordError):
            yield record
            continue
        present = _present_labels(record.labels)
        labels, dropped = _named_labels(present, spec.label_names)
        left_out.update(dropped)
        seen.update((f, v) for f, v in present.items() if f in spec.label_names)
        extra = [c for t in spec.label_captions if (c := _label_caption(t, labels))]
        captions = list(dict.fromkeys(record.captions + extra))  # keep order, drop repeats
        concepts = list(record.concepts)
        if annotator is not None:
            own = {(c.get("caption_index", 0), c.get("start"), c.get("end")) for c in concepts}
            concepts += [m for m in annotator.annotate_captions(captions)
                         if (m["caption_index"], m["start"], m["end"]) not in own]
        yield replace(record, captions=captions, concepts=concepts)
    if left_out:
        log.info("data.build %s: label values named null (no label caption from templates using them): %s",
                 spec.name, ", ".join(f"{f}={v!r} x{n}" for (f, v), n in sorted(left_out.items())))
    unmatched = sorted((f, v) for f, values in spec.label_names.items() for v in values if (f, v) not in seen)
    if unmatched:  # a misspelt value renames nothing: say so
        log.warning("data.build %s: label_names values no row of %s has: %s", spec.name, spec.input,
                    ", ".join(f"{f}={v!r}" for f, v in unmatched))


def _annotator(vocab_paths: list[str]):
    if not vocab_paths:
        return None
    from medclip.concepts.annotator import ConceptAnnotator
    from medclip.concepts.vocab import load_vocabularies

    return ConceptAnnotator(load_vocabularies(vocab_paths))


def _file_stamps(paths: list[str]) -> dict[str, list[int]]:
    """[size, mtime_ns] of each file (every file under a folder), by absolute path."""
    stamps = {}
    for path in map(Path, paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.exists():
                stat = f.stat()
                stamps[str(f.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return stamps


def _order_settings(spec: BuildSpec) -> dict:
    """How samples are ordered and dealt into shards (shards built in table order lack these: rebuilt)."""
    from medclip.data.builder import BuildConfig

    defaults = BuildConfig(".")
    return {"shuffle_seed": spec.seed, "min_shards": defaults.min_shards, "max_samples": defaults.max_samples}


def build_key(spec: BuildSpec) -> dict:
    """What the shards of ``spec`` depend on, with a digest of it (``weight`` and ``processes`` do not)."""
    settings = {"input": str(Path(spec.input).resolve()), "caption_fields": list(spec.caption_fields),
                "label_captions": list(spec.label_captions), "vocab": [str(Path(v).resolve()) for v in spec.vocab],
                "max_side": spec.max_side, **_order_settings(spec)}
    names = {f: values for f, values in spec.label_names.items() if values}
    if names:  # only when set: shards built before the option existed stay reusable
        settings["label_names"] = names
    files = _file_stamps([spec.input, *spec.vocab])
    digest = hashlib.sha256(json.dumps([settings, files], sort_keys=True).encode()).hexdigest()
    return {"digest": digest, "settings": settings, "files": files}


def _stale_reason(stored: dict | None, key: dict) -> str | None:
    """Why shards built under ``stored`` do not fit ``key`` (None when they do)."""
    if not stored:
        return "its summary has no build key (built by an older medclip or by hand)"
    if stored.get("digest") == key["digest"]:
        return None
    before, now = stored.get("settings", {}), key["settings"]
    changed = [name for name in {**before, **now} if before.get(name) != now.get(name)]
    if changed:
        return "setting(s) changed: " + ", ".join(f"{n} {before.get(n)!r} -> {now.get(n)!r}" for n in changed)
    files_before = stored.get("files", {})
    touched = sorted(set(files_before) ^ set(key["files"])
                     | {f for f in key["files"] if files_before.get(f) != key["files"][f]})
    return "input file(s) changed since the build: " + ", ".join(touched)


def _reusable(spec: BuildSpec, folder: Path, key: dict) -> bool:
    from medclip.data.shards import read_summary

    manifest, summary = folder / f"{spec.name}.yaml", folder / f"{spec.name}-summary.json"
    if not manifest.is_file():
        return False
    stored = read_summary(summary).get("build_key") if summary.is_file() else None
    reason = _stale_reason(stored, key)
    if reason is None:
        return True
    log.info("rebuilding the shards of %s in %s: %s", spec.name, folder, reason)
    return False


def _reweighted(manifest_path: Path, weight: float) -> Path:
    """The reused manifest, rewritten when only the source's sampling weight changed."""
    import yaml

    from medclip.data.manifest import write_manifest

    fields = yaml.safe_load(manifest_path.read_text())
    if fields.get("weight") != weight:
        log.info("%s: sampling weight %s -> %s", manifest_path, fields.get("weight"), weight)
        write_manifest(manifest_path, **{**fields, "weight": weight})
    return manifest_path


def build_source(spec: BuildSpec, out_root: Path) -> Path:
    """Build the shards of one spec, or reuse them if built under the same key; returns its manifest path."""
    from medclip.data.builder import BuildConfig, build_shards
    from medclip.data.manifest import write_manifest
    from medclip.data.shards import read_summary, write_summary

    if not Path(spec.input).is_file():
        raise MedclipError(f"data.build {spec.name}: input not found: {spec.input}")
    folder = out_root / spec.name
    manifest = folder / f"{spec.name}.yaml"
    key = build_key(spec)
    if _reusable(spec, folder, key):
        return _reweighted(manifest, spec.weight)
    log.info("building shards for %s from %s", spec.name, spec.input)
    try:  # the new shards replace the stale build (its manifest included) only once they are complete
        report = build_shards(_records(spec, _annotator(spec.vocab)),
                              BuildConfig(folder, prefix=spec.name, max_side=spec.max_side, processes=spec.processes,
                                          shuffle_seed=spec.seed))
    except MedclipError as exc:
        raise MedclipError(f"data.build {spec.name} ({spec.input}): {exc}") from exc
    summary = read_summary(report.summary_path)
    extra = {k: v for k, v in summary.items() if k not in ("format", "samples", "shards")}
    write_summary(report.summary_path, report.shards, **{**extra, "build_key": key})
    # The manifest appears only once the shards are complete: its presence means "reuse".
    return write_manifest(
        manifest, name=spec.name, urls=[str(folder.resolve() / s.name) for s in report.shards],
        samples=report.samples, shards=len(report.shards), weight=spec.weight,
        caption_fields=["captions", "txt"], concept_field="concepts", summary=str(report.summary_path),
        description=f"built from {spec.input} by the recipe's data.build")
