"""Decode only the pixels a crop needs: JPEG DCT scaling (libjpeg's 1/2, 1/4, 1/8 decode) around a random crop.

Decoding costs in proportion to the pixels decoded, not to the 224 px the model sees: a 2048 px chest
X-ray takes ~10x the CPU of the crop's own resize. libjpeg can run its inverse DCT at 1/2, 1/4 or 1/8
scale (PIL's ``Image.draft``), skipping most of that work. Used by the evaluator (reduce while the whole
image keeps the model input size) and by the training loader (:class:`ReducedCrop`: the random crop is
drawn on the FULL size from the same RNG draws ``RandomResizedCrop`` makes, then the largest scale that
still leaves the crop at least the output size is decoded and the crop box is mapped onto it, so the
crop distribution is unchanged and nothing is upsampled). The pixels differ slightly from a full decode
(DCT-domain downscaling before the bicubic resize; bounded in tests/test_data_reduced_decode.py).
PNG and other formats have no reduced decode: they are decoded in full, exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly


def dct_scale(room: float) -> int:
    """The largest JPEG reduction 1/s (s = 8, 4, 2, else 1) with s <= ``room`` (how many times too large)."""
    return next((s for s in DCT_SCALES if room >= s), 1)


def draft_jpeg(image: Image.Image, scale: int) -> int:
    """Ask libjpeg to decode a not yet loaded ``image`` at 1/``scale``; the reduction it will apply (1: none).

    Non-JPEG images and ``scale`` < 2 are left alone. The decoded size is ceil(side / scale), and pixel k
    of it covers full-size pixels [k * scale, (k + 1) * scale).
    """
    if scale < 2 or image.format != "JPEG":
        return 1
    width, height = image.size
    image.draft("RGB", (width // scale, height // scale))  # "RGB" never changes the mode of a JPEG
    return scale if image.size == (math.ceil(width / scale), math.ceil(height / scale)) else 1


@dataclass(frozen=True)
class CropBox:
    """A crop in the pixels of the decoded image: (left, top, right, bottom), fractional after a reduction."""

    left: float
    top: float
    right: float
    bottom: float


class ReducedCrop:
    """A transform's leading ``RandomResizedCrop``, split in two: draw (on the full size), then crop the decode.

    :meth:`draw` runs on the opened, not yet loaded image: it draws the crop as ``RandomResizedCrop``
    would (same RNG draws, same distribution), sets the JPEG reduction and returns the box in the
    decoded pixels. :meth:`apply` crops the loaded image to it and resizes to the output size; at
    reduction 1 that is exactly ``RandomResizedCrop``'s own crop then resize.
    """

    def __init__(self, crop: transforms.RandomResizedCrop):
        self.crop = crop
        self.out_h, self.out_w = crop.size
        self.resample = F.pil_modes_mapping[crop.interpolation]

    @classmethod
    def leading(cls, transform) -> ReducedCrop | None:
        """For a ``Compose`` whose first step is a ``RandomResizedCrop`` (exact type; a subclass may draw otherwise)."""
        steps = getattr(transform, "transforms", None) if isinstance(transform, transforms.Compose) else None
        if not steps or type(steps[0]) is not transforms.RandomResizedCrop:
            return None
        return cls(steps[0])

    def draw(self, image: Image.Image) -> CropBox:
        top, left, height, width = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        scale = draft_jpeg(image, dct_scale(min(height / self.out_h, width / self.out_w)))
        return CropBox(left / scale, top / scale, (left + width) / scale, (top + height) / scale)

    def apply(self, image: Image.Image, box: CropBox) -> Image.Image:
        # Crop to the whole pixels the box touches (the resize then sees no pixel outside them, as after
        # the full-size crop), and resize its fractional box within them.
        left, top = math.floor(box.left), math.floor(box.top)
        right = min(math.ceil(box.right), image.width)
        bottom = min(math.ceil(box.bottom), image.height)
        part = image.crop((left, top, right, bottom))
        inner = (box.left - left, box.top - top, min(box.right, right) - left, min(box.bottom, bottom) - top)
        return part.resize((self.out_w, self.out_h), self.resample, box=inner)
