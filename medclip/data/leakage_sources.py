"""The images on one side of a leakage check, from whatever names them: a shipped manifest name, a manifest
or suite YAML, a shard glob, a JSONL / CSV table, a folder, or an evaluation suite's name.

Each kind is read by the reader that already reads it elsewhere (manifests and shards as training reads them,
tables and suites as evaluation reads them, folders as ``shards build --format folder`` lists them); training
shards are streamed, one sample at a time. An evaluation suite contributes the split each dataset is scored
on (its ``args``), not its probes' ``train`` splits: those are training data of the evaluation, and a
pretraining set may legitimately hold them.
"""

from __future__ import annotations

import glob
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from medclip import resources
from medclip._deps import require
from medclip.data.manifest import NEEDS_BRACEEXPAND
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

TABLE_READERS = {".jsonl": "jsonl", ".csv": "csv"}


@dataclass(frozen=True)
class ImageRef:
    key: str  # where the image is: "source:key", printed in findings
    image: bytes | str  # encoded bytes (a shard member) or a file path


@dataclass
class Side:
    name: str  # what the user gave
    images: Iterator[ImageRef]
    total: int | None  # None while a streamed side's count is unknown


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[{") or text.endswith(".tar")


def _yaml_kind(path: Path) -> str:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MedclipError(f"cannot read {path}: {exc}") from exc
    return "suite" if isinstance(data, dict) and "datasets" in data else "manifest"


def open_side(spec: str, root: str | Path | None = None, allow_pipe: bool = False) -> Side:
    """The images ``spec`` names (see the module's docstring); a one-line MedclipError if it names none."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _folder(spec, path)
    if path.suffix.lower() in TABLE_READERS and path.is_file():
        return _table(spec, path)
    if path.is_file() and path.suffix.lower() in resources.SUFFIXES:
        kind = _yaml_kind(path)
        return _suite(spec, root) if kind == "suite" else _manifest(spec, root, allow_pipe)
    if _is_pattern(spec):
        expand = require("braceexpand", NEEDS_BRACEEXPAND).braceexpand
        return _shards(spec, sorted(u for p in expand(spec) for u in glob.glob(p)), allow_pipe)
    if not path.exists():
        try:  # a shipped suite name, then a shipped manifest name
            return _suite(spec, root)
        except MedclipError:
            pass
        try:
            return _manifest(spec, root, allow_pipe)
        except MedclipError as exc:
            raise MedclipError(f"{spec}: not a folder, table, shard glob, manifest or suite ({exc})") from None
    raise MedclipError(f"{spec}: not a folder, table (.jsonl, .csv), shard glob, manifest or suite")


def _folder(spec: str, folder: Path) -> Side:
    from medclip.data.user_files import folder_images

    files = folder_images(folder)
    if not files:
        raise MedclipError(f"{spec}: the folder holds no images")
    return Side(spec, (ImageRef(f"{spec}:{p.relative_to(folder)}", str(p)) for p in files), len(files))


def _table(spec: str, path: Path) -> Side:
    from medclip.evaluation.datasets import read_dataset

    data = read_dataset(TABLE_READERS[path.suffix.lower()], path.parent, name=spec, path=path.name)
    return Side(spec, (ImageRef(f"{spec}:{k}", img) for k, img in zip(data.keys, data.images)), len(data))


def _suite(spec: str, root: str | Path | None) -> Side:
    from medclip.evaluation.datasets import read_dataset
    from medclip.evaluation.suites import load_suite

    suite = load_suite(spec)
    base = Path(root).resolve() if root else suite.root
    if base is None:
        raise MedclipError(f"suite {suite.name} has no data root: give --root")
    refs, seen = [], set()
    for dataset in suite.datasets:
        source = dataset.source
        ident = (source.reader, tuple(sorted((k, str(v)) for k, v in source.args.items())))
        if ident in seen:  # several tasks score the same split
            continue
        seen.add(ident)
        data = read_dataset(source.reader, base, name=dataset.name, **source.args)
        label = source.args.get("path", dataset.name)
        refs += [ImageRef(f"{label}:{k}", img) for k, img in zip(data.keys, data.images)]
    return Side(spec, iter(refs), len(refs))


def _manifest(spec: str, root: str | Path | None, allow_pipe: bool) -> Side:
    from medclip.data.manifest import load_manifest, refuse_commands

    manifest = load_manifest(spec, root)
    refuse_commands([manifest], allow_pipe)
    return _shards(spec, manifest.urls, allow_pipe, manifest.samples)


def _shards(spec: str, urls: list[str], allow_pipe: bool, total: int | None = None) -> Side:
    if not urls:
        raise MedclipError(f"{spec}: no shards match")
    return Side(spec, _stream_shards(urls, allow_pipe), total)


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")


def _stream_shards(urls: list[str], allow_pipe: bool) -> Iterator[ImageRef]:
    from medclip.data.shard_reader import read_shard

    skips: Counter = Counter()
    for url in urls:
        for sample in read_shard(url, lambda _: True, skips, allow_commands=allow_pipe):
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                skips["sample without an image"] += 1
                continue
            yield ImageRef(f"{Path(url).name}:{sample['__key__']}", sample[ext])
    for kind, count in skips.items():
        log.warning("leakage check: %d skipped (%s)", count, kind)
