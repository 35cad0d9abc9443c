"""Write concept annotations into JSONL files and into WebDataset tar shards (in place, atomically),
and read samples with boxes back from shards for the grounding evaluation."""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from medclip import jsonio
from medclip.concepts.annotator import ConceptAnnotator
from medclip.data.tar_samples import Member, member_groups, sample_parts
from medclip.errors import MedclipError
from medclip.imaging import upright

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png")


@dataclass
class AnnotationStats:
    records: int = 0
    annotated: int = 0  # records that got concepts written
    mentions: int = 0
    negated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, other: AnnotationStats) -> None:
        self.records += other.records
        self.annotated += other.annotated
        self.mentions += other.mentions
        self.negated += other.negated
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.records} records, {self.annotated} annotated, {self.mentions} mentions "
                f"({self.negated} negated), skipped: {skipped}")


def _captions(value) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def _annotate_record(record: dict, captions: list[str], annotator: ConceptAnnotator, out_field: str,
                     stats: AnnotationStats) -> None:
    mentions = annotator.annotate_captions(captions)
    record[out_field] = mentions
    stats.annotated += 1
    stats.mentions += len(mentions)
    stats.negated += sum(m["negated"] for m in mentions)


def _replace_atomically(target: Path, write) -> None:
    """Write through ``write(handle)`` to a temp file beside ``target``, then rename over it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def annotate_jsonl(src: str | Path, dst: str | Path, annotator: ConceptAnnotator, field_name: str = "caption",
                   out_field: str = "concepts") -> AnnotationStats:
    """Copy ``src`` to ``dst`` with ``out_field`` added to each row (``dst`` may equal ``src``).

    ``field_name`` holds a caption or a list of captions (mentions then carry ``caption_index``).
    Rows without it are written unchanged and counted as skipped.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise MedclipError(f"input not found: {src}")
    stats = AnnotationStats()
    lines = []
    with src.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MedclipError(f"{src}:{line_no}: not valid JSON ({exc.msg})") from exc
            stats.records += 1
            captions = _captions(record.get(field_name)) if isinstance(record, dict) else None
            if captions is None:
                stats.skip(f"without a '{field_name}' caption")
            else:
                _annotate_record(record, captions, annotator, out_field, stats)
            lines.append(jsonio.dumps(record, ensure_ascii=False))
    _replace_atomically(dst, lambda h: h.write(("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")))
    return stats


def _annotate_sample(group: list[Member], annotator, out_field, overwrite, stats, shard) -> list[Member]:
    """The sample's members, its JSON member replaced by one with the concepts added."""
    files = {m.ext: (i, m) for i, m in enumerate(group) if m.ext is not None}
    if "json" not in files:
        if files:
            stats.records += 1
            stats.skip("without a .json")
        return group
    index, member = files["json"]
    info, data = member.info, member.data
    stats.records += 1
    try:
        record = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedclipError(f"{shard}: member {info.name} is not valid JSON ({exc})") from exc
    if record.get(out_field) and not overwrite:
        stats.skip(f"already with '{out_field}' (pass overwrite)")
        return group
    captions = _captions(record.get("captions"))
    if not captions and "txt" in files:
        captions = [files["txt"][1].data.decode("utf-8", errors="replace")]
    if not captions or not any(c.strip() for c in captions):
        stats.skip("without captions")
        return group
    _annotate_record(record, captions, annotator, out_field, stats)
    payload = jsonio.dumps(record, ensure_ascii=False).encode("utf-8")
    new_info = tarfile.TarInfo(info.name)
    new_info.size, new_info.mtime, new_info.mode = len(payload), info.mtime, info.mode
    new_info.uname, new_info.gname, new_info.uid, new_info.gid = info.uname, info.gname, info.uid, info.gid
    group = list(group)
    group[index] = Member(new_info, "json", payload)
    return group


def annotate_shard(src: str | Path, annotator: ConceptAnnotator, dst: str | Path | None = None,
                   out_field: str = "concepts", overwrite: bool = False) -> AnnotationStats:
    """Add concept mentions to every sample's JSON of a tar shard, in place unless ``dst`` is given.

    Captions are the JSON's ``captions`` list (else the ``.txt``); mentions carry ``caption_index``.
    The new shard is written to a temp file and renamed over the target, so an interrupted run never
    leaves a truncated shard. Samples that already have concepts are kept unless ``overwrite``.
    """
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    if not src.is_file():
        raise MedclipError(f"shard not found: {src}")
    stats = AnnotationStats()

    def write(handle) -> None:
        try:
            with tarfile.open(src, "r:*") as tar_in, tarfile.open(fileobj=handle, mode="w") as tar_out:
                for _, group in member_groups(tar_in):
                    for m in _annotate_sample(group, annotator, out_field, overwrite, stats, src):
                        tar_out.addfile(m.info, io.BytesIO(m.data) if m.data is not None else None)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise MedclipError(f"cannot read shard {src}: {exc}") from exc

    _replace_atomically(dst, write)
    return stats


def iter_shard_samples(path: str | Path) -> Iterator[dict]:
    """Samples of a shard as dicts: ``key``, ``json`` (parsed), ``image`` (bytes), ``image_ext``, ``txt``."""
    path = Path(path)
    if not path.is_file():
        raise MedclipError(f"shard not found: {path}")
    try:
        with tarfile.open(path, "r:*") as tar:
            for key, group in member_groups(tar):
                if key is None:
                    continue
                parts = sample_parts(group, str(path))
                sample: dict = {"key": key}
                if "json" in parts:
                    try:
                        sample["json"] = json.loads(parts["json"].decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                        name = next(m.info.name for m in group if m.ext == "json")
                        raise MedclipError(f"{path}: member {name} is not valid JSON ({exc})") from exc
                image_ext = next((ext for ext in IMAGE_EXTS if ext in parts), None)
                if image_ext:
                    sample["image"], sample["image_ext"] = parts[image_ext], image_ext
                if "txt" in parts:
                    sample["txt"] = parts["txt"].decode("utf-8", errors="replace")
                yield sample
    except (tarfile.TarError, EOFError) as exc:
        raise MedclipError(f"cannot read shard {path}: {exc}") from exc


def expand_shards(paths) -> list[Path]:
    """Shard files from files and directories (``*.tar`` inside, sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(p.glob("*.tar")))
        elif p.is_file():
            out.append(p)
        else:
            raise MedclipError(f"no such shard or directory: {p}")
    if not out:
        raise MedclipError(f"no .tar shards in {', '.join(map(str, paths))}")
    return out


def sample_image(sample: dict, shard) -> Image.Image:
    """The RGB image of a sample read by :func:`iter_shard_samples`; a one-line error if it is broken."""
    try:
        return upright(Image.open(io.BytesIO(sample["image"]))).convert("RGB")
    except Exception as exc:  # PIL raises several types for broken images
        raise MedclipError(f"{shard}: image of {sample.get('key')} cannot be decoded: {exc}") from exc
