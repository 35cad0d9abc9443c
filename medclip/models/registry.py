"""medclip's JSON model configs (open_clip schema), registered with open_clip in memory.

Configs may reference files shipped in the package with the placeholder ``{medclip_assets}``
(for example the offline WordPiece text tower); they are resolved when read. open_clip's public
``add_model_config`` only reads files, and medclip writes none to register: the resolved configs go
into open_clip's architecture table directly, through :func:`open_clip_table`, the one place medclip
touches that private name (tests/test_foundation.py pins it against the installed open_clip).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE_DIR / "model_configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
ASSETS_PLACEHOLDER = "{medclip_assets}"
MODEL_PREFIX = "medclip-"


def _resolved_text(path: Path) -> str:
    return path.read_text().replace(ASSETS_PLACEHOLDER, str(ASSETS_DIR))


@functools.cache
def shipped_configs() -> dict[str, dict]:
    """{architecture name: config} of the configs medclip ships, placeholders resolved."""
    files = sorted(CONFIG_DIR.glob("*.json"), key=lambda f: f.stem)  # medclip-small before medclip-small-resnet18
    return {f.stem: json.loads(_resolved_text(f)) for f in files}


def open_clip_table() -> dict:
    """open_clip's {architecture name: config} table, the dict its list_models, get_model_config and
    create_model read. Looked up on each call: open_clip's add_model_config rebinds it (keeping its entries)."""
    from open_clip import factory

    return factory._MODEL_CONFIGS


def register_model_configs() -> list[str]:
    """Make medclip's architectures known to open_clip in this process; writes no file. Idempotent.

    medclip's own functions call it; call it before ``open_clip.create_model("medclip-tiny")`` in code
    that otherwise uses open_clip alone. An entry the user registered under the same name is kept.
    """
    table = open_clip_table()
    for name, cfg in shipped_configs().items():
        if name not in table:
            table[name] = copy.deepcopy(cfg)  # open_clip hands out deep copies; keep ours pristine
    return list(shipped_configs())


def list_models() -> list[str]:
    """Names of the architectures medclip ships (all also usable through open_clip)."""
    import open_clip

    register_model_configs()
    return [name for name in open_clip.list_models() if name.startswith(MODEL_PREFIX)]


def get_model_config(name: str) -> dict | None:
    """A deep copy of a registered config (medclip's or open_clip's), or None."""
    import open_clip

    register_model_configs()
    return open_clip.get_model_config(name)
