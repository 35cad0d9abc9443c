"""Fast evaluation image pipeline: decode (JPEG draft), PIL geometry per image, tensor math per batch.

An open_clip eval transform is ``Resize -> CenterCrop -> convert RGB -> ToTensor -> Normalize``.
Run per image, the last two are a handful of tiny torch ops each; with several intra-op threads on
a busy CPU those ops cost more in thread hand-offs than in arithmetic (measured: ~15 ms per
128 px image vs ~1 ms single-threaded). :class:`BatchedTransform` therefore splits the transform
at the to-tensor step as the training stream does (:func:`medclip.data.images.split_transform`):
the PIL prefix runs per image and yields uint8 channel planes (no torch op), and the batch is
stacked (:func:`medclip.data.batching.collate_images`) and normalised once
(:func:`medclip.data.images.normalize_images`, torchvision's arithmetic), so the values are bitwise
those of the per-image transform.

JPEG draft mode (``Image.draft``) lets libjpeg decode at 1/2, 1/4 or 1/8 scale, skipping most of
the IDCT work and the large bicubic resize. PIL only reduces while both sides stay at least the
requested size, so it acts only on images at least twice the model input; the resize that
follows still produces the exact input size. It changes pixel values slightly (DCT-domain
downscaling instead of bicubic), so it is an option (``EmbedOptions.draft``), on by default.

Transforms of another shape (no to-tensor step, extra tensor ops, windowed inputs) fall back to
the per-image transform unchanged.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from medclip.data.batching import collate_images
from medclip.data.images import normalize_images, split_transform, to_uint8_planes
from medclip.data.reduced_decode import dct_scale, draft_jpeg
from medclip.data.tar_samples import ShardMember
from medclip.errors import MedclipError
from medclip.imaging import DICOM_SUFFIXES, MedicalPreprocess, load_image


def input_side(pil_transform) -> int:
    """Longest side of the model input the PIL steps produce (0: unknown); JPEGs are decoded at >= this."""
    sizes = []
    for step in getattr(pil_transform, "transforms", []):
        size = getattr(step, "size", None)
        if isinstance(size, int):
            sizes.append(size)
        elif isinstance(size, (list, tuple)) and size and all(isinstance(s, int) for s in size):
            sizes.append(max(size))
    return max(sizes) if sizes else 0


def _open_drafted(source, draft_size: int) -> Image.Image | None:
    """A JPEG decoded at the smallest 1/2^k scale keeping both sides >= ``draft_size``; None if not a JPEG."""
    if isinstance(source, (bytes, bytearray)):
        fp, where = io.BytesIO(source), "image bytes"
    elif isinstance(source, (str, Path)) and Path(source).suffix.lower() not in DICOM_SUFFIXES:
        fp, where = str(source), str(source)
        if not Path(source).is_file():
            raise MedclipError(f"image not found: {source}")
    else:
        return None
    try:
        with Image.open(fp) as img:
            if img.format != "JPEG":
                return None
            draft_jpeg(img, dct_scale(min(img.size) / draft_size))
            img.load()
            return load_image(img)  # mode handling as the per-image path (L, CMYK -> RGB)
    except MedclipError:
        raise
    except Exception as exc:
        raise MedclipError(f"cannot read {where}: {exc}") from exc


def decode(source, window=None, draft_size: int = 0) -> Image.Image:
    """One image source (path, bytes, PIL, array) as an 8-bit RGB PIL image, JPEG-drafted when asked."""
    if draft_size and window is None:
        drafted = _open_drafted(source, draft_size)
        if drafted is not None:
            return drafted
    if isinstance(source, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(source)) as img:
                img.load()
                return load_image(img, window)
        except MedclipError:
            raise
        except Exception as exc:
            raise MedclipError(f"cannot read image bytes: {exc}") from exc
    return load_image(source, window)


class BatchedTransform:
    """Per-image half of a preprocess: ``__call__`` returns uint8 planes [C, H, W] (fast path) or a tensor.

    :meth:`collate` turns a list of either into the model's float batch. ``exact`` (draft off) makes
    every value identical to ``preprocess``.
    """

    def __init__(self, preprocess, draft: bool = True):
        self.preprocess = preprocess
        self.window = preprocess.window if isinstance(preprocess, MedicalPreprocess) else None
        transform = preprocess.transform if isinstance(preprocess, MedicalPreprocess) else preprocess
        self.split = split_transform(transform) if self.window is None else None
        self.draft_size = input_side(self.split.pil_transform) if (self.split is not None and draft) else 0

    @property
    def batched(self) -> bool:
        return self.split is not None

    def __call__(self, source):
        if isinstance(source, ShardMember):  # an image of a shard is read here, in the loader's worker
            source = source.read()
        if self.split is None:
            if isinstance(source, (bytes, bytearray)):
                source = decode(source)
            return self.preprocess(source)
        img = self.split.pil_transform(decode(source, None, self.draft_size))
        if not isinstance(img, Image.Image) or img.mode not in ("RGB", "L"):
            raise MedclipError(f"preprocess step produced {type(img).__name__} "
                               f"{getattr(img, 'mode', '')}, expected an 8-bit PIL image")
        return to_uint8_planes(img)

    def collate(self, items: list) -> torch.Tensor:
        """The float batch [B, 3, H, W]: fast-path planes stacked and normalised at once, else stacked."""
        batch = collate_images(items)
        if batch.dtype == torch.uint8:
            return normalize_images(batch, self.split.mean, self.split.std)
        return batch


class ImageCollate:
    """DataLoader ``collate_fn``: :meth:`BatchedTransform.collate` (a picklable callable)."""

    def __init__(self, transform: BatchedTransform):
        self.transform = transform

    def __call__(self, items: list) -> torch.Tensor:
        return self.transform.collate(items)
