"""Medical image input: 16-bit PNG and DICOM windowing into the model's normalized tensors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medclip.errors import MedclipError
from medclip.imaging import Window, apply_window, load_image


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


def test_real_dicom_ct_in_hounsfield_units_and_caller_window():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds  # no header window: full HU range
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    rgb = np.asarray(load_image(path))
    assert rgb.shape == (*hu.shape, 3)
    _assert_shows(rgb, (hu - hu.min()) / (hu.max() - hu.min()))
    # A soft-tissue window (40/400 HU) saturates bone and air.
    soft = np.asarray(load_image(path, window=Window(40, 400)))
    _assert_shows(soft, np.clip((hu - (40 - 200)) / 400, 0, 1))
    assert (soft == 255).any() and (soft == 0).any()


def _assert_shows(rgb: np.ndarray, unit: np.ndarray) -> None:
    """The 8-bit image is the hand-computed display value (0 = black, 1 = white), rounded."""
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], rgb[..., 2])
    assert np.abs(rgb[..., 0].astype(float) - unit * 255).max() <= 0.5 + 1e-6


def _mr(tmp_path, name="mr.dcm", **header):
    """pydicom's real MR_small.dcm (16-bit signed, window 600/1600, no rescale) with header changes."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for key, value in header.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    ds.save_as(tmp_path / name)
    return tmp_path / name, ds.pixel_array.astype(float)


def test_dicom_header_window_uses_the_standards_linear_function(tmp_path):
    path, x = _mr(tmp_path)
    assert (x < -200).sum() == 0 and (x > 1399).any() and ((x > -200) & (x < 1399)).any()
    # PS3.3 C.11.2.1.2.1, center 600, width 1600: x <= -200 -> 0, x > 1399 -> 1, else (x - 599.5) / 1599 + 0.5
    expected = np.where(x <= -200, 0.0, np.where(x > 1399, 1.0, (x - 599.5) / 1599 + 0.5))
    _assert_shows(np.asarray(load_image(path)), expected)
    # A second window in the header is an alternative view: the first one is used.
    path, _ = _mr(tmp_path, "two.dcm", WindowCenter=[600, 100], WindowWidth=[1600, 50])
    _assert_shows(np.asarray(load_image(path)), expected)


def test_dicom_header_voi_functions(tmp_path):
    path, x = _mr(tmp_path, "exact.dcm", WindowCenter=500, WindowWidth=900, VOILUTFunction="LINEAR_EXACT")
    _assert_shows(np.asarray(load_image(path)), np.clip((x - 500) / 900 + 0.5, 0, 1))
    path, x = _mr(tmp_path, "sigmoid.dcm", WindowCenter=500, WindowWidth=900, VOILUTFunction="SIGMOID")
    _assert_shows(np.asarray(load_image(path)), 1 / (1 + np.exp(-4 * (x - 500) / 900)))


def test_dicom_voi_lut_sequence_is_applied(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset

    lut = Dataset()  # 12-bit LUT over stored values 100..1123, a square-law curve
    entries, first = 1024, 100
    table = (np.arange(entries) ** 2 * 4095 // (entries - 1) ** 2).astype(int)
    lut.add_new("LUTDescriptor", "US", [entries, first, 12])
    lut.add_new("LUTData", "US", table.tolist())
    path, x = _mr(tmp_path, "lut.dcm", VOILUTSequence=pydicom.Sequence([lut]))
    # The LUT wins over the header's window (pydicom's default, allowed by PS3.3 C.11.2).
    expected = table[np.clip(x.astype(int) - first, 0, entries - 1)] / 4095
    _assert_shows(np.asarray(load_image(path)), expected)


def test_dicom_monochrome1_is_windowed_before_inverting(tmp_path):
    path, x = _mr(tmp_path, "m1.dcm", PhotometricInterpretation="MONOCHROME1")
    linear = np.where(x <= -200, 0.0, np.where(x > 1399, 1.0, (x - 599.5) / 1599 + 0.5))
    _assert_shows(np.asarray(load_image(path)), 1 - linear)  # high stored values dark
    # A caller's window is given in stored values too, and the result is inverted.
    _assert_shows(np.asarray(load_image(path, window=Window(300, 400))), 1 - np.clip((x - 100) / 400, 0, 1))
    path, x = _mr(tmp_path, "m1-nowin.dcm", PhotometricInterpretation="MONOCHROME1",
                  WindowCenter=None, WindowWidth=None)
    _assert_shows(np.asarray(load_image(path)), (x.max() - x) / (x.max() - x.min()))


def test_colour_dicom_keeps_its_colours():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    rgb_path = get_testdata_file("SC_rgb_small_odd.dcm")
    np.testing.assert_array_equal(np.asarray(load_image(rgb_path)), pydicom.dcmread(rgb_path).pixel_array)
    path16 = get_testdata_file("SC_rgb_rle_16bit.dcm")
    raw = pydicom.dcmread(path16).pixel_array.astype(float)
    assert np.abs(np.asarray(load_image(path16)) - raw / 65535 * 255).max() <= 0.5 + 1e-6


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
