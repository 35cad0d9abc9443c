"""A model saved by medclip.save is scored by CLIP_benchmark's own command line, unchanged."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medclip
from medclip.evaluation import EvalModel, read_dataset, retrieval


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def _retrieval_wds(root: Path, n: int = 12) -> Path:
    """CLIP_benchmark's local wds layout: test/0.tar (jpg + txt, one caption a line), nshards, type."""
    rng = np.random.default_rng(3)
    (root / "test").mkdir(parents=True)
    (root / "test" / "nshards.txt").write_text("1")
    (root / "dataset_type.txt").write_text("retrieval")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            _add(tar, f"{i:04d}.png", buf.getvalue())
            caps = f"a scan number {i} of the chest\nradiograph {i} with finding {i % 3}"
            _add(tar, f"{i:04d}.txt", caps.encode())
            _add(tar, f"{i:04d}.json", json.dumps({"captions": caps.split("\n"), "labels": {}}).encode())
    return root


def test_clip_benchmark_cli_scores_exported_model(tmp_path, tiny_encoder):
    exe = shutil.which("clip_benchmark") or str(Path(sys.executable).parent / "clip_benchmark")
    if not Path(exe).exists():
        pytest.fail("clip_benchmark (dev dependency) is not installed")
    model_dir = medclip.save(tiny_encoder, tmp_path / "export")
    data_root = _retrieval_wds(tmp_path / "mini")
    out = tmp_path / "result.json"
    cmd = [exe, "eval", "--model", f"local-dir:{model_dir}", "--pretrained", "none", "--dataset", "wds/mini",
           "--dataset_root", str(data_root), "--task", "zeroshot_retrieval", "--recall_k", "1", "5",
           "--no_amp", "--num_workers", "0", "--batch_size", "8", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["task"] == "zeroshot_retrieval"
    ref = result["metrics"]
    # medclip's own retrieval on the same shard and the same exported weights agrees with it.
    ours = retrieval(EvalModel(medclip.load(model_dir, device="cpu")),
                     read_dataset("wds", data_root, path="test/*.tar"), recall_ks=(1, 5)).metrics
    for key in ("image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                "text_retrieval_recall@5"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6), key
