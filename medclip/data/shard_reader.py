"""Reading one tar shard into raw samples, with every failure of the shard counted as a skip.

A shard URL is opened with webdataset's ``gopen`` (local paths, ``pipe:`` commands, ``http(s)://``
through curl) or fsspec (``s3://``, ``gcs://``, ...). Whatever goes wrong with a shard — missing,
unreadable, a command that exits non-zero, a network read that breaks, a tar cut short — ends that
shard and is counted by kind in the caller's ``skips``; the samples read before the failure are kept.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator

import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_expander

from medclip.errors import MedclipError

log = logging.getLogger(__name__)

SHARD_FAILURES = ("truncated_tar", "unreadable_shard")  # skip kinds counted per shard, not per sample
FSSPEC_SCHEMES = ("s3", "gcs", "az", "abfs", "abfss", "oss", "r2", "webhdfs")


def _gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
    import fsspec

    return fsspec.open(url, mode).open()


for _scheme in FSSPEC_SCHEMES:  # webdataset's documented dispatch table; keep any existing handler
    wds.gopen_schemes.setdefault(_scheme, _gopen_fsspec)


def is_command(url: str) -> bool:
    """A URL webdataset opens by running it in a shell. (http, gs, ... run curl or gsutil with the URL as
    one argument, no shell: such a URL cannot run a command of its own.)"""
    return url.startswith("pipe:")


class ShardErrors:
    """webdataset exception handler: remembers the error kinds of the shard being read."""

    def __init__(self, report: bool = True):
        self.kinds: set[str] = set()
        self.report = report

    def add(self, kind: str, message: object) -> None:
        self.kinds.add(kind)
        if self.report:
            log.warning("shard error (%s): %s", kind, message)

    def __call__(self, exn: Exception) -> bool:
        truncated = isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in str(exn).lower()
        self.add("truncated_tar" if truncated else "unreadable_shard", exn)
        return True  # continue with the next shard


class TailStream:
    """File wrapper remembering the byte count and the last block read, to prove the tar was complete."""

    def __init__(self, raw):
        self.raw = raw
        self.total = 0
        self.tail = b""

    def read(self, n=-1):
        data = self.raw.read(n)
        self.total += len(data)
        self.tail = (self.tail + data[-512:])[-512:]  # never copy a whole (large) read
        return data

    def complete(self) -> bool:
        while self.read(1 << 16):  # drain the end padding
            pass
        # A whole tar is a sequence of 512-byte blocks ending in zero blocks. tarfile's stream mode
        # silently stops at a header cut in half, so this is the only way to see that truncation.
        return self.total % 512 == 0 and self.total > 0 and self.tail == bytes(512)

    def close(self):
        close = getattr(self.raw, "close", None)
        if close:
            close()


def read_shard(url: str, keep: Callable[[int], bool], skips: Counter, report: bool = True,
               allow_commands: bool = False) -> Iterator[dict]:
    """The samples (dicts of extension -> bytes, ``__key__``) of one shard whose index ``keep`` accepts.

    ``report=False``: another reader of the same shard counts and logs its failure (shared shards).
    A ``pipe:`` URL is refused unless ``allow_commands`` (the user's opt-in, see manifest.refuse_commands).
    """
    if is_command(url) and not allow_commands:
        raise MedclipError(f"refusing to run the shell command of shard {url!r}: pass --allow-pipe to allow it")
    errors = ShardErrors(report)
    try:
        stream = TailStream(wds.gopen(url))
    except Exception as exn:
        errors(exn)
        stream = None
    if stream is not None:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=errors)
        for index, sample in enumerate(group_by_keys(files, handler=errors)):
            if keep(index):
                yield sample
        try:
            if not errors.kinds and not stream.complete():
                errors.add("truncated_tar", f"{url} ends before the tar end-of-archive marker")
        except Exception as exn:
            errors(exn)
        try:
            stream.close()  # a pipe: command reports its exit status here
        except Exception as exn:
            errors(exn)
    if report:  # one kind per shard: a failing read or command often also leaves the tar short
        skips.update({"unreadable_shard"} if "unreadable_shard" in errors.kinds else errors.kinds)
