"""The one reader of WebDataset tar shards: webdataset's sample-key rule and its grouping of members.

A member ``DIR/NAME.EXT`` belongs to sample ``DIR/NAME`` (the path up to the first dot of the *file
name*, so dotted directories such as DICOM UIDs ``1.2.840.113619.2.55/0001.png`` stay in the key) with
extension ``EXT`` (lower-cased). Consecutive members with the same key form one sample, as webdataset
groups them. Every reader of shards (training stream, ``data check``, evaluation, concepts, rehearsal,
demo) goes through :func:`member_groups`; each caller decides what a damaged tar means for it.

Regular files whose name has no extension, webdataset's ``__meta__`` files, directories and links
belong to no sample (webdataset skips them): they ride along in the group being read, with extension
``None``, so a caller rewriting a shard keeps every member in its place.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from medclip.errors import MedclipError

# webdataset's key rule (``webdataset.tariterators.base_plus_ext``), restated so that a core install (no
# webdataset) reads shards for evaluation; tests/test_tar_samples.py pins it to the installed webdataset.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: metadata members, not sample files


def split_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a member name by webdataset's own rule; None: no sample file."""
    match = _KEY_EXT.match(name)
    return None if match is None else (match.group(1), match.group(2).lower())


def _sample_file(info: tarfile.TarInfo) -> tuple[str, str] | None:
    if not info.isreg() or _META.match(info.name):
        return None
    return split_name(info.name)


@dataclass
class Member:
    """One tar member: its header, its extension (None: part of no sample), its bytes (None: not read)."""

    info: tarfile.TarInfo
    ext: str | None
    data: bytes | None


def member_groups(tar: tarfile.TarFile, read: bool = True, stream: bool = False,
                  on_error: Callable[[Exception], object] | None = None
                  ) -> Iterator[tuple[str | None, list[Member]]]:
    """(sample key, members) per sample in tar order; the key is None only for a tar holding no sample file.

    ``read=False`` reads headers only (a random-access tar then seeks over the data). ``stream``: the tar
    is read in stream mode (``r|*``) and its headers are forgotten as it goes, as webdataset does.
    ``on_error``: a failing read ends the tar there, the sample read so far is still given (as webdataset
    gives it) and the error goes to ``on_error``; without it the error is raised.
    """
    key: str | None = None
    group: list[Member] = []
    try:
        for info in tar:
            named = _sample_file(info)
            data = tar.extractfile(info).read() if read and info.isreg() else None
            if stream:
                tar.members = []  # a long stream would otherwise keep every header
            if named is not None and key is not None and named[0] != key:
                yield key, group
                group = []
            if named is not None:
                key = named[0]
            group.append(Member(info, named[1] if named else None, data))
    except Exception as exn:
        if on_error is None:
            raise
        on_error(exn)
    if group:
        yield key, group


def sample_parts(members: list[Member], where: str) -> dict[str, bytes]:
    """Extension -> bytes of one sample's members; two members with one extension is a one-line error."""
    parts: dict[str, bytes] = {}
    for m in members:
        if m.ext is None:
            continue
        if m.ext in parts:
            raise MedclipError(f"{where}: {m.info.name}: a second .{m.ext} in one sample")
        parts[m.ext] = m.data if m.data is not None else b""
    return parts


@dataclass(frozen=True)
class ShardMember:
    """Where a member's bytes lie in an uncompressed local tar: read by offset when needed (picklable,
    so loader worker processes read the images themselves)."""

    shard: str
    name: str
    offset: int
    size: int

    @classmethod
    def of(cls, shard: str, info: tarfile.TarInfo) -> ShardMember:
        return cls(os.path.abspath(shard), info.name, info.offset_data, info.size)  # the same file in any cwd

    def read(self) -> bytes:
        try:
            with open(self.shard, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(self.size)
        except OSError as exc:
            raise MedclipError(f"cannot read {self.name} from shard {self.shard}: {exc}") from exc
        if len(data) != self.size:
            raise MedclipError(f"cannot read {self.name} from shard {self.shard}: the shard is shorter than when "
                               f"it was listed (changed while in use?)")
        return data
