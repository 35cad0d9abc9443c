"""Outputs never overwrite inputs: each command checks where it will write before it writes.

A file output that is one of the command's inputs (however the path is spelled) is refused. An output
folder is refused when it overlaps an input (is one, or lies inside one, or holds one) or when it is
*foreign*: not empty and not a previous output of the same command. A command marks its folders with
:data:`MARKER` so a re-run into them needs no flag. ``--force`` (the ``force`` argument) lifts every
check.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from medclip import __version__, jsonio
from medclip.errors import MedclipError

MARKER = ".medclip-output.json"


def _same(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner.resolve().is_relative_to(outer.resolve())


def check_output_file(output: Path | str, inputs: Iterable[Path | str | None], force: bool = False) -> None:
    """One-line error when ``output`` is one of ``inputs`` (unless ``force``)."""
    if force:
        return
    output = Path(output)
    for source in inputs:
        if source and _same(output, Path(source)):
            raise MedclipError(f"the output {output} is the input {source}: writing it would replace the input; "
                               f"choose another output path (or pass --force to replace it)")


def previous_command(directory: Path) -> str | None:
    """The command whose output ``directory`` is (from its marker), or None."""
    try:
        return json.loads((directory / MARKER).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def claim_output_dir(directory: Path | str, command: str, inputs: Iterable[Path | str | None] = (),
                     force: bool = False) -> Path:
    """Check ``directory`` as ``command``'s output folder, create it and mark it; one-line error if refused."""
    directory = Path(directory)
    if not force:
        for source in inputs:
            if source and Path(source).exists() and (_within(directory, Path(source))
                                                     or _within(Path(source), directory)):
                raise MedclipError(f"the output folder {directory} overlaps the input {source}: writing there "
                                   f"could replace or mix with the input; choose another folder "
                                   f"(or pass --force)")
        if directory.is_file():
            raise MedclipError(f"the output folder {directory} is a file: choose a folder")
        if directory.is_dir() and any(directory.iterdir()) and previous_command(directory) != command:
            raise MedclipError(f"the output folder {directory} is not empty and is not an earlier "
                               f"'medclip {command}' output: choose a new or empty folder "
                               f"(or pass --force to write into it)")
    directory.mkdir(parents=True, exist_ok=True)
    jsonio.write(directory / MARKER, {"command": command, "medclip": __version__})
    return directory
