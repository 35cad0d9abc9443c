"""Decoded samples -> one training batch (the batch contract the trainer and the objectives read)."""

from __future__ import annotations

import math

import numpy as np
import torch

from medclip.data.decode import DecodedSample
from medclip.data.device_decode import PENDING_KEY, DeferredJpeg, pending_jpegs
from medclip.errors import MedclipError


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Empty batch tensor; in a DataLoader worker, allocated in shared memory from the start.

    The DataLoader sends a worker's tensors to the main process through shared memory and copies
    any tensor not already there (a 9.6 MB copy and 2,400 fresh page faults per 224 px uint8 batch
    of 64). torch's own default_collate allocates its batch in shared memory for the same reason.
    """
    if torch.utils.data.get_worker_info() is not None:
        new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
        if new_shared is not None:
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            return torch.empty(0, dtype=dtype).set_(new_shared(nbytes)).view(shape)
    return torch.empty(shape, dtype=dtype)


def collate_images(images: list[torch.Tensor | np.ndarray | DeferredJpeg]) -> torch.Tensor:
    """float [3, H, W] tensors -> float [B, 3, H, W]; uint8 planes [3 or 1, H, W] -> uint8 [B, 3, H, W].

    The uint8 batch is filled in place (no per-sample tensors, no stack), contiguous channels-first
    (so the consumer's normalisation reads it in order); a single gray plane fills all 3 channels.
    A deferred JPEG's slot is zero until the consumer decodes it (see medclip.data.device_decode).
    """
    if not isinstance(images[0], (np.ndarray, DeferredJpeg)):
        shape = images[0].shape
        if any(t.shape != shape for t in images):
            return torch.stack(images)  # raises torch's error about the differing sizes
        return torch.stack(images, out=_batch_tensor((len(images), *shape), images[0].dtype))
    sizes = {a.size if isinstance(a, DeferredJpeg) else a.shape[1:] for a in images}
    if len(sizes) > 1:
        raise MedclipError(f"images of one batch differ in size: {sorted(sizes)}"
                           " (the transform must produce a fixed size)")
    batch = _batch_tensor((len(images), 3, *sizes.pop()), torch.uint8)
    view = batch.numpy()
    for i, a in enumerate(images):
        view[i] = 0 if isinstance(a, DeferredJpeg) else a  # [1, H, W] broadcasts to the 3 channels
    return batch


def _concept_tensors(samples: list[DecodedSample]) -> dict:
    """Spans [B, C, 2], ids [B, C], mask [B, C] (the caption's concepts that are there) and negated [B, C] (the
    ones it says are absent, "no hemorrhage"), padded to the batch's most concepts (C >= 1)."""
    b = len(samples)
    c = max([1] + [len(s.spans) for s in samples])
    spans = torch.zeros(b, c, 2, dtype=torch.long)
    ids = torch.zeros(b, c, dtype=torch.long)
    mask = torch.zeros(b, c, dtype=torch.bool)
    negated = torch.zeros(b, c, dtype=torch.bool)
    for i, s in enumerate(samples):
        for j, (span, cui, pos) in enumerate(zip(s.spans, s.cuis, s.positive)):
            spans[i, j, 0], spans[i, j, 1] = span
            ids[i, j] = cui
            mask[i, j] = pos
            negated[i, j] = not pos
    return {"concept_spans": spans, "concept_ids": ids, "concept_mask": mask, "concept_negated": negated}


def _name_tokens(samples: list[DecodedSample], concepts: int) -> torch.Tensor:
    """[B, C, L] concept name tokens, padded with the tokenizer's pad id."""
    first = samples[0]
    names = torch.full((len(samples), concepts, first.names.shape[1]), first.name_pad, dtype=torch.long)
    for i, s in enumerate(samples):
        names[i, : len(s.names)] = s.names
    return names


def _pool_keys(samples: list[DecodedSample]) -> torch.Tensor | None:
    """[B, K] int64 caption keys of each sample's pool, its drawn caption's first; short pools are padded
    with the drawn caption's key (a repeat adds no positive). None when a sample has none."""
    if not samples or not all(s.pool_keys for s in samples):
        return None
    width = max(len(s.pool_keys) for s in samples)
    rows = [list(s.pool_keys) for s in samples]
    return torch.tensor([row + [row[0]] * (width - len(row)) for row in rows], dtype=torch.int64)


def collate(samples: list[DecodedSample]) -> dict:
    """The training batch contract: images, text, concept_spans/ids/mask (C >= 1), keys, and pool_keys [B, K]
    (the caption keys of each sample's pool, column 0 the drawn caption's; see DecodedSample.pool_keys).

    ``images`` is uint8 [B, 3, H, W] when the decoder ships uint8 (see the stream's doc), else float;
    with device decode, JPEGs still to decode are under ``pending_jpegs`` (normalize_batch decodes them).
    """
    concepts = _concept_tensors(samples)
    out = {
        "images": collate_images([s.image for s in samples]),
        "text": torch.stack([s.ids for s in samples]),
        **concepts,
        "keys": [s.key for s in samples],
    }
    pool = _pool_keys(samples)
    if pool is not None:
        out["pool_keys"] = pool
    if samples and samples[0].names is not None:
        out["concept_name_tokens"] = _name_tokens(samples, concepts["concept_ids"].shape[1])
    pending = pending_jpegs([s.image for s in samples], lambda n: _batch_tensor((n,), torch.uint8))
    if pending is not None:
        out[PENDING_KEY] = pending
    return out
