"""Dataset manifests (YAML): where a source's shards are, how many samples, how to read captions.

Fields: ``name``, ``modality``, ``urls`` (a brace pattern or a list of them; local paths,
``pipe:`` commands, ``http(s)://`` or fsspec URLs such as ``s3://``; ``{root}`` is replaced by
the data root), ``shards`` and ``samples`` (expected counts), ``counts_exact`` (False when the
counts are estimates), ``weight`` (sampling weight when mixing), ``caption_fields`` (JSON fields
holding captions, ``txt`` for the ``.txt`` member), ``caption_separator`` (several captions
concatenated in one string, UniMed's layout), ``concept_field``, ``summary`` (the builder's
summary, for checksums), ``licence``, ``citation``, ``input_format`` (the ``medclip shards build
--format`` the shards were converted from, e.g. ``medconcept``; provenance, read by the rehearsal).

The root comes from the ``root`` argument, else ``$MEDCLIP_DATA_ROOT``, else the manifest's own
``root`` entry, else the manifest's folder. It is inserted literally: brace patterns in it are not
expanded, and in a ``pipe:`` command it is shell-quoted (write ``{root}``, not ``'{root}'``).

Trust: a ``pipe:`` URL is a shell command. The training stream and ``medclip data check`` refuse to
run one unless the user opts in (``--allow-pipe``, or ``data.allow_pipe: true`` in the recipe).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml

from medclip import resources
from medclip._deps import require
from medclip.data.order_check import order_warning, sample_labels
from medclip.data.shard_reader import ShardErrors, is_command, read_shard
from medclip.data.shards import read_summary, sha256_file
from medclip.data.tar_samples import member_groups
from medclip.errors import MedclipError

log = logging.getLogger(__name__)
NEEDS_BRACEEXPAND = "expanding shard URL patterns"  # the train extra, imported at use (see shard_reader)

KNOWN_FIELDS = {"name", "modality", "urls", "shards", "samples", "counts_exact", "weight", "caption_fields",
                "caption_separator", "concept_field", "summary", "licence", "citation", "root", "description",
                "split", "labels", "input_format"}


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
    url_patterns: list[str] = field(default_factory=list)  # the manifest's patterns with the root inserted

    def __post_init__(self):
        if not self.urls:
            raise MedclipError(f"manifest {self.name!r}: no shard URLs")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise MedclipError(f"manifest {self.name!r}: weight must be a finite number >= 0, got {self.weight}")

    @property
    def commands(self) -> list[str]:
        """The shard URLs that run a shell command (``pipe:``)."""
        return [u for u in self.urls if is_command(u)]


def is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def insert_root(pattern: str, root: str) -> str:
    """``pattern`` with ``{root}`` replaced by ``root`` taken literally: shell-quoted in a command,
    its braces and backslashes escaped from brace expansion."""
    text = shlex.quote(root) if is_command(pattern) else root
    text = text.replace("\\", "\\\\").replace("{", "\\{").replace("}", "\\}")
    url = pattern.replace("{root}", text)
    if is_command(url) and not is_command(pattern):  # only a manifest's own pipe: URLs may run commands
        raise MedclipError(f"the data root {root!r} would make {pattern!r} a shell command (pipe:): a root is a "
                           f"folder or a URL; a command belongs in a manifest's urls")
    return url


def expand_urls(patterns: str | list[str], root: str) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    expand = require("braceexpand", NEEDS_BRACEEXPAND).braceexpand
    out: list[str] = []
    for p in patterns:
        out.extend(expand(insert_root(str(p), root)))
    return out


def command_patterns(m: Manifest) -> list[tuple[str, int]]:
    """The manifest's ``pipe:`` patterns (root inserted, braces kept) and how many commands each expands to."""
    expand = require("braceexpand", NEEDS_BRACEEXPAND).braceexpand
    return [(p, sum(1 for _ in expand(p))) for p in m.url_patterns or m.urls if is_command(p)]


def refuse_commands(sources: list[Manifest], allowed: bool) -> None:
    """Stop with one line if a source would run shell commands and the user has not allowed it;
    when allowed, show the commands once."""
    for m in sources:
        if not m.commands:
            continue
        if not allowed:
            raise MedclipError(f"data source {m.name!r} reads its shards by running shell commands (pipe: URLs, "
                               f"e.g. {m.commands[0][5:]!r}); if you trust its manifest, pass --allow-pipe "
                               f"(or set data.allow_pipe: true); `medclip data check` lists the commands")
        log.warning("data source %r runs %d shell command(s) from its manifest (allowed by --allow-pipe / "
                    "data.allow_pipe), e.g.: %s", m.name, len(m.commands), m.commands[0][5:])


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
            url_patterns=[insert_root(str(p), root) for p in
                          ([data["urls"]] if isinstance(data["urls"], str) else data["urls"])],
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
    """Distinct sample keys in a local tar (webdataset's rule, :mod:`medclip.data.tar_samples`).

    Reads the member headers only (seeking over the data); the members of a cut tar up to the cut.
    """
    keys: set[str | None] = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            keys.update(key for key, _ in member_groups(tar, read=False, on_error=_counted_up_to_damage))
    except (tarfile.TarError, EOFError):
        pass  # counted up to the damage; the stream skips and counts it when it reads the shard
    keys.discard(None)
    return len(keys)


def _counted_up_to_damage(exn: Exception) -> None:
    if not isinstance(exn, (tarfile.TarError, EOFError)):
        raise exn


MAX_LISTED = 20  # problems of one kind listed per manifest


def check_manifest(manifest: Manifest, verify_checksums: bool = True, allow_pipe: bool = False,
                   warnings: list[str] | None = None) -> list[str]:
    """Problems found by reading every shard to its end (empty when everything agrees).

    Each shard is read as the training stream reads it (local, fsspec, http, and ``pipe:`` commands
    when ``allow_pipe``): a tar cut short fails even when no count says how long it should be.
    ``warnings`` (when given) receives a line per shard whose samples run in long same-label blocks
    (:mod:`medclip.data.order_check`).
    """
    m = manifest
    problems: list[str] = []
    if m.shards is not None and len(m.urls) != m.shards:
        problems.append(f"{m.name}: URL pattern expands to {len(m.urls)} shards, manifest says {m.shards}")
    if m.commands and not allow_pipe:
        problems.append(f"{m.name}: {len(m.commands)} shard(s) come from shell commands, not run: read them "
                        f"with --allow-pipe if you trust the manifest")
    summary = _read_summary(m, problems)
    counted, failed = _walk_shards(m, allow_pipe, summary, verify_checksums, problems, warnings)
    for kind, urls in failed.items():
        problems += [f"{m.name}: {kind} {u}" for u in urls[:MAX_LISTED]]
        if len(urls) > MAX_LISTED:
            problems.append(f"{m.name}: ... and {len(urls) - MAX_LISTED} more: {kind}")
    if summary:
        listed = {Path(u).name for u in m.urls}
        extra = [s["name"] for s in summary["shards"] if s["name"] not in listed]
        if extra:
            problems.append(f"{m.name}: summary lists shards not in the URL pattern: {extra[:5]}")
    all_read = not failed and not (m.commands and not allow_pipe)
    if m.samples is not None and all_read and m.counts_exact and counted != m.samples:
        problems.append(f"{m.name}: shards hold {counted} samples, manifest says {m.samples}")
    return problems


def _walk_shards(m: Manifest, allow_pipe: bool, summary: dict | None, verify_checksums: bool,
                 problems: list[str], warnings: list[str] | None = None) -> tuple[int, dict[str, list[str]]]:
    """Read every shard it may; (samples in the whole shards, failure kind -> "shard URL: cause")."""
    by_name = {s["name"]: s for s in summary["shards"]} if summary else {}
    failed: dict[str, list[str]] = {}
    counted = 0
    for url in m.urls:
        if is_command(url) and not allow_pipe:
            continue
        if is_local(url) and not Path(urlparse(url).path if url.startswith("file:") else url).is_file():
            failed.setdefault("missing shard", []).append(url)
            continue
        labels: list[dict[str, str]] | None = None if warnings is None else []
        samples, failure = read_whole_shard(url, allow_pipe, labels)
        if labels and (warning := order_warning(m.name, Path(url).name, labels)):
            warnings.append(warning)
        if failure:
            kind, cause = failure
            failed.setdefault(kind.replace("_", " "), []).append(f"{url}: {cause}")
        else:
            counted += samples
            problems += _compare_with_summary(m, url, samples, summary, by_name.get(Path(url).name),
                                              verify_checksums)
    return counted, failed


def read_whole_shard(url: str, allow_pipe: bool, labels: list | None = None) -> tuple[int, tuple[str, str] | None]:
    """(samples, (failure kind, its cause) or None) of one shard read to its end; nothing is logged (the
    caller prints the failure once). ``labels`` (when given) receives each sample's categorical fields."""
    errors = ShardErrors()
    samples = 0
    for sample in read_shard(url, lambda i: True, Counter(), report=False, allow_commands=allow_pipe, errors=errors):
        samples += 1
        if labels is not None:
            labels.append(sample_labels(sample))
    return samples, ((errors.kind(), errors.causes[errors.kind()]) if errors.causes else None)


def _read_summary(m: Manifest, problems: list[str]) -> dict | None:
    if not m.summary:
        return None
    try:
        return read_summary(m.summary)
    except MedclipError as exc:
        problems.append(f"{m.name}: {exc}")
        return None


def _compare_with_summary(m: Manifest, url: str, samples: int, summary: dict | None, entry: dict | None,
                          verify_checksums: bool) -> list[str]:
    name = Path(url).name
    if summary is None:
        return []
    if entry is None:
        return [f"{m.name}: shard {name} is not listed in summary {m.summary}"]
    problems = []
    if entry["samples"] != samples:
        problems.append(f"{m.name}: shard {name} has {samples} samples, summary says {entry['samples']}")
    if verify_checksums and is_local(url) and sha256_file(url) != entry["sha256"]:
        problems.append(f"{m.name}: shard {name} sha256 differs from the summary (corrupt or rebuilt)")
    return problems
