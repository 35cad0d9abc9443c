"""Strict JSON out: every file and line medclip writes parses with any JSON parser.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default; they are not JSON, and strict parsers
(JavaScript's ``JSON.parse``, ``json.loads`` with ``parse_constant`` raising) reject the whole file.
Here a non-finite float becomes ``null`` and :func:`non_finite_paths` says where, so a caller can
record why the value is undefined beside it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _walk(value: Any, path: str, found: list[str]) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
        return None
    if isinstance(value, dict):
        return {k: _walk(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def finite(value: Any) -> Any:
    """``value`` with every NaN / infinite float (at any depth) replaced by None."""
    return _walk(value, "", [])


def non_finite_paths(value: Any) -> list[str]:
    """Where ``value`` holds NaN / infinite floats: ``"metrics.acc5"``, ``"details.per_class_auc[2]"``."""
    found: list[str] = []
    _walk(value, "", found)
    return found


def dumps(value: Any, **kwargs) -> str:
    """``json.dumps`` of :func:`finite` ``(value)``: no bare NaN / Infinity can reach the text."""
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write(path: Path | str, value: Any, **kwargs) -> Path:
    """``value`` as strict JSON (plus a final newline) in ``path``."""
    path = Path(path)
    path.write_text(dumps(value, **kwargs) + "\n")
    return path
