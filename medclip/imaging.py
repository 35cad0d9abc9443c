"""Medical image input: 8/16-bit grayscale, RGB and DICOM to 8-bit RGB PIL images.

A caller's :class:`Window` maps raw intensities (Hounsfield units for CT) to display range linearly:
values below ``center - width/2`` become 0, above ``center + width/2`` become 1. It works the same on
every input and, for DICOM, overrides the header.

DICOM goes through pydicom's implementation of the standard's pipeline (PS3.3 C.11): the Modality LUT
or rescale, then the header's VOI LUT Sequence or window (LINEAR with its ``center - 0.5`` /
``width - 1`` form, LINEAR_EXACT or SIGMOID, the first of several), then MONOCHROME1's inversion, which
comes after the window because the window is given in the stored values' space. Colour DICOM (RGB, YBR,
palette) keeps its colours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

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
    return _unit(pixels, *_bounds(pixels, window))


def _bounds(pixels: np.ndarray, window: Window | None) -> tuple[float, float]:
    if window is None:
        return float(pixels.min()), float(pixels.max())
    return window.center - window.width / 2.0, window.center + window.width / 2.0


def _unit(pixels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(pixels)
    return np.clip((pixels - lo) / (hi - lo), 0.0, 1.0)


def _quantize(unit: np.ndarray) -> np.ndarray:
    return np.round(unit * 255.0).astype(np.uint8)


def gray_uint8(pixels: np.ndarray, window: Window | None = None) -> np.ndarray:
    """``apply_window`` rounded to 8 bits. 16-bit integers go through a 65,536-entry table of the same
    arithmetic: identical values, without float64 passes over the image (a 2048 px PNG: ~100 ms less)."""
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:
        return _quantize(_unit(np.arange(65536, dtype=np.float64), *_bounds(pixels, window)))[pixels]
    return _quantize(apply_window(pixels, window))


def to_rgb_uint8(unit: np.ndarray) -> Image.Image:
    return Image.fromarray(_quantize(unit), mode="L").convert("RGB")


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as exc:
        raise MedclipError("reading DICOM needs the 'dicom' extra: pip install 'medclip[dicom]'") from exc
    return pydicom


def _frame(ds, pixels: np.ndarray) -> np.ndarray:
    """One image of a multi-frame dataset: the middle frame."""
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    return pixels[frames // 2] if frames > 1 and pixels.ndim == (4 if ds.SamplesPerPixel > 1 else 3) else pixels


def _has_voi_lut(ds) -> bool:
    items = ds.get("VOILUTSequence")
    return bool(items) and None not in (items[0].get("LUTDescriptor"), items[0].get("LUTData"))


def _voi_range(ds, pydicom) -> tuple[float, float]:
    """The output range of the header's VOI transform (a VOI LUT wins over a window, as in pydicom)."""
    if _has_voi_lut(ds):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2 ** depth - 1)  # PS3.3 C.11.2.1.1: LUT entries span 0 .. 2^bits - 1
    lo, hi = pydicom.pixels.apply_windowing(np.array([-np.inf, np.inf]), ds)  # the window's own extremes
    return float(lo), float(hi)


def dicom_to_unit(ds, window: Window | None = None) -> np.ndarray:
    """A grayscale dataset's display values in [0, 1] (0 = black): modality, VOI, then MONOCHROME1."""
    pydicom = _pydicom()
    values = pydicom.pixels.apply_modality_lut(_frame(ds, ds.pixel_array), ds)
    has_voi = _has_voi_lut(ds) or ("WindowCenter" in ds and "WindowWidth" in ds)
    if window is not None or not has_voi:
        unit = apply_window(values, window)
    else:
        lo, hi = _voi_range(ds, pydicom)
        shown = pydicom.pixels.apply_voi_lut(values, ds)
        unit = np.clip((shown.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows low values white, after the window
    return unit


def _dicom_colour(ds) -> Image.Image:
    pydicom = _pydicom()
    pixels = _frame(ds, ds.pixel_array)  # pydicom converts YBR to RGB
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = pydicom.pixels.apply_color_lut(pixels, ds)
        top = np.iinfo(pixels.dtype).max  # the palette's entries span their whole type
    else:
        top = 2 ** int(ds.BitsStored) - 1
    if top != 255:
        pixels = np.round(pixels.astype(np.float64) / top * 255.0)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")


def read_dicom(path: str | Path, window: Window | None = None) -> Image.Image:
    """A DICOM file as an 8-bit RGB image (grayscale windowed as the header says, unless ``window``)."""
    pydicom = _pydicom()
    try:
        ds = pydicom.dcmread(str(path))
        if ds.PhotometricInterpretation in ("MONOCHROME1", "MONOCHROME2"):
            return to_rgb_uint8(dicom_to_unit(ds, window))
        return _dicom_colour(ds)
    except MedclipError:
        raise
    except Exception as exc:  # pydicom raises many types for broken files
        raise MedclipError(f"cannot read DICOM {path}: {exc}") from exc


def upright(image: Image.Image, turned: bool | None = None) -> Image.Image:
    """``image`` turned as its EXIF orientation says (as a viewer shows it); ``image`` itself when upright.

    Photographs of skin, slides and scanned films are often stored sideways with an EXIF
    orientation tag. Every image entry point applies it first: later steps drop the tag (a JPEG
    re-encode, a crop), after which nothing can turn the image back. JPEG ``draft`` decoding scales
    both sides alike, so applying this after ``draft`` is the same as before it.
    """
    if not (is_turned(image) if turned is None else turned):  # ``turned``: the caller has read the tag
        return image  # upright or no tag: no copy (the training loader calls this per sample)
    return ImageOps.exif_transpose(image)


def is_turned(image: Image.Image) -> bool:
    """Whether ``image``'s EXIF orientation turns or mirrors it (readable before the pixels are decoded)."""
    return image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)


def load_image(source, window: Window | None = None) -> Image.Image:
    """Any supported input (path, PIL image, numpy array) as an 8-bit RGB PIL image."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise MedclipError(f"image not found: {path}")
        if path.suffix.lower() in DICOM_SUFFIXES:
            return read_dicom(path, window)
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
    source = upright(source)
    if source.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(gray_uint8(np.asarray(source), window), mode="L").convert("RGB")
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
