"""Evaluation data: one record per image (image source, raw label values, captions).

Readers are registered by name (``@register_reader("jsonl")``), so a suite YAML names a reader
and its arguments and a new layout is one function, not a branch in a chain. Every reader
returns an :class:`EvalData`; labels stay raw (``labels[field]`` as stored) and the task maps
them to class indices, skipping and counting samples whose label is not one of the classes.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from medclip.data.tar_samples import ShardMember, member_groups, sample_parts
from medclip.data.user_files import class_folders, csv_rows, folder_images, text_lines
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # the image of a shard sample, the first one present


@dataclass
class EvalData:
    """Images with their label fields and captions. ``images`` are paths, :class:`ShardMember` references
    into uncompressed shards (read when embedded) or encoded bytes (compressed shards)."""

    name: str
    images: list
    labels: list[dict]
    captions: list[list[str]]
    keys: list[str]
    identity_parts: list[str] = field(default_factory=list)  # what the feature cache key hashes
    # Bad samples met while reading, by reason: dropped ones, and kept ones with an unusable part.
    bad_samples: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> int:
        """Samples left out while reading (an unusable caption keeps its sample: only retrieval needs it)."""
        return sum(n for reason, n in self.bad_samples.items() if reason != "undecodable_txt")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices) -> EvalData:
        idx = list(indices)
        return EvalData(self.name, [self.images[i] for i in idx], [self.labels[i] for i in idx],
                        [self.captions[i] for i in idx], [self.keys[i] for i in idx],
                        [self.identity_parts[i] for i in idx] if self.identity_parts else [])

    def identity(self) -> str:
        """Digest of what the data is: file paths with sizes and mtimes, or content hashes of bytes."""
        h = hashlib.sha256()
        for part in self.identity_parts:
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()


def open_image(source) -> Image.Image | str:
    """What ``Encoder.preprocess`` accepts: a path stays a path, bytes (or a shard member) become a PIL image."""
    if isinstance(source, ShardMember):
        source = source.read()
    if isinstance(source, (bytes, bytearray)):
        with Image.open(io.BytesIO(source)) as img:
            img.load()
            return img.copy()
    return source


def file_identity(path: Path) -> str:
    try:
        st = path.stat()
    except OSError as exc:
        raise MedclipError(f"image not found: {path}") from exc
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


ReaderFn = Callable[..., EvalData]
READERS: dict[str, ReaderFn] = {}


def register_reader(name: str):
    def wrap(fn: ReaderFn) -> ReaderFn:
        READERS[name] = fn
        return fn
    return wrap


def read_dataset(reader: str, root: Path | str, name: str = "", **kwargs) -> EvalData:
    """Build an :class:`EvalData` with the reader registered as ``reader``."""
    fn = READERS.get(reader)
    if fn is None:
        raise MedclipError(f"unknown dataset reader {reader!r}; choose one of {', '.join(sorted(READERS))}")
    try:
        data = fn(Path(root), name=name, **kwargs)
    except TypeError as exc:
        raise MedclipError(f"bad arguments for reader {reader!r}: {exc}") from exc
    if len(data) == 0:
        raise MedclipError(f"dataset {name or root} ({reader}) holds no samples")
    return data


def _resolve(root: Path, path: str | None) -> Path:
    p = Path(path) if path else root
    return p if p.is_absolute() else root / p


def _as_captions(value) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if str(v).strip()]


@register_reader("image_folder")
def read_image_folder(root: Path, name: str = "", path: str | None = None, label_field: str = "label") -> EvalData:
    """``DIR/<class>/*.jpg``: the subfolder name is the label (stored under ``label_field``).

    Hidden files and folders (``.DS_Store``, ``.cache/``) and ``Thumbs.db``-style junk are no class or image.
    """
    base = _resolve(root, path)
    if not base.is_dir():
        raise MedclipError(f"image folder not found: {base}")
    images, labels, keys, ident = [], [], [], []
    for class_dir in class_folders(base):
        for img in folder_images(class_dir):
            images.append(str(img))
            labels.append({label_field: class_dir.name})
            keys.append(f"{class_dir.name}/{img.relative_to(class_dir)}")
            ident.append(file_identity(img))
    return EvalData(name or base.name, images, labels, [[] for _ in images], keys, ident)


def _table_rows(rows, base: Path, image_field: str, caption_field: str | None, source: str) -> EvalData:
    """EvalData of ``(line number, row)`` pairs; a row without an image stops the read, naming its line."""
    images, labels, captions, keys, ident = [], [], [], [], []
    for line, row in rows:
        if image_field not in row:
            raise MedclipError(f"{source}:{line}: the row has no {image_field!r} field")
        img = _resolve(base, str(row[image_field]))
        images.append(str(img))
        labels.append(row)
        captions.append(_as_captions(row.get(caption_field)) if caption_field else [])
        keys.append(str(row[image_field]))
        ident.append(file_identity(img))
    return EvalData(Path(source).stem, images, labels, captions, keys, ident)


@register_reader("csv")
def read_csv(root: Path, name: str = "", path: str = "", image_field: str = "path",
             caption_field: str | None = None, image_root: str | None = None) -> EvalData:
    """A CSV with an image path column (relative to ``image_root`` or the CSV's folder) and label columns."""
    file = _resolve(root, path)
    if not file.is_file():
        raise MedclipError(f"CSV file not found: {file}")
    rows = list(csv_rows(file, need=image_field))
    data = _table_rows(rows, _resolve(root, image_root) if image_root else file.parent, image_field,
                       caption_field, str(file))
    data.name = name or data.name
    return data


@register_reader("jsonl")
def read_jsonl(root: Path, name: str = "", path: str = "", image_field: str = "image",
               caption_field: str | None = "caption", image_root: str | None = None) -> EvalData:
    """One JSON object per line with an image path (relative to the file's folder) and label fields."""
    file = _resolve(root, path)
    if not file.is_file():
        raise MedclipError(f"JSONL file not found: {file}")
    rows = []
    for n, line in text_lines(file):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MedclipError(f"{file}:{n}: invalid JSON: {exc}") from exc
            if not isinstance(row, dict):
                raise MedclipError(f"{file}:{n}: not a JSON object")
            rows.append((n, row))
    data = _table_rows(rows, _resolve(root, image_root) if image_root else file.parent, image_field,
                       caption_field, str(file))
    data.name = name or data.name
    return data


@register_reader("wds")
def read_webdataset(root: Path, name: str = "", path: str = "") -> EvalData:
    """Shards ``KEY.jpg|png`` + ``KEY.json`` (labels dict, captions) + ``KEY.txt``; ``path`` is a glob.

    Samples are grouped by webdataset's key rule (:mod:`medclip.data.tar_samples`). Images of an
    uncompressed tar are kept as references (:class:`ShardMember`) and read when embedded; a compressed
    tar cannot be read by offset, so its image bytes are kept in memory.
    """
    pattern = str(_resolve(root, path))
    shards = sorted(glob.glob(pattern))
    if not shards:
        raise MedclipError(f"no webdataset shards match {pattern}")
    images, labels, captions, keys, ident = [], [], [], [], []
    bad: dict[str, int] = {}
    for shard in shards:
        for key, parts, image_ext, image in _shard_samples(shard):
            if image is None:
                _count_bad(bad, "missing_image", f"shard {shard}: sample {key} has no image; skipped")
                continue
            meta = _sample_meta(parts, shard, key, bad)
            if meta is None:
                continue
            row = dict(meta["labels"])
            for extra in ("modality", "source"):
                row.setdefault(extra, meta.get(extra))
            # The .txt is decoded only when the JSON has no captions: a task that never reads it never fails on it.
            caps = _as_captions(meta.get("captions")) or _txt_captions(parts, shard, key, bad)
            images.append(image)
            labels.append(row)
            captions.append(caps)
            keys.append(key)
            ident.append(f"{key}|{hashlib.sha256(parts[image_ext]).hexdigest()}|{len(caps)}")
    return EvalData(name or Path(shards[0]).parent.name, images, labels, captions, keys, ident, bad)


def _shard_samples(shard: str) -> Iterator[tuple[str, dict[str, bytes], str | None, ShardMember | bytes | None]]:
    """(key, extension -> bytes, image extension, image source) of each sample of one local shard; the
    source is a :class:`ShardMember` in a plain tar, the bytes in a compressed one (no offsets there)."""
    try:
        with tarfile.open(shard) as tar:
            by_offset = isinstance(tar.fileobj, io.BufferedReader)  # tarfile's own file: not gzip, bz2 or xz
            for key, group in member_groups(tar):
                if key is None:
                    continue
                parts = sample_parts(group, f"shard {shard}")
                ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if ext is None:
                    yield key, parts, None, None
                    continue
                member = next(m for m in group if m.ext == ext)
                yield key, parts, ext, ShardMember.of(shard, member.info) if by_offset else parts[ext]
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise MedclipError(f"cannot read shard {shard}: {exc}") from exc


def _count_bad(bad: dict[str, int], reason: str, message: str) -> None:
    """Count a bad sample by reason (as the training loader counts its skips) and log it by shard and key."""
    bad[reason] = bad.get(reason, 0) + 1
    log.warning(message)


def _sample_meta(parts: dict, shard: str, key: str, bad: dict[str, int]) -> dict | None:
    """The sample's JSON object with a ``labels`` object ({} without a .json); None (counted) if it is bad."""
    if "json" not in parts:
        return {"labels": {}}
    try:
        meta = json.loads(parts["json"])
    except ValueError as exc:  # invalid JSON or not UTF-8
        _count_bad(bad, "bad_json", f"shard {shard}: sample {key} has invalid JSON ({exc}); skipped")
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels") or {}, dict):
        _count_bad(bad, "bad_json", f"shard {shard}: sample {key}: its JSON is not an object with a 'labels' "
                                    f"object; skipped")
        return None
    return {**meta, "labels": meta.get("labels") or {}}


def _txt_captions(parts: dict, shard: str, key: str, bad: dict[str, int]) -> list[str]:
    """Captions from the sample's .txt; [] (counted, the sample kept) when it is not UTF-8."""
    try:
        return _as_captions(parts.get("txt", b"").decode("utf-8"))
    except UnicodeDecodeError as exc:
        _count_bad(bad, "undecodable_txt", f"shard {shard}: sample {key}: .txt is not UTF-8 ({exc}); "
                                           f"its caption is left out")
        return []
