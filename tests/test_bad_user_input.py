"""Bad input users meet ends in a counted, logged skip or one line and exit 2, never 'unexpected ... (a bug?)'."""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
import torch
from conftest import one_error_line  # tests/ is on sys.path under pytest
from engine_helpers import write_shard
from PIL import Image

from medclip.cli import main


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _labels(finding: str) -> bytes:
    return json.dumps({"labels": {"finding": finding}}).encode()


@pytest.fixture
def bad_shard(tmp_path):
    samples = {f"good{i}": {"png": _png(i), "json": _labels("ab"[i % 2]), "txt": f"caption {i}".encode()}
               for i in range(6)}
    samples["latin1"] = {"png": _png(10), "json": _labels("a"), "txt": "épanchement pleural".encode("latin-1")}
    samples["brokenjson"] = {"png": _png(11), "json": b"{not json", "txt": b"a caption"}
    samples["listjson"] = {"png": _png(12), "json": b"[1, 2]", "txt": b"a caption"}
    return write_shard(tmp_path / "val-000000.tar", samples)


def _eval(task: str, shard, out, *extra) -> list[str]:
    return ["eval", task, "--model", "medclip-tiny", "--reader", "wds", "--data", str(shard), "--out", str(out),
            "--workers", "1", "--no-progress", "--no-plots", "--device", "cpu", *extra]


def test_eval_shard_with_bad_json_and_non_utf8_txt_skips_and_counts(bad_shard, tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING)
    out = tmp_path / "results"
    # zero-shot never uses the .txt caption: the latin-1 sample is scored, the two bad JSONs are skipped
    assert main(_eval("zero-shot", bad_shard, out, "--label", "finding", "--classes", "a", "b")) == 0
    record = json.loads(next(out.glob("*/val-000000.json")).read_text())
    assert record["n_samples"] == 7 and record["n_skipped"] == 2
    assert record["details"]["bad_samples"] == {"bad_json": 2, "undecodable_txt": 1}
    logged = caplog.text
    for key in ("brokenjson", "listjson", "latin1"):
        assert f"shard {bad_shard}: sample {key}" in logged
    # retrieval needs the caption: the latin-1 sample has none and is skipped as caption-less
    assert main(_eval("retrieval", bad_shard, out)) == 0
    record = json.loads(next(out.glob("*/val-000000.json")).read_text())
    assert record["n_skipped"] == 3 and record["details"]["n_texts"] == 6


@pytest.mark.parametrize("value", ["0", "-4"])
def test_eval_batch_size_below_one_is_one_line(value, bad_shard, tmp_path, capsys):
    assert main(_eval("zero-shot", bad_shard, tmp_path / "o", "--label", "finding", "--classes", "a", "b",
                      "--batch-size", value)) == 2
    assert one_error_line(capsys.readouterr().err) == f"medclip: error: --batch-size must be at least 1, got {value}"


@pytest.mark.parametrize("content", ["[1, 2]", '{"model_cfg": [1]}', '"text"'])
def test_open_clip_config_that_is_not_an_object_is_one_line(content, tmp_path, capsys):
    assert main(["convert", "medclip-tiny", str(tmp_path / "model")]) == 0
    config = tmp_path / "model" / "open_clip_config.json"
    config.write_text(content)
    capsys.readouterr()
    assert main(["eval", "zero-shot", "--model", str(tmp_path / "model"), "--reader", "image_folder",
                 "--data", str(tmp_path / "imgs"), "--classes", "a", "b", "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"medclip: error: {config} is not a valid open_clip config")


def test_encode_image_takes_a_2d_tensor_as_one_gray_image(tiny_encoder):
    gray = torch.randn(64, 64)
    rgb = gray.expand(3, 64, 64)
    expected = tiny_encoder.encode_image(rgb)
    for given in (gray, gray[None], [gray], [gray[None]]):  # [H, W], [1, H, W], and in lists
        assert torch.allclose(tiny_encoder.encode_image(given), expected, atol=1e-6)
    batch = tiny_encoder.encode_image(torch.stack([gray, -gray])[:, None])  # [B, 1, H, W]
    assert torch.allclose(batch[0], expected[0], atol=1e-6)
    from medclip.errors import MedclipError

    with pytest.raises(MedclipError, match="5 channels"):
        tiny_encoder.encode_image(torch.randn(5, 64, 64))
