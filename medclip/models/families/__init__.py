"""Readers for the public medical CLIP families, one module each, in one registry.

Each module has ``TITLE``, ``claims(keys)`` (does a state dict look like this family's?) and
``read(source, entry, hf_text_dir) -> Converted``. The registry maps an entry's ``family`` to its
module; :func:`identify` names the family a foreign checkpoint belongs to, for error messages.
"""

from __future__ import annotations

from pathlib import Path

from medclip.models.families import biomedclip, conceptclip, medsiglip, pmc_clip, unimed
from medclip.models.families.base import Converted, FamilyError, preview

FAMILIES = {"biomedclip": biomedclip, "unimed": unimed, "pmc_clip": pmc_clip, "conceptclip": conceptclip,
            "medsiglip": medsiglip}


def _open_clip_native(keys) -> bool:
    return "visual.conv1.weight" in keys and any(".transformer.resblocks." in k or k.startswith("transformer.")
                                                 for k in keys if not k.startswith("visual."))


# Checked in order: the specific signatures first (ConceptCLIP's training checkpoint is also an
# open_clip timm + HF layout, UniMed-CLIP's image tower is open_clip's native ViT).
_SIGNATURES = [(m.TITLE, m.claims) for m in (conceptclip, pmc_clip, unimed, medsiglip, biomedclip)] + [
    ("open_clip / medclip (native towers)", _open_clip_native)]


def identify(keys) -> str | None:
    """The family a state dict's keys look like, or None."""
    keys = set(keys)
    return next((title for title, claims in _SIGNATURES if claims(keys)), None)


def require(state: dict, required: tuple[str, ...], entry, title: str, source: Path) -> None:
    """One-line error unless every ``required`` key is present: names the expected family, the
    family the checkpoint looks like, and the first keys that did not match."""
    missing = [k for k in required if k not in state]
    if not missing:
        return
    found = identify(state)
    looks = f" (it looks like a {found} checkpoint)" if found and found != title else ""
    expected = {_stem(r) for r in required}
    unmatched = [k for k in state if _stem(k) not in expected]  # in the checkpoint's own order
    raise FamilyError(
        f"{entry.name}: {source} is not a {title} checkpoint{looks}: missing {preview(missing)}; "
        f"first keys that did not match: {preview(unmatched or list(state))}"
    )


def _stem(key: str) -> str:
    """The first two components of a key (``visual.conv1``, ``text_encoder.transformer``)."""
    return ".".join(key.split(".")[:2])


def get(family: str):
    return FAMILIES[family]


__all__ = ["FAMILIES", "Converted", "FamilyError", "get", "identify", "require"]
