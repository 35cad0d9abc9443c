"""Shipped recipes, evaluation suites and dataset manifests, addressable by name or by path.

The repository's top-level ``pretrain/``, ``zero_shot/`` and ``datasets_manifests/`` are the one
copy of these files. A wheel carries them as the data packages ``medclip.recipes``,
``medclip.suites`` and ``medclip.manifests`` (setup.cfg maps the directories onto them), read with
:mod:`importlib.resources`; a source checkout reads the directories in place.

A name (``demo``), a file name (``demo.yaml``) or a repository-relative path
(``pretrain/demo.yaml``, ``datasets_manifests/unimed-chexpert.yaml``) that is not an existing file
resolves to the shipped file, so recipes and commands written for the repository work from any
directory. An existing file always wins: a path works everywhere a name does.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

from medclip.errors import MedclipError

SUFFIXES = (".yaml", ".yml")
CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Kind:
    noun: str  # "recipe": used in messages
    package: str  # the data package inside the wheel
    repo_dir: str  # the top-level directory of the repository


KINDS = {
    "recipes": Kind("recipe", "medclip.recipes", "pretrain"),
    "suites": Kind("suite", "medclip.suites", "zero_shot"),
    "manifests": Kind("manifest", "medclip.manifests", "datasets_manifests"),
}


def _kind(kind: str) -> Kind:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown resource kind {kind!r}; one of {', '.join(KINDS)}") from None


def shipped_dir(kind: str) -> Path | None:
    """The directory holding the shipped files of ``kind`` (None if this install has none)."""
    k = _kind(kind)
    # A source checkout (editable install or PYTHONPATH) reads the repository's directories.
    in_checkout = CHECKOUT_ROOT / k.repo_dir
    if (CHECKOUT_ROOT / "setup.cfg").is_file() and in_checkout.is_dir():
        return in_checkout
    try:
        files = importlib.resources.files(k.package)
    except ModuleNotFoundError:
        return None
    # medclip is installed as plain files (never zipped), so these are real paths.
    if isinstance(files, os.PathLike):
        return Path(os.fspath(files))
    for entry in files.iterdir():  # a namespace package's MultiplexedPath
        if isinstance(entry, os.PathLike):
            return Path(os.fspath(entry)).parent
    return None


def shipped(kind: str) -> dict[str, Path]:
    """Shipped files of ``kind`` by name (file stem), sorted by name."""
    folder = shipped_dir(kind)
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix in SUFFIXES and p.is_file()}


def _shipped_candidate(k: Kind, folder: Path, path: Path) -> Path | None:
    parts = path.parts
    if len(parts) == 1:  # a bare name or file name
        name = path.name if path.suffix in SUFFIXES else path.name + ".yaml"
        return folder / name
    if parts[0] == k.repo_dir and ".." not in parts:  # repository-relative, e.g. pretrain/demo.yaml
        return folder.joinpath(*parts[1:])
    return None


def resolve(kind: str, name_or_path: str | os.PathLike) -> Path:
    """The file a name or path stands for; a one-line MedclipError listing the shipped names if none."""
    k = _kind(kind)
    path = Path(os.path.expanduser(os.fspath(name_or_path)))
    if path.is_file():
        return path
    folder = shipped_dir(kind)
    candidate = _shipped_candidate(k, folder, path) if folder is not None else None
    if candidate is not None and candidate.is_file():
        return candidate
    names = ", ".join(shipped(kind)) or "none"
    given = os.fspath(name_or_path)
    what = f"unknown {k.noun} {given!r}" if len(path.parts) == 1 and not path.suffix else f"{k.noun} not found: {given}"
    raise MedclipError(f"{what} (not a file, nor a shipped {k.noun}; shipped: {names}; "
                       f"`medclip list {kind}` shows them)")


def is_shipped(kind: str, path: str | os.PathLike) -> bool:
    """Whether ``path`` is one of the shipped files of ``kind``."""
    folder = shipped_dir(kind)
    return folder is not None and folder.resolve() in Path(path).resolve().parents


def describe(path: Path, limit: int = 100) -> str:
    """The first sentence of a YAML file's leading comment (its description), shortened to ``limit``."""
    words: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#") or not line.lstrip("#").strip():
            break
        words.extend(line.lstrip("#").split())
    text = " ".join(words)
    end = text.find(". ")
    text = text if end < 0 else text[:end + 1]
    return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."
