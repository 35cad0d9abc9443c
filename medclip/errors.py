"""The one exception type medclip raises for bad input; the CLI prints it as a single line."""

from __future__ import annotations

import errno
import os
import re

# How torch re-raises a data-loader worker's exception in the main process: the type is kept, the
# message becomes "Caught T in DataLoader worker process N.\nOriginal Traceback ...\nmodule.T: message".
_WORKER_WRAPPED = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback")


def worker_message(text: str) -> str:
    """The original message of an exception torch re-raised from a data-loader worker (else ``text``)."""
    match = _WORKER_WRAPPED.match(text)
    if match is None:
        return text
    lines = text.rstrip("\n").splitlines()
    for i in range(len(lines) - 1, 0, -1):  # the last "module.T: message" line starts the message
        head, sep, rest = lines[i].partition(": ")
        if sep and not lines[i][:1].isspace() and head.rsplit(".", 1)[-1] == match.group(1):
            return "\n".join([rest, *lines[i + 1:]])
    return text


# What to do about the operating-system errors a user meets (paths, permissions, full disks).
OS_ERROR_FIXES = {
    errno.EACCES: "no permission: choose a location you can write to, or fix its permissions",
    errno.EPERM: "no permission: choose a location you can write to, or fix its permissions",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOTDIR: "a part of the path is a regular file, not a directory: choose another path",
    errno.ENOSPC: "no space left on the device: free some space or choose another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another disk",
    errno.ENOENT: "no such file or directory: check the path",
    errno.EISDIR: "a directory where a file was expected: check the path",
    errno.EEXIST: "it already exists: choose another path",
}


def os_error_line(exc: OSError) -> str | None:
    """``"<strerror>: <file> (<fix>)"`` for the OS errors users cause, else None."""
    if exc.errno not in OS_ERROR_FIXES:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or os.strerror(exc.errno)}{where} ({OS_ERROR_FIXES[exc.errno]})"


class MedclipError(Exception):
    """A user-facing error: wrong name, missing file, bad config value, mismatched checkpoint.

    Raised in a data-loader worker, it reaches the main process with its own one-line message
    rather than torch's wrapper text (the worker's traceback).
    """

    def __init__(self, *args):
        if args and isinstance(args[0], str):
            args = (worker_message(args[0]), *args[1:])
        super().__init__(*args)
