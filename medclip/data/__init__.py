"""Data: shard builder, manifests, resumable WebDataset stream and the synthetic demo set."""

from typing import TYPE_CHECKING

from medclip import _lazy

if TYPE_CHECKING:  # imported on first use (medclip._lazy)
    from medclip.data.concepts import concept_key, normalize_cui
    from medclip.data.images import normalize_images

__all__ = ["concept_key", "normalize_cui", "normalize_images"]

_lazy.attach(__name__)
