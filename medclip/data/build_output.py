"""Where a build's files go, and how a build replaces an earlier one in the same folder and prefix.

Shards are written into a hidden staging folder beside their destination (``.PREFIX[-PART].building``)
and moved in only once the whole build succeeded, so a build that fails or writes nothing leaves the
earlier one as it was. Installing removes the earlier summary and merged manifest first (their
presence means "complete"), moves the new shards in (each rename atomic, over same-named old shards),
then removes the earlier shards the new build did not write; the caller writes the new summary last.

What a build owns, and so replaces:
- a whole build (part 0/1): every shard and summary of its prefix, parts' included, and the manifest
  written for them (``PREFIX.yaml`` whose ``summary`` is ``PREFIX-summary.json``);
- part i/n: its own shards and summary, and what no part of an n-part build can own: a whole build's
  shards, parts numbered n or above, and the merged summary and manifest (stale once a part changes).
  The other parts below n are its siblings, perhaps being built at this moment: never touched.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import yaml

from medclip.data.shards import ShardInfo

log = logging.getLogger(__name__)


def _shard_stem(prefix: str, part: tuple[int, int]) -> tuple[str, int]:
    """(name stem, digits of the shard number) of a build's shards: the one place naming them."""
    i, n = part
    return (prefix, 6) if n == 1 else (f"{prefix}-{i:03d}", 5)


def shard_name_pattern(prefix: str, part: tuple[int, int]) -> str:
    """File name format of a build's shards (``{shard}`` is the shard number within the part)."""
    stem, digits = _shard_stem(prefix, part)
    return f"{stem}-{{shard:0{digits}d}}.tar"


def shard_brace_pattern(prefix: str, part: tuple[int, int], count: int) -> str:
    """Brace-expansion pattern of a part's shards 0 .. count - 1 (they are numbered without gaps)."""
    stem, digits = _shard_stem(prefix, part)
    return f"{stem}-{{{0:0{digits}d}..{count - 1:0{digits}d}}}.tar"


def summary_name(prefix: str, part: tuple[int, int]) -> str:
    i, n = part
    return f"{prefix}-summary.json" if n == 1 else f"{prefix}-summary-{i:03d}.json"


def staging_dir(out: Path, prefix: str, part: tuple[int, int]) -> Path:
    """An empty hidden folder in ``out`` for this build's shards (what a crashed build left there goes)."""
    staged = out / f".{_shard_stem(prefix, part)[0]}.building"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    return staged


def _is_merged_manifest(path: Path, prefix: str) -> bool:
    """``PREFIX.yaml`` describing this prefix's summary (as merge and data.build write it), not a user's own file."""
    try:
        fields = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False
    summary = fields.get("summary") if isinstance(fields, dict) else None
    return isinstance(summary, str) and Path(summary).name == f"{prefix}-summary.json"


def owned_files(out: Path, prefix: str, part: tuple[int, int]) -> list[Path]:
    """Files of earlier builds in ``out`` that a build of ``prefix`` and ``part`` replaces (see the module doc)."""
    i, n = part
    p = re.escape(prefix)
    whole = re.compile(rf"{p}-\d{{6}}\.tar|{p}-summary\.json")  # digits as _shard_stem names them
    of_part = re.compile(rf"{p}-(\d{{3}})-\d{{5}}\.tar|{p}-summary-(\d{{3}})\.json")

    def owned(name: str) -> bool:
        if whole.fullmatch(name):
            return True
        match = of_part.fullmatch(name)
        if match is None:
            return False
        j = int(match.group(1) or match.group(2))
        return n == 1 or j == i or j >= n

    files = sorted(f for f in out.iterdir() if owned(f.name) and f.is_file())
    manifest = out / f"{prefix}.yaml"
    if manifest.is_file() and _is_merged_manifest(manifest, prefix):
        files.append(manifest)
    return files


def install(staged: Path, out: Path, shards: list[ShardInfo], prefix: str, part: tuple[int, int]) -> list[str]:
    """Move the staged shards into ``out`` in place of the earlier build's; returns the names removed."""
    earlier = owned_files(out, prefix, part)
    markers = [f for f in earlier if f.suffix != ".tar"]
    for f in markers:  # first: no summary or manifest describes a half-replaced folder
        f.unlink(missing_ok=True)
    for shard in shards:
        os.replace(staged / shard.name, out / shard.name)
    new = {shard.name for shard in shards}
    stale = [f for f in earlier if f.suffix == ".tar" and f.name not in new]
    for f in stale:
        f.unlink(missing_ok=True)
    shutil.rmtree(staged, ignore_errors=True)
    removed = sorted(f.name for f in stale + markers if f.name != summary_name(prefix, part))
    if removed:
        log.info("%s: removed %d file(s) of an earlier build of %s: %s", out, len(removed), prefix, listing(removed))
    return removed


def listing(names: list[str], shown: int = 5) -> str:
    """The first few names, and how many in all when there are more (a rebuild can remove thousands)."""
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
