"""Data: shard builder, manifests, resumable WebDataset stream and the synthetic demo set."""

from medclip.data.concepts import concept_key, normalize_cui
from medclip.data.images import normalize_images

__all__ = ["concept_key", "normalize_cui", "normalize_images"]
