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


def _medclip(*args: str, cwd=REPO_ROOT, timeout: int = 1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "medclip", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# demo's rehearsal runs in test_gpu_check_runs_its_cpu_form... below (through torchrun); the 2-process
# fork path is rehearsed by the other three.
@pytest.mark.integration
# finetune_full is finetune_lit without the lock (the same start-weights path): rehearsing it too would add a
# minute to `make test` and cover nothing new.
@pytest.mark.parametrize("recipe", ["shared_real", "unimed_vitb16", "medconcept_siglip", "finetune_lit",
                                    "finetune_lora"])
def test_shipped_recipe_passes_its_rehearsal(recipe, tmp_path):
    """As README runs it: the recipe by name, from the user's directory, into the default (relative) work
    directory OUTPUT_DIR-rehearsal; shared_real and the fine-tuning recipes from the repository root (their
    data paths are relative to it), into a relative --rehearse-dir. The fine-tuning recipes start from their
    debug model's random weights, with 2 loader workers per process: resume with LoRA adapters (and with
    locked towers) is as exact as without, SIGKILL and --resume latest included."""
    from medclip.training.config import load_recipe

    if recipe == "shared_real" or recipe.startswith("finetune_"):
        require_shared("medpix" if recipe == "shared_real" else "covid-cxr", "train.jsonl")
        work = tmp_path / "rehearsal"
        workers = ["--set", "data.num_workers=2"] if recipe.startswith("finetune_") else []
        proc = _medclip("pretrain", "--config", recipe, "--rehearse", "--rehearse-dir",
                        os.path.relpath(work, REPO_ROOT), *workers)
    else:
        work = tmp_path / f"{load_recipe(recipe).run.output_dir}-rehearsal"
        proc = _medclip("pretrain", "--config", recipe, "--rehearse", cwd=tmp_path)
    report = json.loads((work / "rehearsal.json").read_text()) if (work / "rehearsal.json").is_file() else None
    assert proc.returncode == 0 and report is not None, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert [c["title"] for c in report["checks"]] == ITEMS
    assert all(c["ok"] for c in report["checks"]) and report["ok"]
    assert "rehearsal: 8/8 items passed" in proc.stdout and "ready for GPUs" in proc.stdout


@pytest.mark.integration
def test_gpu_check_runs_its_cpu_form_and_names_what_it_skipped(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--work", str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-3000:]
    assert "reduced form on CPU" in out and "rehearsal demo on 1 cpu process(es) via torchrun: passed" in out
    for skipped in ("rehearsal on all visible GPUs with NCCL", "ViT-B/16 + BiomedBERT shape", "torch.compile",
                    "MFU", "GPU JPEG decode (nvJPEG)"):
        assert f"SKIPPED {skipped}:" in out
    rows = [line for line in out.splitlines() if line.startswith("sdpa ")]
    assert len(rows) == 3  # medclip IT-only, IT+PC and open_clip_train, each with samples/s and TFLOP/s
    for row in rows:
        samples_per_s, peak_mib, tflops = (float(v) for v in row.split()[-4:-1])
        assert samples_per_s > 0 and peak_mib > 0 and tflops > 0


@pytest.mark.integration
def test_the_ema_of_the_weights_is_resumed_bit_for_bit_and_exported_when_asked(tmp_path):
    """2 processes x 2 loader workers, SIGKILL while writing step 14, `--resume latest` from step 7: the resumed
    run's EMA equals the straight run's bit for bit (an EMA started again from the resumed weights at step 7 does
    not: 0/68 tensors equal). The straight run exports the EMA and evaluates both sets of weights."""
    import torch

    import medclip

    work = tmp_path / "rehearsal"
    proc = _medclip("pretrain", "--config", "demo", "--set", "optim.ema_decay=0.9", "--set", "optim.ema_export=true",
                    "--set", "data.num_workers=2", "--rehearse", "--rehearse-dir", str(work))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    resume = next(c for c in json.loads((work / "rehearsal.json").read_text())["checks"]
                  if c["title"] == "resume identical")
    assert resume["ok"] and "EMA of the weights: 68/68 tensors bit-identical" in resume["lines"], resume
    straight = work / "runs" / "straight"
    final = torch.load(straight / "checkpoints" / "step_20.pt", weights_only=True)
    ema, raw = final["ema"]["weights"], final["model"]
    assert final["ema"]["updates"] == 20 and any(not torch.equal(ema[f"model.{k}"], v) for k, v in raw.items())
    exported = medclip.load(straight / "export", device="cpu").model.state_dict()
    for key, value in exported.items():
        if f"model.{key}" in ema:
            assert torch.equal(value, ema[f"model.{key}"]), key
    summary = (straight / "summary.txt").read_text()
    assert "the export holds the EMA weights" in summary and "ema/demo/demo_modality/acc1" in summary
    assert (straight / "eval" / "step_20-ema").is_dir()
