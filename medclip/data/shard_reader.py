"""Reading one tar shard into raw samples, with every failure of the shard counted as a skip.

A shard URL is opened with webdataset's ``gopen`` (local paths, ``pipe:`` commands, ``http(s)://``
through curl) or fsspec (``s3://``, ``gcs://``, ...: opened here, per call, unless the user gave webdataset
a handler of their own; webdataset's global table is left as it is). Whatever goes wrong with a shard — missing,
unreadable, a command that exits non-zero, a network read that breaks, a tar cut short — ends that
shard and is counted by kind in the caller's ``skips``; the samples read before the failure are kept.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from urllib.parse import urlparse

from medclip._deps import require
from medclip.data.tar_samples import member_groups
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

SHARD_FAILURES = ("truncated_tar", "unreadable_shard")  # skip kinds counted per shard, not per sample
FSSPEC_SCHEMES = ("s3", "gcs", "az", "abfs", "abfss", "oss", "r2", "webhdfs")
# webdataset (the train extra) is imported when a shard is read: evaluation imports this module's
# callers (manifests, the decoder) in a core install too.
NEEDS_WEBDATASET = "reading WebDataset shards"


def open_shard(url: str):
    """A readable binary stream of the shard: fsspec for its object-store schemes, else webdataset's
    gopen (which also runs a handler the user put in ``webdataset.gopen_schemes``, s3 included)."""
    try:
        scheme = urlparse(url).scheme
    except ValueError:  # gopen cannot parse it either: it fails there as an unreadable shard
        scheme = ""
    wds = require("webdataset", NEEDS_WEBDATASET)
    if scheme in FSSPEC_SCHEMES and scheme not in wds.gopen_schemes:
        import fsspec

        return fsspec.open(url, "rb").open()
    return wds.gopen(url)


def is_command(url: str) -> bool:
    """A URL webdataset opens by running it in a shell. (http, gs, ... run curl or gsutil with the URL as
    one argument, no shell: such a URL cannot run a command of its own.) The scheme is read as
    webdataset's gopen reads it, with urllib: " pipe:" and "PIPE:" are pipe: URLs too."""
    try:
        return urlparse(url).scheme == "pipe"
    except ValueError:  # e.g. "http://[x": gopen cannot parse it either, so it fails as an unreadable shard
        return False


class ShardErrors:
    """webdataset exception handler: remembers the error kinds of the shard being read, and the first
    cause of each (a failing command or read is often reported twice: by the tar reader, then at close)."""

    def __init__(self):
        self.causes: dict[str, str] = {}

    def add(self, kind: str, message: object) -> None:
        self.causes.setdefault(kind, str(message))

    def __call__(self, exn: Exception) -> bool:
        truncated = isinstance(exn, (tarfile.ReadError, EOFError)) or "unexpected end" in str(exn).lower()
        self.add("truncated_tar" if truncated else "unreadable_shard", _cause(exn))
        return True  # continue with the next shard

    def kind(self) -> str:
        """The counted kind: a failing read or command often also leaves the tar short."""
        return "unreadable_shard" if "unreadable_shard" in self.causes else next(iter(self.causes))

    def report(self, url: str) -> str:
        """The counted kind, logged once."""
        kind = self.kind()
        log.warning("skipped shard %s (%s): %s", url, kind, self.causes[kind])
        return kind


def _cause(exn: Exception) -> str:
    """The error's own words: webdataset wraps them as (message, stream, url) or "message @ <stream>";
    its pipe: reader says "(args, kwargs): exit N (read) {}" when the command fails."""
    message = exn.args[0] if exn.args and isinstance(exn.args[0], str) else str(exn)
    message = re.sub(r" @ <[^>]*>$", "", message) or type(exn).__name__
    status = re.search(r"\): exit (-?\d+) \(\w+\)", message)
    return f"the command exited with status {status.group(1)}" if status else message


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
               allow_commands: bool = False, errors: ShardErrors | None = None) -> Iterator[dict]:
    """The samples (dicts of extension -> bytes, ``__key__``) of one shard whose index ``keep`` accepts.

    ``report=False``: another reader of the same shard counts and logs its failure (shared shards), or the
    caller reports it from ``errors`` (``data check``, which prints each failed shard once with its cause).
    A ``pipe:`` URL is refused unless ``allow_commands`` (the user's opt-in, see manifest.refuse_commands).
    """
    if is_command(url) and not allow_commands:
        raise MedclipError(f"refusing to run the shell command of shard {url!r}: pass --allow-pipe to allow it")
    errors = ShardErrors() if errors is None else errors
    try:
        stream = TailStream(open_shard(url))
    except Exception as exn:
        errors(exn)
        stream = None
    if stream is not None:
        for index, sample in enumerate(_samples(stream, errors)):
            if keep(index):
                yield sample
        try:
            if not errors.causes and not stream.complete():
                errors.add("truncated_tar", "it ends before the tar end-of-archive marker")
        except Exception as exn:
            errors(exn)
        try:
            stream.close()  # a pipe: command reports its exit status here
        except Exception as exn:
            errors(exn)
    if report and errors.causes:
        skips[errors.report(url)] += 1


def _samples(stream: TailStream, errors: ShardErrors) -> Iterator[dict]:
    """The samples of a tar stream as webdataset makes them: ``__key__`` and extension -> bytes; a second
    member with one extension is an error of the shard and left out (webdataset's group_by_keys)."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
    except Exception as exn:
        errors(exn)
        return
    for key, members in member_groups(tar, stream=True, on_error=errors):
        sample: dict = {"__key__": key}
        for m in members:
            if m.ext is None:
                continue
            if m.ext in sample:
                errors(ValueError(f"{m.info.name}: duplicate file name in tar file"))
                continue
            sample[m.ext] = m.data
        if len(sample) > 1:
            yield sample
