"""A training sample's image: decoded from its bytes, then augmented under the sample's own seed.

The seed comes from (seed, epoch, key, position), so the crop is replayed exactly after a resume and
does not depend on which worker process decodes the sample or how the DataLoader seeded it. Both steps
run under that seed (:meth:`SampleImages.seeded`): with the reduced decode (``fast_decode``) the random
crop is drawn while opening the image, before the pixels are decoded (see medclip.data.reduced_decode);
with ``device_decode`` a JPEG is not decoded here at all, only its crop and flips drawn
(see medclip.data.device_decode).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from medclip.data.device_decode import DeferredJpeg, DeviceCrop
from medclip.data.images import (
    SplitTransform,
    gray_plane,
    gray_transform,
    seeded_augmentation,
    split_transform,
    to_uint8_planes,
)
from medclip.data.reduced_decode import CropBox, ReducedCrop
from medclip.imaging import gray_uint8, is_turned, upright

log = logging.getLogger(__name__)

HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")  # 16-bit PNGs etc.: PIL's convert("RGB") would clip them


@dataclass
class OpenedImage:
    image: Image.Image  # RGB, possibly decoded at a reduced scale
    plane: Image.Image | None  # its single band when R = G = B (gray shortcut)
    crop: CropBox | None  # the random crop, already drawn, in ``image``'s pixels (fast decode)
    deferred: DeferredJpeg | None = None  # device decode: the JPEG left undecoded, its crop and flips drawn


def _tail(transform) -> transforms.Compose | None:
    """``transform`` without its first step (the crop that :class:`ReducedCrop` runs instead)."""
    return transforms.Compose(transform.transforms[1:]) if transform is not None else None


class SampleImages:
    """Image bytes -> pixels: float [3, H, W] from ``transform``, or uint8 planes when it splits (see images)."""

    def __init__(self, transform: Callable, uint8_images: bool = True, gray_shortcut: bool = True,
                 fast_decode: bool = True, device_decode: bool = False):
        self.transform = transform
        # PIL-space part of the transform when images are shipped as uint8 (else None: float images).
        self.split: SplitTransform | None = split_transform(transform) if uint8_images else None
        # The same PIL steps for one gray band (None: the transform or the config rules the shortcut out).
        self.gray = gray_transform(self.split.pil_transform) if self.split and gray_shortcut else None
        rgb_steps = self.split.pil_transform if self.split else transform
        # The leading random crop, drawn on the full size and applied to a reduced decode (None: full decode).
        self.crop = ReducedCrop.leading(rgb_steps) if fast_decode else None
        if self.gray is not None and ReducedCrop.leading(self.gray) is None:
            self.crop = None  # both paths must start with the crop
        self.rgb_after_crop = _tail(rgb_steps) if self.crop else None
        self.gray_after_crop = _tail(self.gray) if self.crop else None
        # JPEGs left for the consumer's device (uint8 images only: the consumer's normalisation decodes them).
        self.device_crop = DeviceCrop.of(self.split.pil_transform) if device_decode and self.split else None
        if device_decode and self.device_crop is None:
            log.warning("device decode needs a train transform of RandomResizedCrop, flips and ToTensor (+ Normalize) "
                        "with uint8 images; every image is decoded by the loader workers")

    @staticmethod
    def seeded(seed: int):
        """Context for :meth:`decode` and :meth:`augment` of one sample: the RNGs seeded by ``seed``."""
        # In a worker process nothing else uses the global RNGs: no need to restore them per sample.
        return seeded_augmentation(seed, restore=torch.utils.data.get_worker_info() is None)

    def decode(self, data: bytes) -> OpenedImage:
        """The image as RGB (and its gray band), the crop drawn and the JPEG reduced with fast decode.

        Open -> draw the crop and set the reduction -> decode -> EXIF orientation -> mode. Raises on bad bytes.
        An image stored turned (EXIF orientation) is decoded in full: its crop is drawn after turning it.
        With device decode, a JPEG it can take is only opened: the crop and flips drawn, the bytes kept.
        """
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close
        turned = is_turned(image)
        if self.device_crop is not None and DeviceCrop.takes(image, data, turned):
            return OpenedImage(image, None, None, self.device_crop.draw(image, data))
        crop = self.crop.draw(image) if self.crop is not None and not turned else None
        image.load()
        image = upright(image, turned)  # EXIF orientation, as a viewer shows the image
        if image.mode in HIGH_BIT_MODES:  # its own min..max to 8 bits, as the evaluator and shard builder do
            image = Image.fromarray(gray_uint8(np.asarray(image)), mode="L")
        plane = gray_plane(image) if self.gray is not None else None
        if plane is None and image.mode != "RGB":
            image = image.convert("RGB")
        return OpenedImage(image, plane, crop)

    def augment(self, opened: OpenedImage) -> torch.Tensor | np.ndarray | DeferredJpeg:
        """The transform's output for the image (uint8 planes when split, else its own); run under :meth:`seeded`.

        A deferred JPEG (device decode) stays as it is: the consumer decodes it.
        """
        if opened.deferred is not None:
            return opened.deferred
        source = opened.plane if opened.plane is not None else opened.image
        if opened.crop is not None:
            source = self.crop.apply(source, opened.crop)
        if opened.plane is not None:  # R = G = B: one band through the same steps (see gray_transform)
            return to_uint8_planes((self.gray_after_crop if opened.crop else self.gray)(source))
        if self.split is not None:
            return to_uint8_planes((self.rgb_after_crop if opened.crop else self.split.pil_transform)(source))
        return (self.rgb_after_crop if opened.crop else self.transform)(source)
