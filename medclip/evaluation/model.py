"""The model under evaluation: a medclip encoder, an open_clip name / ``local-dir:``, or any object
with ``encode_image`` and ``encode_text``.

:class:`EvalModel` gives every kind the same two calls, both returning L2-normalized float32 CPU
tensors: ``embed_images(data)`` (a DataLoader with worker processes preprocesses the images
while the model runs) and ``embed_texts(texts)`` (one batched pass over all prompts).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medclip.errors import MedclipError
from medclip.evaluation.datasets import EvalData
from medclip.evaluation.images import BatchedTransform, ImageCollate


class _ImageDataset(Dataset):
    def __init__(self, images: list, transform: BatchedTransform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.transform(self.images[i])


@dataclass
class EmbedOptions:
    """How images are embedded.

    ``draft``: decode JPEGs at a reduced 1/2^k scale when they are at least twice the model input
    (see :mod:`medclip.evaluation.images`); faster, pixel values differ slightly from the plain
    transform. ``draft=False`` gives exactly ``preprocess(image)`` for every image.
    ``prefetch_factor``: batches each worker prepares ahead (only with ``num_workers > 0``).
    """

    batch_size: int = 128
    num_workers: int = 0
    progress: bool = False
    draft: bool = True
    prefetch_factor: int = 4

    def transform_tag(self) -> str:
        """What changes the features besides model and data; part of memo and feature-cache keys."""
        return f"draft={int(self.draft)}"


class EvalModel:
    """Uniform embedding interface over the accepted model kinds.

    Image features are memoized per data identity for the life of this object, so wrap a model
    whose weights change (mid-training evaluation) in a fresh ``EvalModel`` each time.
    """

    def __init__(self, model, name: str = ""):
        if not (hasattr(model, "encode_image") and hasattr(model, "encode_text")):
            raise MedclipError(f"model of type {type(model).__name__} has no encode_image / encode_text")
        self.model = model
        self.name = name or getattr(model, "name", "") or type(model).__name__
        self.preprocess = getattr(model, "preprocess", None)
        self._fingerprint: str | None = None
        # Suite entries often share images (one test split, several label fields): embed them once.
        self._image_memo: dict[str, torch.Tensor] = {}

    @property
    def is_medclip(self) -> bool:
        from medclip.models.encoder import Encoder

        return isinstance(self.model, Encoder)

    def _torch_module(self):
        module = getattr(self.model, "model", self.model)
        return module if isinstance(module, torch.nn.Module) else None

    def fingerprint(self) -> str:
        """Digest of the weights (every tensor's bytes) and the preprocessing; keys feature caches."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            module = self._torch_module()
            if module is None:
                raise MedclipError(f"cannot fingerprint a model of type {type(self.model).__name__} "
                                   f"(no state_dict): give a cache key or disable the feature cache")
            for key, value in module.state_dict().items():
                h.update(key.encode())
                h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                         if value.numel() else b"")
            h.update(repr(self.preprocess).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @torch.inference_mode()
    def embed_images(self, data: EvalData | list, options: EmbedOptions | None = None) -> torch.Tensor:
        options = options or EmbedOptions()
        memo_key = (data.identity() + "|" + options.transform_tag()
                    if isinstance(data, EvalData) and data.identity_parts else None)
        if memo_key in self._image_memo:
            return self._image_memo[memo_key]
        images = data.images if isinstance(data, EvalData) else list(data)
        if self.preprocess is None:
            raise MedclipError("the model has no .preprocess; pass one with EvalModel.preprocess = ...")
        transform = BatchedTransform(self.preprocess, draft=options.draft)
        workers = max(0, int(options.num_workers))
        # Workers decode and resize the next batches while the model runs on the current one.
        loader = DataLoader(_ImageDataset(images, transform), batch_size=options.batch_size,
                            num_workers=workers, shuffle=False, collate_fn=ImageCollate(transform),
                            prefetch_factor=options.prefetch_factor if workers else None,
                            pin_memory=self._device().type == "cuda", persistent_workers=False)
        out = []
        for batch in tqdm(loader, desc="images", disable=not options.progress, leave=False):
            out.append(self._encode_image_batch(batch))
        if not out:
            return torch.empty(0, 0)
        feats = F.normalize(torch.cat(out), dim=-1)
        if memo_key is not None:
            self._image_memo[memo_key] = feats
        return feats

    def _device(self) -> torch.device:
        return _device_of(self._torch_module())

    def _encode_image_batch(self, batch: torch.Tensor) -> torch.Tensor:
        if self.is_medclip:
            return self.model.encode_image(batch, batch_size=len(batch), normalize=False)
        return self.model.encode_image(batch.to(self._device(), non_blocking=True)).float().cpu()

    @torch.inference_mode()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        if self.is_medclip:
            return self.model.encode_text(list(texts), batch_size=batch_size)
        tokenizer = getattr(self.model, "tokenizer", None)
        device = _device_of(self._torch_module())
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start:start + batch_size])
            ids = tokenizer(chunk).to(device) if tokenizer is not None else chunk
            out.append(self.model.encode_text(ids).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


def _device_of(module) -> torch.device:
    if module is None:
        return torch.device("cpu")
    try:
        return next(module.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def resolve_model(model, device=None, precision: str | None = None, **load_kwargs) -> EvalModel:
    """A model spec as the command line takes it, or an object with ``encode_image`` / ``encode_text``.

    Specs: ``NAME=PATH`` (a named pretrained model, e.g. ``unimed-clip-b16=unimed-clip-vit-b16.pt``,
    read offline from its downloaded file or snapshot; results are named NAME), a NAME alone
    (fetched), a medclip or open_clip architecture, an export directory / ``local-dir:DIR``, or a
    training checkpoint.
    """
    if isinstance(model, EvalModel):
        return model
    if isinstance(model, str):
        from medclip.models.loading import load_spec, spec_name

        return EvalModel(load_spec(model, device=device, precision=precision, **load_kwargs), name=spec_name(model))
    return EvalModel(model)
