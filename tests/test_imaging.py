"""Medical image input: 16-bit PNG and DICOM windowing into the model's normalized tensors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medclip.errors import MedclipError
from medclip.imaging import Window, apply_window, load_image, read_dicom


def test_window_maps_range_linearly():
    pixels = np.array([-1000.0, 40.0 - 200.0, 40.0, 40.0 + 200.0, 3000.0])
    out = apply_window(pixels, Window(center=40, width=400))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])
    with pytest.raises(MedclipError, match="window width"):
        Window(40, 0)


def test_16bit_png_keeps_its_dynamic_range(tmp_path):
    ramp = np.tile(np.linspace(1000, 60000, 64, dtype=np.uint16), (32, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    with Image.open(tmp_path / "ramp16.png") as img:
        assert img.mode.startswith("I")  # really 16-bit on disk
    rgb = np.asarray(load_image(tmp_path / "ramp16.png"))
    assert rgb.dtype == np.uint8 and rgb.shape == (32, 64, 3)
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.all(np.diff(rgb[0, :, 0].astype(int)) >= 0)  # monotone: no wrap-around from 8-bit truncation
    windowed = np.asarray(load_image(tmp_path / "ramp16.png", window=Window(center=30500, width=20000)))
    assert (windowed[0, :, 0] == 0).sum() > 10 and (windowed[0, :, 0] == 255).sum() > 10


def test_real_dicom_ct_window_from_header():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu, window = read_dicom(path)
    raw = ds.pixel_array.astype(float)
    np.testing.assert_allclose(hu, raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    # CT_small has no window in its header: the full HU range maps to 0..255.
    assert window is None or window.width > 0
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (*raw.shape, 3) and rgb.min() == 0 and rgb.max() == 255
    # A soft-tissue window (40/400 HU) saturates bone and air.
    soft = np.asarray(load_image(path, window=Window(40, 400)))[..., 0]
    expected = np.clip((hu - (40 - 200)) / 400, 0, 1) * 255
    assert np.abs(soft.astype(float) - expected).max() <= 0.5 + 1e-9
    assert (soft == 255).any() and (soft == 0).any()


def test_preprocess_accepts_dicom_paths(tiny_encoder):
    from pydicom.data import get_testdata_file

    tensor = tiny_encoder.preprocess(get_testdata_file("CT_small.dcm"))
    assert tuple(tensor.shape) == (3, 64, 64)
    assert tensor.dtype.is_floating_point


def test_unreadable_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(MedclipError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(MedclipError, match="image not found"):
        load_image(tmp_path / "missing.png")
