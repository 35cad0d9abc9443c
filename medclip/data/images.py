"""Image hand-off between loader workers and the trainer: uint8 pixels, normalised by the consumer.

A 224 px float32 batch of 64 images is 38.5 MB; the same pixels as uint8 are 9.6 MB. Workers
therefore run the image transform only up to its final ``ToTensor`` (+ ``Normalize``) steps,
ship uint8 pixels, and the consumer calls :func:`normalize_images` (on its device, after the
copy). The arithmetic is the one ``ToTensor`` and ``Normalize`` do, in the same order
(``/ 255``, ``- mean``, ``/ std`` in float32), so the result is bit-identical to the full transform.

Augmentation replay: :func:`seeded_augmentation` runs a random transform under a seed of its
own (torch's CPU generator and Python's ``random``, the two RNGs torchvision and open_clip
draw from), so a sample's crop depends on (seed, epoch, key, position) only, not on which
worker process it lands in or how the DataLoader seeded that worker.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageChops
from torchvision import transforms

from medclip.errors import MedclipError


@dataclass(frozen=True)
class SplitTransform:
    """``transform`` = ``pil_transform`` then to-tensor and ``(x / 255 - mean) / std``."""

    pil_transform: Callable
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def split_transform(transform: Callable) -> SplitTransform | None:
    """Split a torchvision ``Compose`` ending in ToTensor (+ Normalize); None for any other transform."""
    steps = list(getattr(transform, "transforms", None) or []) if isinstance(transform, transforms.Compose) else []
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # ToTensor alone: x / 255 - 0 over 1 is exact
    if steps and isinstance(steps[-1], transforms.Normalize):
        norm = steps.pop()
        mean = _per_channel(norm.mean, "mean")
        std = _per_channel(norm.std, "std")
        if mean is None or std is None or 0.0 in std:
            return None  # keep the transform whole: torchvision's Normalize gives the error for a zero std
    if not steps or not isinstance(steps[-1], transforms.ToTensor):
        return None
    steps.pop()
    if any(isinstance(s, (transforms.ToTensor, transforms.Normalize)) for s in steps):
        return None  # tensor-space steps before the end: keep the transform whole
    return SplitTransform(transforms.Compose(steps), mean, std)


def _per_channel(values, what: str) -> tuple[float, float, float] | None:
    vals = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if len(vals) == 1:
        vals = vals * 3
    return tuple(vals) if len(vals) == 3 else None


# Steps that treat each channel alike and draw their random parameters from the image size only:
# on an image with R = G = B they give, channel for channel, the pixels they give on its single band
# (PIL's resampling filters run the same fixed-point arithmetic per band; crops, pads with the
# default fill and flips move pixels). Exact types: a subclass may do anything.
CHANNELWISE_STEPS = (transforms.RandomResizedCrop, transforms.Resize, transforms.CenterCrop,
                     transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip)


def _is_rgb_conversion(step) -> bool:
    """open_clip's convert-to-RGB steps: ``MaybeConvertMode("RGB")`` and the older ``_convert_to_rgb``."""
    if getattr(step, "__name__", None) == "_convert_to_rgb":
        return True
    return type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"


def gray_transform(pil_transform: Callable) -> transforms.Compose | None:
    """``pil_transform`` without its RGB conversions, for the gray shortcut; None if it does not apply.

    The gray shortcut: a medical image stored as RGB usually has R = G = B exactly (93% of the
    shared MedPix + COVID-CXR training images). Running the geometric augmentation on its single
    band and broadcasting the result to 3 channels gives bit-identical pixels for a third of the
    resampling work (0.35 instead of 0.86 ms per 224 px crop measured). It applies only when every
    step is in :data:`CHANNELWISE_STEPS` (or an RGB conversion, which replicating the band replaces);
    any other step (colour jitter, custom code) keeps the RGB path.
    """
    if not isinstance(pil_transform, transforms.Compose):
        return None
    kept = []
    for step in pil_transform.transforms:
        if _is_rgb_conversion(step):
            continue
        if type(step) not in CHANNELWISE_STEPS:
            return None
        kept.append(step)
    return transforms.Compose(kept)


def gray_plane(image: Image.Image) -> Image.Image | None:
    """The single band of an image with R = G = B everywhere (an "L" image itself); None otherwise."""
    if image.mode == "L":
        return image
    if image.mode != "RGB":
        return None
    width, height = image.size
    row = image.crop((0, height // 2, width, height // 2 + 1)).tobytes()  # cheap early exit for colour
    red = row[0::3]
    if red != row[1::3] or red != row[2::3]:
        return None
    r, g, b = image.split()
    if ImageChops.difference(r, g).getbbox() is None and ImageChops.difference(r, b).getbbox() is None:
        return r
    return None


def to_uint8_planes(image) -> np.ndarray:
    """The output of a PIL-space transform as uint8 channel planes [3, H, W], or [1, H, W] for one gray
    plane standing for R = G = B (what converting an "L" image to RGB gives; the batch broadcasts it).

    RGB images are read band by band (``tobytes("raw", band)``): no [H, W, 3] array to transpose.
    """
    if isinstance(image, Image.Image):
        if image.mode == "L":
            return np.frombuffer(image.tobytes(), np.uint8).reshape(1, image.height, image.width)
        if image.mode != "RGB":
            image = image.convert("RGB")
        planes = np.empty((3, image.height, image.width), np.uint8)
        for c, band in enumerate("RGB"):
            planes[c] = np.frombuffer(image.tobytes("raw", band), np.uint8).reshape(image.height, image.width)
        return planes
    if not isinstance(image, np.ndarray):
        raise MedclipError(f"image transform returned {type(image).__name__}, expected a PIL image")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MedclipError(f"image transform returned {image.dtype} {image.shape}, expected uint8 [H, W, 3]")
    return image.transpose(2, 0, 1)


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                     device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [B, 3, H, W] (any memory layout) -> contiguous float32 ``(x / 255 - mean) / std``.

    Bit-identical to torchvision's ``ToTensor`` then ``Normalize`` on the same pixels. Moves the
    uint8 tensor to ``device`` first when given (4x fewer bytes to copy than float32).
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise MedclipError(f"normalize_images needs uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if len(mean) != 3 or len(std) != 3:
        raise MedclipError("normalize_images needs 3 mean and 3 std values")
    if device is not None:
        images = images.to(device, non_blocking=True)
    out = empty_float(images.shape, images.device)
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(3, 1, 1)
    # One image at a time: each step's data stays in cache instead of 3 passes over the batch.
    for i in range(images.shape[0]):
        out[i].copy_(images[i]).div_(255).sub_(m).div_(s)
    return out


HUGE_PAGE_MIN_BYTES = 4 << 20  # outputs from this size get transparent huge pages when the kernel allows them
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
_thp_ok: bool | None = None


def _huge_pages_available() -> bool:
    """Linux transparent huge pages in ``madvise`` (or ``always``) mode and Python can ask for them."""
    global _thp_ok
    if _thp_ok is None:
        try:
            with open(_THP_SETTING) as f:
                setting = f.read()
        except OSError:
            setting = ""
        _thp_ok = hasattr(mmap, "MADV_HUGEPAGE") and ("[madvise]" in setting or "[always]" in setting)
    return _thp_ok


def empty_float(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Uninitialised contiguous float32 tensor; large CPU ones are backed by transparent huge pages.

    A fresh 224 px batch of 64 images (38.5 MB) is a new memory mapping each time (too large for
    malloc to reuse), and writing it takes one page fault per 4 KB page: ~9,400 faults, measured
    16 ms per batch on the benchmark machine, nearly 3x the normalisation arithmetic. With 2 MB
    pages the same write takes 3 ms. The tensor owns its mapping (freed with the tensor); only
    its storage is not resizable. Anything else (other devices, small tensors, no THP) is a
    plain ``torch.empty``.
    """
    device = torch.device(device)
    nbytes = 4 * math.prod(shape)
    if device.type != "cpu" or nbytes < HUGE_PAGE_MIN_BYTES or not _huge_pages_available():
        return torch.empty(tuple(shape), dtype=torch.float32, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # refused (e.g. a seccomp filter): still a valid anonymous mapping
        pass
    return torch.frombuffer(buf, dtype=torch.float32).view(tuple(shape))


@contextlib.contextmanager
def seeded_augmentation(seed: int, restore: bool = True) -> Iterator[None]:
    """Run the body with torch's CPU RNG and ``random`` seeded by ``seed``; restore both afterwards.

    Uses the default generator directly: ``torch.manual_seed`` would also seed every accelerator
    (~200x slower per sample). Transforms drawing from NumPy's global RNG are not covered.
    ``restore=False`` skips saving and restoring the previous states (~12 us per call), for a
    DataLoader worker process, where nothing else draws from these RNGs between samples.
    """
    gen = torch.random.default_generator
    if restore:
        torch_state = gen.get_state()
        py_state = random.getstate()
    gen.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if restore:
            gen.set_state(torch_state)
            random.setstate(py_state)


def normalize_batch(batch: dict, stream) -> dict:
    """``batch`` with uint8 ``images`` normalised (on their device) by ``stream.image_mean/std``.

    For the consumer of a training stream, after moving the batch to its device. Float images
    (streams with ``uint8_images=False`` or injected batches) pass through unchanged. JPEGs the workers
    left undecoded (``device_decode``) are decoded first, on the images' device, into their slots.
    """
    from medclip.data.device_decode import PENDING_KEY, decode_pending  # imports this module

    images = batch.get("images")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return batch
    mean, std = getattr(stream, "image_mean", None), getattr(stream, "image_std", None)
    if mean is None or std is None:
        raise MedclipError("the batch has uint8 images but its data stream gives no image_mean/image_std "
                           "to normalise them")
    batch = dict(batch)
    pending = batch.pop(PENDING_KEY, None)
    if pending is not None:
        decode_pending(images, pending, batch["keys"])  # into their slots of ``images``
    return {**batch, "images": normalize_images(images, mean, std)}
