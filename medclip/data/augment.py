"""A training sample's image: decoded from its bytes, then augmented under the sample's own seed.

The seed comes from (seed, epoch, key, position), so the crop is replayed exactly after a resume and
does not depend on which worker process decodes the sample or how the DataLoader seeded it.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from medclip.data.images import (
    SplitTransform,
    gray_plane,
    gray_transform,
    seeded_augmentation,
    split_transform,
    to_uint8_planes,
)
from medclip.imaging import upright


class SampleImages:
    """Image bytes -> pixels: float [3, H, W] from ``transform``, or uint8 planes when it splits (see images)."""

    def __init__(self, transform: Callable, uint8_images: bool = True, gray_shortcut: bool = True):
        self.transform = transform
        # PIL-space part of the transform when images are shipped as uint8 (else None: float images).
        self.split: SplitTransform | None = split_transform(transform) if uint8_images else None
        # The same PIL steps for one gray band (None: the transform or the config rules the shortcut out).
        self.gray = gray_transform(self.split.pil_transform) if self.split and gray_shortcut else None

    def decode(self, data: bytes) -> tuple[Image.Image, Image.Image | None]:
        """The RGB image and, with the gray shortcut, its single band when R = G = B. Raises on bad bytes."""
        image = Image.open(io.BytesIO(data))  # in memory: nothing to close
        image.load()
        image = upright(image)  # EXIF orientation, as a viewer shows the image
        plane = gray_plane(image) if self.gray is not None else None
        if plane is None and image.mode != "RGB":
            image = image.convert("RGB")
        return image, plane

    def augment(self, image: Image.Image, plane: Image.Image | None, seed: int) -> torch.Tensor | np.ndarray:
        """The transform's output for ``image`` under ``seed`` (uint8 planes when split, else its own)."""
        # In a worker process nothing else uses the global RNGs: no need to restore them per sample.
        with seeded_augmentation(seed, restore=torch.utils.data.get_worker_info() is None):
            if plane is not None:  # R = G = B: one band through the same steps (see gray_transform)
                return to_uint8_planes(self.gray(plane))
            if self.split is not None:
                return to_uint8_planes(self.split.pil_transform(image))
            return self.transform(image)
