"""Dataset manifests (YAML): where a source's shards are, how many samples, how to read captions.

Fields: ``name``, ``modality``, ``urls`` (a brace pattern or a list of them; local paths,
``pipe:`` commands, ``http(s)://`` or fsspec URLs such as ``s3://``; ``{root}`` is replaced by
the data root), ``shards`` and ``samples`` (expected counts), ``counts_exact`` (False when the
counts are estimates), ``weight`` (sampling weight when mixing), ``caption_fields`` (JSON fields
holding captions, ``txt`` for the ``.txt`` member), ``caption_separator`` (several captions
concatenated in one string, UniMed's layout), ``concept_field``, ``summary`` (the builder's
summary, for checksums), ``licence``, ``citation``.

The root comes from the ``root`` argument, else ``$MEDCLIP_DATA_ROOT``, else the manifest's own
``root`` entry, else the manifest's folder.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import braceexpand
import yaml

from medclip import resources
from medclip.data.shards import read_summary, sha256_file
from medclip.errors import MedclipError

KNOWN_FIELDS = {"name", "modality", "urls", "shards", "samples", "counts_exact", "weight", "caption_fields",
                "caption_separator", "concept_field", "summary", "licence", "citation", "root", "description",
                "split", "labels"}


@dataclass
class Manifest:
    name: str
    urls: list[str]  # brace-expanded shard URLs
    samples: int | None = None
    shards: int | None = None
    counts_exact: bool = True
    weight: float = 1.0
    modality: str = ""
    caption_fields: list[str] = field(default_factory=lambda: ["captions", "txt"])
    caption_separator: str | None = None
    concept_field: str = "concepts"
    summary: str | None = None
    licence: str = ""
    citation: str = ""
    description: str = ""
    path: Path | None = None

    def __post_init__(self):
        if not self.urls:
            raise MedclipError(f"manifest {self.name!r}: no shard URLs")
        if not (self.weight >= 0):
            raise MedclipError(f"manifest {self.name!r}: weight must be >= 0, got {self.weight}")


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def expand_urls(patterns: str | list[str], root: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for p in patterns:
        out.extend(braceexpand.braceexpand(str(p).replace("{root}", root)))
    return out


def load_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    path = resources.resolve("manifests", path)  # a shipped manifest's name works too
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise MedclipError(f"manifest not found: {path}") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise MedclipError(f"cannot read manifest {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise MedclipError(f"manifest {path} must be a YAML mapping")
    unknown = set(data) - KNOWN_FIELDS
    if unknown:
        raise MedclipError(f"manifest {path}: unknown field(s) {sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}")
    for required in ("name", "urls"):
        if not data.get(required):
            raise MedclipError(f"manifest {path}: missing required field {required!r}")
    root = root or os.environ.get("MEDCLIP_DATA_ROOT") or data.get("root")
    if not root and resources.is_shipped("manifests", path) and "{root}" in str(data["urls"]):
        raise MedclipError(f"manifest {data['name']} needs the data root: pass --root DIR (a recipe source's "
                           f"`root`) or set MEDCLIP_DATA_ROOT")
    root = str(root or path.parent)
    fields = data.get("caption_fields") or ["captions", "txt"]
    try:
        return Manifest(
            name=str(data["name"]),
            urls=expand_urls(data["urls"], root),
            samples=None if data.get("samples") is None else int(data["samples"]),
            shards=None if data.get("shards") is None else int(data["shards"]),
            counts_exact=bool(data.get("counts_exact", True)),
            weight=float(data.get("weight", 1.0)),
            modality=str(data.get("modality") or ""),
            caption_fields=[fields] if isinstance(fields, str) else [str(f) for f in fields],
            caption_separator=data.get("caption_separator"),
            concept_field=str(data.get("concept_field") or "concepts"),
            summary=str(data["summary"]).replace("{root}", root) if data.get("summary") else None,
            licence=str(data.get("licence") or ""),
            citation=str(data.get("citation") or ""),
            description=str(data.get("description") or ""),
            path=path,
        )
    except (TypeError, ValueError) as exc:
        raise MedclipError(f"manifest {path}: bad value: {exc}") from exc


def write_manifest(path: str | Path, **fields) -> Path:
    """Write a manifest YAML atomically (it appears only once complete); unknown fields are refused."""
    unknown = set(fields) - KNOWN_FIELDS
    if unknown:
        raise MedclipError(f"unknown manifest field(s) {sorted(unknown)}; known: {sorted(KNOWN_FIELDS)}")
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(fields, sort_keys=False))
    tmp.replace(path)
    return path


def as_manifest(item: Manifest | str | Path, root: str | Path | None = None) -> Manifest:
    return item if isinstance(item, Manifest) else load_manifest(item, root)


def count_tar_samples(path: str | Path) -> int:
    """Distinct sample keys in a tar (the part of the member name before the first dot)."""
    keys: set[str] = set()
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if info.isreg():
                base = info.name.rsplit("/", 1)[-1]
                keys.add(info.name[: len(info.name) - len(base)] + base.split(".", 1)[0])
    return len(keys)


def check_manifest(manifest: Manifest, verify_checksums: bool = True) -> list[str]:
    """Human-readable problems (empty when everything agrees). Remote shards are not opened."""
    problems: list[str] = []
    m = manifest
    if m.shards is not None and len(m.urls) != m.shards:
        problems.append(f"{m.name}: URL pattern expands to {len(m.urls)} shards, manifest says {m.shards}")
    local = [u for u in m.urls if is_local(u)]
    missing = [u for u in local if not Path(urlparse(u).path if u.startswith("file:") else u).is_file()]
    for u in missing[:20]:
        problems.append(f"{m.name}: missing shard {u}")
    if len(missing) > 20:
        problems.append(f"{m.name}: ... and {len(missing) - 20} more missing shards")
    summary = None
    if m.summary:
        try:
            summary = read_summary(m.summary)
        except MedclipError as exc:
            problems.append(f"{m.name}: {exc}")
    by_name = {s["name"]: s for s in summary["shards"]} if summary else {}
    counted = 0
    for u in local:
        if u in missing:
            continue
        name = Path(u).name
        try:
            n = count_tar_samples(u)
        except (tarfile.TarError, OSError, EOFError) as exc:
            problems.append(f"{m.name}: unreadable shard {u}: {exc}")
            continue
        counted += n
        entry = by_name.get(name)
        if summary and entry is None:
            problems.append(f"{m.name}: shard {name} is not listed in summary {m.summary}")
        elif entry is not None:
            if entry["samples"] != n:
                problems.append(f"{m.name}: shard {name} has {n} samples, summary says {entry['samples']}")
            if verify_checksums and sha256_file(u) != entry["sha256"]:
                problems.append(f"{m.name}: shard {name} sha256 differs from the summary (corrupt or rebuilt)")
    if summary:
        listed = {Path(u).name for u in m.urls}
        extra = [s["name"] for s in summary["shards"] if s["name"] not in listed]
        if extra:
            problems.append(f"{m.name}: summary lists shards not in the URL pattern: {extra[:5]}")
    all_local_read = local and len(local) == len(m.urls) and not missing
    if m.samples is not None and all_local_read and m.counts_exact and counted != m.samples:
        problems.append(f"{m.name}: shards hold {counted} samples, manifest says {m.samples}")
    return problems
