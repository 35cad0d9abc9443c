"""Fast evaluation image pipeline: decode (JPEG draft), PIL geometry per image, tensor math per batch.

An open_clip eval transform is ``Resize -> CenterCrop -> convert RGB -> ToTensor -> Normalize``.
Run per image, the last two are a handful of tiny torch ops each; with several intra-op threads on
a busy CPU those ops cost more in thread hand-offs than in arithmetic (measured: ~15 ms per
128 px image vs ~1 ms single-threaded). :class:`BatchedTransform` therefore splits the transform
at the to-tensor step: the PIL prefix runs per image and yields a uint8 HWC array (no torch op),
and the to-tensor + normalize suffix runs once per batch in :func:`collate_images`, with exactly
torchvision's arithmetic (``x.float().div(255).sub(mean).div(std)``), so the values are bitwise
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medclip.errors import MedclipError
from medclip.imaging import DICOM_SUFFIXES, MedicalPreprocess, load_image

try:  # torchvision is an open_clip dependency; keep the fallback if a build lacks it
    from torchvision.transforms import Compose, Normalize, ToTensor
except ImportError:  # pragma: no cover
    Compose = Normalize = ToTensor = None


@dataclass(frozen=True)
class _Split:
    pil_steps: tuple  # per image, PIL -> PIL
    mean: torch.Tensor | None  # [C, 1, 1] float32, or None when the transform does not normalize
    std: torch.Tensor | None
    draft_size: int  # longest side of the model input; JPEGs are decoded at >= this size


def _split_transform(transform) -> _Split | None:
    """The PIL prefix and normalization constants of ``Compose([..., ToTensor, Normalize?])``, else None."""
    if Compose is None or not isinstance(transform, Compose):
        return None
    steps = list(transform.transforms)
    cut = next((i for i, s in enumerate(steps) if isinstance(s, ToTensor)), None)
    if cut is None:
        return None
    pil_steps, tail = steps[:cut], steps[cut + 1:]
    if any(isinstance(s, (ToTensor, Normalize)) for s in pil_steps):
        return None
    mean = std = None
    if tail:
        if len(tail) != 1 or not isinstance(tail[0], Normalize) or tail[0].inplace:
            return None
        mean = torch.as_tensor(tail[0].mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.as_tensor(tail[0].std, dtype=torch.float32).view(-1, 1, 1)
        if (std == 0).any():
            return None
    sizes = []
    for step in pil_steps:
        size = getattr(step, "size", None)
        if isinstance(size, int):
            sizes.append(size)
        elif isinstance(size, (list, tuple)) and size and all(isinstance(s, int) for s in size):
            sizes.append(max(size))
    return _Split(tuple(pil_steps), mean, std, max(sizes) if sizes else 0)


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
            img.draft("RGB", (draft_size, draft_size))
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
    """Per-image half of a preprocess: ``__call__`` returns a uint8 HWC array (fast path) or a tensor.

    Arrays from the fast path become model input in :func:`collate_images`; anything else is the
    preprocess's own output. ``exact`` (draft off) makes every value identical to ``preprocess``.
    """

    def __init__(self, preprocess, draft: bool = True):
        self.preprocess = preprocess
        self.window = preprocess.window if isinstance(preprocess, MedicalPreprocess) else None
        transform = preprocess.transform if isinstance(preprocess, MedicalPreprocess) else preprocess
        self.split = _split_transform(transform) if self.window is None else None
        self.draft_size = self.split.draft_size if (self.split is not None and draft) else 0

    @property
    def batched(self) -> bool:
        return self.split is not None

    def __call__(self, source):
        if self.split is None:
            if isinstance(source, (bytes, bytearray)):
                source = decode(source)
            return self.preprocess(source)
        img = decode(source, None, self.draft_size)
        for step in self.split.pil_steps:
            img = step(img)
        if not isinstance(img, Image.Image) or img.mode not in ("RGB", "L"):
            raise MedclipError(f"preprocess step produced {type(img).__name__} "
                               f"{getattr(img, 'mode', '')}, expected an 8-bit PIL image")
        arr = np.asarray(img, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr

    def finish(self, batch_hwc: torch.Tensor) -> torch.Tensor:
        """[B, H, W, C] uint8 -> [B, C, H, W] float32, torchvision's to_tensor + normalize arithmetic."""
        x = batch_hwc.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
        if self.split.mean is not None:
            x = x.sub_(self.split.mean).div_(self.split.std)
        return x


class ImageCollate:
    """DataLoader ``collate_fn``: stacks fast-path arrays and finishes them in one batched op."""

    def __init__(self, transform: BatchedTransform):
        self.transform = transform

    def __call__(self, items: list) -> torch.Tensor:
        return collate_images(items, self.transform)


def collate_images(items: list, transform: BatchedTransform) -> torch.Tensor:
    if all(isinstance(x, np.ndarray) for x in items):
        shapes = {x.shape for x in items}
        if len(shapes) != 1:
            raise MedclipError(f"preprocess produced images of different sizes {sorted(shapes)}; "
                               f"the model needs one input size")
        return transform.finish(torch.from_numpy(np.stack(items)))
    if any(isinstance(x, np.ndarray) for x in items):
        items = [transform.finish(torch.from_numpy(x[None]))[0] if isinstance(x, np.ndarray) else x
                 for x in items]
    return torch.stack(items)
