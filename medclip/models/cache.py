"""medclip's cache directory and content-addressed directories inside it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    """medclip's cache directory (MEDCLIP_CACHE, XDG_CACHE_HOME or ~/.cache), created if missing."""
    base = os.environ.get("MEDCLIP_CACHE") or os.environ.get("XDG_CACHE_HOME")
    root = Path(base) / "medclip" if base else Path.home() / ".cache" / "medclip"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-probe"
        probe.touch()
        probe.unlink()
        return root
    except OSError:  # read-only home (containers, clusters): fall back to the temp dir
        return Path(tempfile.gettempdir()) / f"medclip-{os.getuid()}"


def cached_dir(kind: str, files: dict[str, bytes]) -> Path:
    """``cache_root()/kind/DIGEST`` holding ``files`` (name -> bytes); written once, each file atomically,
    so concurrent processes never see half a file and equal contents share one directory."""
    digest = hashlib.sha256(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())})
                            .encode()).hexdigest()[:16]
    target = cache_root() / kind / digest
    if not all((target / name).is_file() for name in files):
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            tmp = target / f".{name}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target / name)
    return target
