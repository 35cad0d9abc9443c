"""The sample record written into shards (``KEY.json``) and its validation.

Schema (all areas rely on it): ``captions`` list[str], ``labels`` dict, ``modality`` str,
``source`` str, ``licence`` str, ``concepts`` list of {start, end, cui, name, caption_index,
negated?, group?} with character offsets into ``captions[caption_index]`` (end exclusive), and
optionally ``boxes`` list of {cui, name, bbox [x0, y0, x1, y1] in stored-image pixels}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medclip.data.concepts import normalize_cui


@dataclass
class SourceRecord:
    """One input row before encoding: image (path, bytes or PIL image) and its text/labels."""

    image: Any
    captions: list[str]
    labels: dict[str, Any] = field(default_factory=dict)
    modality: str = ""
    source: str = ""
    licence: str = ""
    concepts: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    origin: str = ""  # where it came from (file:line), for the skip report


class RecordError(ValueError):
    """A record that cannot be written; ``kind`` names the skip counter."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # crosses process boundaries in the builder's pool
        return RecordError, (self.kind, str(self))


def clean_captions(captions) -> list[str]:
    """Non-blank string captions; text is kept verbatim so concept offsets stay valid."""
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)):
        return []
    return [c for c in captions if isinstance(c, str) and c.strip()]


def reindex_concepts(concepts, raw_captions) -> list:
    """Point ``caption_index`` at the caption list with blank captions removed (-1 if it was blank)."""
    if not isinstance(raw_captions, (list, tuple)):
        return list(concepts or [])
    new_index, k = {}, 0
    for i, c in enumerate(raw_captions):
        if isinstance(c, str) and c.strip():
            new_index[i] = k
            k += 1
    out = []
    for c in concepts or []:
        if isinstance(c, dict):
            try:
                c = {**c, "caption_index": new_index.get(int(c.get("caption_index", 0)), -1)}
            except (TypeError, ValueError):
                pass
        out.append(c)
    return out


def validate_concepts(concepts, captions: list[str]) -> tuple[list[dict], int]:
    """Concepts whose span lies inside its caption, normalised; returns (kept, number dropped)."""
    kept: list[dict] = []
    dropped = 0
    for c in concepts or []:
        try:
            idx = int(c.get("caption_index", 0))
            start, end = int(c["start"]), int(c["end"])
            cui = normalize_cui(c["cui"])
            if idx < 0:
                raise IndexError(idx)
            caption = captions[idx]
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            dropped += 1
            continue
        if not (0 <= start < end <= len(caption)) or not cui:
            dropped += 1
            continue
        item = {"start": start, "end": end, "cui": cui, "name": str(c.get("name") or caption[start:end]),
                "caption_index": idx}
        if c.get("negated"):
            item["negated"] = True
        if c.get("group"):
            item["group"] = str(c["group"])
        kept.append(item)
    return kept, dropped


def record_json(rec: SourceRecord, captions: list[str], concepts: list[dict]) -> dict:
    out = {
        "captions": captions,
        "labels": rec.labels,
        "modality": rec.modality,
        "source": rec.source,
        "licence": rec.licence,
        "concepts": concepts,
    }
    if rec.boxes:
        out["boxes"] = rec.boxes
    return out
