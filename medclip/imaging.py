"""Medical image input: 8/16-bit grayscale, RGB and DICOM to 8-bit RGB PIL images.

Windowing maps raw intensities (Hounsfield units for CT) to display range: values below
``center - width/2`` become 0, above ``center + width/2`` become 1, linear in between
(DICOM PS3.3 C.11.2.1.2 simplified to the linear form).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medclip.errors import MedclipError

DICOM_SUFFIXES = {".dcm", ".dicom"}


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def __post_init__(self):
        if not self.width > 0:
            raise MedclipError(f"window width must be positive, got {self.width}")


def apply_window(pixels: np.ndarray, window: Window | None) -> np.ndarray:
    """Float array in [0, 1]; without a window, the image's own min..max range is used."""
    pixels = pixels.astype(np.float64)
    if window is None:
        lo, hi = float(pixels.min()), float(pixels.max())
    else:
        lo, hi = window.center - window.width / 2.0, window.center + window.width / 2.0
    if hi <= lo:
        return np.zeros_like(pixels)
    return np.clip((pixels - lo) / (hi - lo), 0.0, 1.0)


def to_rgb_uint8(unit: np.ndarray) -> Image.Image:
    gray = np.round(unit * 255.0).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _first(value) -> float:
    # Window centre/width may be multi-valued in the header; the first is the primary window.
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def read_dicom(path: str | Path, window: Window | None = None) -> tuple[np.ndarray, Window | None]:
    """Rescaled pixel values (slope/intercept applied) and the window to use."""
    try:
        import pydicom
    except ImportError as exc:
        raise MedclipError("reading DICOM needs the 'dicom' extra: pip install 'medclip[dicom]'") from exc
    try:
        ds = pydicom.dcmread(str(path))
        pixels = ds.pixel_array.astype(np.float64)
    except Exception as exc:  # pydicom raises many types for broken files
        raise MedclipError(f"cannot read DICOM {path}: {exc}") from exc
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        pixels = pixels[pixels.shape[0] // 2]  # multi-frame: the middle frame
    pixels = pixels * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = Window(_first(ds.WindowCenter), _first(ds.WindowWidth))
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels  # MONOCHROME1 shows high values dark
    return pixels, window


def load_image(source, window: Window | None = None) -> Image.Image:
    """Any supported input (path, PIL image, numpy array) as an 8-bit RGB PIL image."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MedclipError(f"image not found: {path}")
        if path.suffix.lower() in DICOM_SUFFIXES:
            pixels, window = read_dicom(path, window)
            return to_rgb_uint8(apply_window(pixels, window))
        try:
            with Image.open(path) as img:
                img.load()
                source = img.copy()
        except Exception as exc:
            raise MedclipError(f"cannot read image {path}: {exc}") from exc
    if isinstance(source, np.ndarray):
        if source.ndim == 3 and source.dtype == np.uint8 and window is None:
            return Image.fromarray(source).convert("RGB")
        gray = source if source.ndim == 2 else source.mean(axis=-1)
        return to_rgb_uint8(apply_window(gray, window))
    if not isinstance(source, Image.Image):
        raise MedclipError(f"unsupported image input of type {type(source).__name__}")
    if source.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return to_rgb_uint8(apply_window(np.asarray(source), window))
    if window is not None:
        return to_rgb_uint8(apply_window(np.asarray(source.convert("L")), window))
    return source.convert("RGB")


class MedicalPreprocess:
    """Wraps an open_clip image transform so it accepts medical inputs (paths, DICOM, 16-bit)."""

    def __init__(self, transform, window: Window | None = None):
        self.transform = transform
        self.window = window

    def __call__(self, source):
        return self.transform(load_image(source, self.window))

    def __repr__(self) -> str:
        return f"MedicalPreprocess(window={self.window}, transform={self.transform})"
