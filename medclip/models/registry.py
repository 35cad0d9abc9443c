"""Registers medclip's JSON model configs (open_clip schema) with open_clip.

Configs may reference files shipped in the package with the placeholder ``{medclip_assets}``
(for example the offline WordPiece text tower). open_clip only reads config files, so resolved
copies are written once to a cache directory and that directory is registered through
open_clip's public ``add_model_config``.
"""

from __future__ import annotations

from pathlib import Path

from medclip.models.cache import cache_root, cached_dir  # noqa: F401  (cache_root re-exported)

PACKAGE_DIR = Path(__file__).resolve().parent.parent
CONFIG_DIR = PACKAGE_DIR / "model_configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
ASSETS_PLACEHOLDER = "{medclip_assets}"
MODEL_PREFIX = "medclip-"

_registered_dir: Path | None = None


def _resolved_text(path: Path) -> str:
    return path.read_text().replace(ASSETS_PLACEHOLDER, str(ASSETS_DIR))


def register_model_configs() -> Path:
    """Write resolved configs to a content-addressed cache dir and register it with open_clip."""
    global _registered_dir
    if _registered_dir is not None:
        return _registered_dir
    # Imported here, not at the top: open_clip's first import runs medclip._register's hook, which
    # calls this function (and imports this module) from inside that import.
    import open_clip

    if _registered_dir is not None:  # the hook just did it
        return _registered_dir
    files = sorted(CONFIG_DIR.glob("*.json"))
    target = cached_dir("model_configs", {f.name: _resolved_text(f).encode() for f in files})
    open_clip.add_model_config(target)
    _registered_dir = target
    return target


def list_models() -> list[str]:
    """Names of the architectures medclip ships (all also usable through open_clip)."""
    import open_clip

    return [name for name in open_clip.list_models() if name.startswith(MODEL_PREFIX)]


def get_model_config(name: str) -> dict | None:
    """A deep copy of a registered config (medclip's or open_clip's), or None."""
    import open_clip

    return open_clip.get_model_config(name)
