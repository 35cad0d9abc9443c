"""Deterministic tar shard writing: bounded by samples and bytes, atomic, with a checksummed summary.

Tar members carry fixed metadata (mtime 0, uid/gid 0, mode 0444) so the same input gives
byte-identical shards. A shard is written to ``NAME.tar.partial`` and renamed only when closed,
so an interrupted build never leaves a truncated ``.tar`` behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from medclip import jsonio

SUMMARY_FORMAT = "medclip-shards/1"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class ShardSink:
    """Writes samples (dict of extension -> bytes) into numbered shards under ``out_dir``."""

    out_dir: Path
    name_pattern: str  # e.g. "demo-{shard:06d}.tar"
    max_samples: int = 10_000
    max_bytes: int = 1 << 30
    shards: list[ShardInfo] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _count: int = 0
    _bytes: int = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(len(v) + 1024 for v in members.values())  # + tar header and padding
        if self._tar is not None and (self._count >= self.max_samples or self._bytes + size > self.max_bytes):
            self._close()
        if self._tar is None:
            self._open()
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def _path(self, index: int) -> Path:
        return self.out_dir / self.name_pattern.format(shard=index)

    def _open(self) -> None:
        path = self._path(len(self.shards))
        self._tar = tarfile.open(str(path) + ".partial", "w", format=tarfile.GNU_FORMAT)
        self._count = self._bytes = 0

    def _close(self) -> None:
        path = self._path(len(self.shards))
        self._tar.close()
        self._tar = None
        os.replace(str(path) + ".partial", path)
        self.shards.append(ShardInfo(path.name, self._count, path.stat().st_size, sha256_file(path)))

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            path = self._path(len(self.shards))
            self._tar.close()
            self._tar = None
            Path(str(path) + ".partial").unlink(missing_ok=True)


def write_summary(path: Path, shards: list[ShardInfo], **extra) -> Path:
    data = {
        "format": SUMMARY_FORMAT,
        "samples": sum(s.samples for s in shards),
        "shards": [vars(s) for s in shards],
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(jsonio.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_summary(path: str | Path) -> dict:
    from medclip.errors import MedclipError

    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise MedclipError(f"shard summary not found: {path}") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise MedclipError(f"cannot read shard summary {path}: {exc}") from exc
    if data.get("format") != SUMMARY_FORMAT or not isinstance(data.get("shards"), list):
        raise MedclipError(f"{path} is not a medclip shard summary (format {data.get('format')!r})")
    return data
