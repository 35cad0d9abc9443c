"""Decode a batch's JPEGs on the training device (``data.gpu_decode``): the workers only draw the crop.

At 1-2k px sources the loader's CPU goes into libjpeg's decoding (docs/benchmarks.md); nvJPEG does that
work on the GPU. With the option on, a loader worker opens each JPEG's header, draws the random crop on
the full size and the flips after it (under the sample's seed, the same RNG draws in the same order as the
CPU path: same crops, same distribution) and ships the undecoded bytes with them (:class:`DeferredJpeg`).
The consumer's :func:`medclip.data.images.normalize_batch` then decodes the batch's JPEGs in one
``torchvision.io.decode_jpeg(list, device=...)`` call on the device the images were moved to (nvJPEG on
CUDA, libjpeg-turbo on CPU, which is how the tests run the whole path), crops, resizes (antialiased, with the
crop's filter) and flips there. Everything else takes the CPU path in the worker, so a batch may
mix both: PNG, 16-bit, CMYK JPEGs, images stored turned (EXIF orientation) and JPEGs that do not end in
their end-of-image marker (truncated: the worker's decode counts them as corrupt, as without the option).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from medclip.data.images import _is_rgb_conversion
from medclip.errors import MedclipError

log = logging.getLogger(__name__)

PENDING_KEY = "pending_jpegs"  # the batch's JPEGs still to decode (a PendingJpegs), until normalize_batch
FLIP_STEPS = (transforms.RandomHorizontalFlip, transforms.RandomVerticalFlip)
DEFERRED_MODES = ("L", "RGB")  # JPEG modes every decoder turns into the RGB pixels PIL gives
END_OF_IMAGE = b"\xff\xd9"


@dataclass(frozen=True)
class DeferredJpeg:
    """A sample's JPEG, not decoded: its bytes, the crop drawn on its full size and the flips drawn after."""

    data: bytes
    box: tuple[int, int, int, int]  # top, left, height, width in full-size pixels (RandomResizedCrop's params)
    flips: tuple[int, ...]  # the [C, H, W] dimensions to mirror (-1 horizontal, -2 vertical), as drawn
    size: tuple[int, int]  # output height, width
    interpolation: F.InterpolationMode  # the crop's resize filter


@dataclass
class PendingJpegs:
    """The deferred JPEGs of one batch: where they go, their bytes back to back, crops and flips."""

    index: list[int]  # batch positions
    data: torch.Tensor  # uint8; in a worker, in shared memory like the images
    ends: list[int]  # JPEG i is data[ends[i - 1]:ends[i]]
    boxes: list[tuple[int, int, int, int]]
    flips: list[tuple[int, ...]]
    interpolation: F.InterpolationMode


class DeviceCrop:
    """The worker's half: a transform's leading ``RandomResizedCrop`` and flips, drawn but not applied."""

    def __init__(self, crop: transforms.RandomResizedCrop, flips: tuple):
        self.crop, self.flips = crop, flips

    @classmethod
    def of(cls, pil_transform) -> DeviceCrop | None:
        """For a ``Compose`` of ``RandomResizedCrop`` then only flips and RGB conversions; None for any other."""
        steps = getattr(pil_transform, "transforms", None) if isinstance(pil_transform, transforms.Compose) else None
        if not steps or type(steps[0]) is not transforms.RandomResizedCrop:
            return None
        rest = [s for s in steps[1:] if not _is_rgb_conversion(s)]
        if any(type(s) not in FLIP_STEPS for s in rest):
            return None
        return cls(steps[0], tuple(rest))

    @staticmethod
    def takes(image: Image.Image, data: bytes, turned: bool) -> bool:
        """Whether the opened (not loaded) image can be decoded on the device."""
        return image.format == "JPEG" and image.mode in DEFERRED_MODES and not turned and data.endswith(END_OF_IMAGE)

    def draw(self, image: Image.Image, data: bytes) -> DeferredJpeg:
        """Draw as the CPU path does, under the sample's seed: the crop on the full size, then each flip."""
        box = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        drawn = [bool(torch.rand(1) < step.p) for step in self.flips]  # one draw per step, as each step makes
        flips = tuple(-1 if type(step) is transforms.RandomHorizontalFlip else -2
                      for step, flipped in zip(self.flips, drawn) if flipped)
        return DeferredJpeg(data, tuple(int(v) for v in box), flips, tuple(self.crop.size), self.crop.interpolation)


def pending_jpegs(images: list, new_bytes) -> PendingJpegs | None:
    """The batch's :class:`DeferredJpeg` items gathered for the consumer; None when there are none.

    ``new_bytes(n)``: an empty uint8 tensor of n bytes (the collate's shared-memory allocator).
    """
    deferred = [(i, d) for i, d in enumerate(images) if isinstance(d, DeferredJpeg)]
    if not deferred:
        return None
    ends = np.cumsum([len(d.data) for _, d in deferred]).tolist()
    data = new_bytes(ends[-1])
    view = data.numpy()
    start = 0
    for (_, d), end in zip(deferred, ends):
        view[start:end] = np.frombuffer(d.data, np.uint8)
        start = end
    return PendingJpegs([i for i, _ in deferred], data, ends, [d.box for _, d in deferred],
                        [d.flips for _, d in deferred], deferred[0][1].interpolation)


def decode_pending(images: torch.Tensor, pending: PendingJpegs, keys: list[str]) -> None:
    """Decode, crop, resize and flip ``pending``'s JPEGs on ``images``' device, into their uint8 slots.

    The resize is antialiased whatever the transform says: the CPU path's PIL resize always is.

    One batched ``decode_jpeg`` call; if it fails (nvJPEG refuses some JPEGs libjpeg reads), each JPEG is
    decoded on its own and, failing that, by PIL: the same sample, only slower. A JPEG no decoder reads
    stops the run with one line (the CPU path would have skipped it: ``data.gpu_decode: false``).
    """
    device = images.device
    starts = [0, *pending.ends[:-1]]
    jpegs = [pending.data[a:b] for a, b in zip(starts, pending.ends)]
    try:
        decoded = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        log.warning("batched JPEG decode on %s failed (%s); decoding this batch's JPEGs one by one", device, exc)
        decoded = [_decode_one(jpeg, device, keys[i]) for jpeg, i in zip(jpegs, pending.index)]
    height, width = images.shape[-2:]
    for slot, pixels, (top, left, h, w), flips in zip(pending.index, decoded, pending.boxes, pending.flips):
        # In float32 on every device (what CUDA runs anyway), so a CPU test measures the GPU's arithmetic.
        out = F.resized_crop(pixels.float(), top, left, h, w, [height, width], pending.interpolation, antialias=True)
        out = out.clamp_(0, 255).round_().to(torch.uint8)
        images[slot] = out.flip(flips) if flips else out


def _decode_one(jpeg: torch.Tensor, device: torch.device, key: str) -> torch.Tensor:
    try:
        return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as image:
            pixels = np.asarray(image.convert("RGB"))
    except Exception as exc:  # PIL raises many types for broken files
        raise MedclipError(f"sample {key}: its JPEG cannot be decoded on {device} nor by PIL ({exc}); with "
                           "data.gpu_decode: false the loader skips and counts such images") from None
    return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


def gpu_decode_available(requested: bool, device: torch.device) -> bool:
    """``data.gpu_decode`` on a CUDA device; requested elsewhere: the CPU path, said in one logged line."""
    if requested and device.type != "cuda":
        log.warning("data.gpu_decode: the run's device is %s, not CUDA: JPEGs are decoded by the loader "
                    "workers (the CPU path)", device.type)
    return requested and device.type == "cuda"
