"""Every shipped recipe passes its rehearsal, run as the user runs it; gpu_check's CPU form runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, require_shared  # tests/ is on sys.path under pytest

ITEMS = ["runs completed", "manifests found and counted", "sources mixed as weighted", "loss finite and falling",
         "checkpoint written atomically", "resume identical", "export loads in plain open_clip", "eval ran"]


def _medclip(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "medclip", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("recipe", ["demo", "shared_real", "unimed_vitb16", "medconcept_siglip"])
def test_shipped_recipe_passes_its_rehearsal(recipe, tmp_path):
    if recipe == "shared_real":
        require_shared("medpix", "train.jsonl")
    work = tmp_path / "rehearsal"
    proc = _medclip("pretrain", "--config", f"pretrain/{recipe}.yaml", "--rehearse", "--rehearse-dir", str(work))
    report = json.loads((work / "rehearsal.json").read_text()) if (work / "rehearsal.json").is_file() else None
    assert proc.returncode == 0 and report is not None, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert [c["title"] for c in report["checks"]] == ITEMS
    assert all(c["ok"] for c in report["checks"]) and report["ok"]
    assert "rehearsal: 8/8 items passed" in proc.stdout and "ready for GPUs" in proc.stdout


def test_gpu_check_runs_its_cpu_form_and_names_what_it_skipped(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--work", str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    assert "reduced form on CPU" in out and "rehearsal demo on 1 cpu process(es) via torchrun: passed" in out
    for skipped in ("rehearsal on all visible GPUs with NCCL", "ViT-B/16 + BiomedBERT shape", "torch.compile",
                    "MFU"):
        assert f"SKIPPED {skipped}:" in out
    rows = [line for line in out.splitlines() if line.startswith("sdpa ")]
    assert len(rows) == 3  # medclip IT-only, IT+PC and open_clip_train, each with samples/s and TFLOP/s
    for row in rows:
        samples_per_s, peak_mib, tflops = (float(v) for v in row.split()[-4:-1])
        assert samples_per_s > 0 and peak_mib > 0 and tflops > 0
