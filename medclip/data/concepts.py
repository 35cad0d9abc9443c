"""Stable integer ids for concept identifiers (UMLS CUIs and the like).

The id must be identical across processes, machines and runs (Python's ``hash`` is salted per
process), so it is derived from a cryptographic hash of the normalised identifier.
"""

from __future__ import annotations

import hashlib

_MASK_63 = (1 << 63) - 1


def normalize_cui(cui: str) -> str:
    """Canonical form of a concept id: surrounding whitespace removed, upper case (c0032326 == C0032326)."""
    return str(cui).strip().upper()


def concept_key(cui: str) -> int:
    """Stable non-negative int64 id of a concept string (blake2b, 8 bytes, masked to 63 bits)."""
    digest = hashlib.blake2b(normalize_cui(cui).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _MASK_63
