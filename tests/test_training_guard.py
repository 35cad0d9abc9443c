"""Fail-safe training: non-finite steps are skipped and counted, divergence stops the run with one line and
never costs the last good checkpoint, checkpoint writes that fail (full disk) are one line and leave the
earlier checkpoints intact, a failed final evaluation leaves checkpoint, export, curves and summary."""

from __future__ import annotations

import json
import os
import resource
import signal
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import FixedStream, make_batch, recipe

from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt
from medclip.training import trainer as trainer_module
from medclip.training.optim import Diverged
from medclip.training.trainer import EvaluationFailed, Pretrainer


class PoisonedStream(FixedStream):
    """The fixed batch, with NaN images at the given (1-based) draws."""

    def __init__(self, batch: dict, bad: set[int]):
        super().__init__(batch)
        self.bad = bad
        self.poisoned = {**batch, "images": torch.full_like(batch["images"], float("nan"))}

    def __iter__(self):
        for batch in super().__iter__():
            yield self.poisoned if self.position in self.bad else batch


@pytest.mark.integration
def test_a_non_finite_step_changes_nothing_and_is_counted(tmp_path):
    out = tmp_path / "run"
    r = recipe(out, "run.steps=5", "run.checkpoint_every=1", "run.keep_checkpoints=10", "run.log_every=1",
               "optim.ema_decay=0.9")
    Pretrainer.from_recipe(r, data=PoisonedStream(make_batch(8), bad={5})).run()
    before, after = (torch.load(out / "checkpoints" / f"step_{s}.pt", weights_only=True) for s in (4, 5))
    for part in ("model", "heads"):
        for key, value in before[part].items():
            assert torch.equal(after[part][key], value), key  # no update from the NaN step
    for key, value in before["ema"]["weights"].items():  # nor of the EMA of the weights
        assert torch.equal(after["ema"]["weights"][key], value), key
    assert after["ema"]["updates"] == before["ema"]["updates"] == 4
    assert after["finite"] and after["scheduler"]["last_epoch"] == before["scheduler"]["last_epoch"] == 4
    assert after["optimizer"]["state"][0]["step"] == before["optimizer"]["state"][0]["step"]
    assert after["guard"] == {"skipped": 1}
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in records] == [0, 0, 0, 0, 1] and records[-1]["loss"] == "nan"
    summary = (out / "summary.txt").read_text()
    assert "loss (steps 1-5): total " in summary and "-> nan" in summary and "non-finite steps skipped: 1" in summary


@pytest.mark.integration
def test_divergence_stops_with_one_line_and_keeps_the_checkpoint_to_resume_from(tmp_path):
    """A sane run, continued with optim.lr=1e5: the first update ruins the weights (finite, huge), the
    gradients are non-finite from then on. The run stops after run.max_nonfinite_steps such steps and
    names the last checkpoint whose next step was finite, which a sane lr continues from."""
    out, batch = tmp_path / "run", make_batch(8)
    sane = ("run.checkpoint_every=1", "run.keep_checkpoints=1", "run.log_every=1", "optim.schedule=constant")
    Pretrainer.from_recipe(recipe(out, "run.steps=4", *sane), data=FixedStream(batch)).run()
    diverging = recipe(out, "run.steps=30", "optim.lr=1e5", "run.max_nonfinite_steps=3", *sane)
    with pytest.raises(Diverged) as info:
        Pretrainer.from_recipe(diverging, data=FixedStream(batch), resume="latest").run()
    message = str(info.value)
    good = ckpt.checkpoint_dir(out) / "step_4.pt"
    assert "\n" not in message and message.startswith("training diverged at step 8:")
    assert "steps 6-8" in message and f"last good checkpoint: {good}" in message and f"--resume {good}" in message
    # step_5 (the ruined weights the bad steps started from) is set aside; none were written during them.
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step_4.pt"]
    assert (ckpt.checkpoint_dir(out) / "step_5.diverged.pt").is_file()
    assert ckpt.resolve_resume("latest", out) == good
    assert "training diverged at step 8" in (out / "summary.txt").read_text()

    resumed = Pretrainer.from_recipe(recipe(out, "run.steps=7", *sane), data=FixedStream(batch), resume="latest")
    assert resumed.step == 4
    resumed.run()
    final = torch.load(ckpt.checkpoint_dir(out) / "step_7.pt", weights_only=True)
    assert final["finite"] and final["guard"] == {"skipped": 0}  # the diverged run's skips died with it


@pytest.mark.integration
def test_fp16_overflow_is_the_grad_scalers_business_not_divergence(tmp_path):
    trainer = Pretrainer.from_recipe(recipe(tmp_path, "model.precision=amp"), data=FixedStream(make_batch(8)))
    batch = make_batch(8)
    weights = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    scale = trainer.scaler.get_scale()
    losses = trainer.backward(batch)
    next(p for p in trainer.module.parameters() if p.grad is not None).grad.fill_(float("inf"))
    assert not trainer.update(losses["total"])  # overflow: no update, the scale goes down ...
    assert trainer.scaler.get_scale() == scale / 2 and trainer.guard.in_a_row == 0  # ... and it is no bad step
    assert all(torch.equal(v, weights[k]) for k, v in trainer.module.state_dict().items())
    losses = trainer.backward(batch)
    assert not trainer.update(torch.tensor(float("nan")))  # a non-finite loss is one
    assert trainer.guard.in_a_row == 1 and trainer.guard.skipped == 1


def test_rotation_keeps_the_proven_checkpoint_and_latest_skips_non_finite_ones(tmp_path):
    def write(step: int, finite: bool = True):
        path = ckpt.checkpoint_dir(tmp_path) / f"step_{step}.pt"
        ckpt.save_atomic({"step": step, "model": {}, "finite": finite}, path)
        return path

    keeper = ckpt.CheckpointKeeper(tmp_path, keep=1, is_main=True)
    keeper.written(2, write(2))
    keeper.after_step(3, finite=True)  # step 3 trained on from step_2: proven
    keeper.written(4, write(4, finite=False))
    keeper.after_step(5, finite=False)
    keeper.written(6, write(6))  # no checkpoint rotates the proven one away before it is proven itself
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_2.pt", "step_4.pt", "step_6.pt"]
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_6.pt"
    (ckpt.checkpoint_dir(tmp_path) / "step_6.pt").unlink()
    assert ckpt.resolve_resume("latest", tmp_path).name == "step_2.pt"  # step_4 has non-finite weights
    keeper.written(6, write(6))
    keeper.after_step(7, finite=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_6.pt"]
    assert keeper.diverged(first_bad_step=7) is None  # step_6 led to the bad steps: set aside
    assert ckpt.checkpoint_dir(tmp_path).joinpath("step_6.diverged.pt").is_file()


def test_resume_passes_over_a_damaged_checkpoint_and_a_garbage_path_is_one_line(tmp_path, caplog):
    """A checkpoint damaged after it was written (a copy cut short): `--resume latest` takes the one before
    and says why; no usable one left, or an explicit garbage path, is one line (was: torch's traceback)."""
    out, batch = tmp_path / "run", make_batch(8)
    steady = ("run.checkpoint_every=2", "run.keep_checkpoints=3", "optim.schedule=constant")
    Pretrainer.from_recipe(recipe(out, "run.steps=4", *steady), data=FixedStream(batch)).run()
    newest = ckpt.checkpoint_dir(out) / "step_4.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("latest", out).name == "step_2.pt"
    assert f"passing over {newest}: unreadable: its zip archive is incomplete (cut short or damaged)" in caplog.text
    assert Pretrainer.from_recipe(recipe(out, "run.steps=6", *steady), data=FixedStream(batch), resume="latest").step == 2

    (ckpt.checkpoint_dir(out) / "step_2.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MedclipError, match="no checkpoint in .* can be resumed") as info:
        ckpt.resolve_resume("latest", out)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(MedclipError, match=f"cannot read checkpoint {garbage}: not a PyTorch checkpoint") as info:
        Pretrainer.from_recipe(recipe(out, "run.steps=6", *steady), data=FixedStream(batch), resume=str(garbage))
    assert "\n" not in str(info.value)


def test_stale_partial_checkpoints_are_removed_at_the_next_start(tmp_path):
    folder = ckpt.checkpoint_dir(tmp_path)
    folder.mkdir(parents=True)
    dead = folder / ".step_7.pt.tmp-999999999"  # no such process
    alive = folder / f".step_7.pt.tmp-{os.getppid()}"  # another live writer: left alone
    for path in (dead, alive):
        path.write_bytes(b"partial")
    Pretrainer.from_recipe(recipe(tmp_path), data=FixedStream(make_batch(8)))
    assert not dead.exists() and alive.exists()


@pytest.fixture
def file_size_limit():
    """Writes beyond `limit` bytes fail (EFBIG) as on a full disk; SIGXFSZ would kill the process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(size: int):
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_earlier_ones(tmp_path, file_size_limit, monkeypatch):
    folder = ckpt.checkpoint_dir(tmp_path)
    ckpt.save_atomic({"step": 1, "model": {"w": torch.ones(8)}}, folder / "step_1.pt")
    big = {"step": 2, "model": {"w": torch.zeros(1 << 20)}}  # 4 MB
    file_size_limit(256 * 1024)
    with pytest.raises(MedclipError) as info:
        ckpt.save_atomic(big, folder / "step_2.pt")
    file_size_limit(resource.RLIM_INFINITY)
    message = str(info.value)
    assert "\n" not in message and "could not write checkpoint" in message and "needs about 4.2 MB" in message
    assert [p.name for p in folder.iterdir()] == ["step_1.pt"]  # no partial file, the earlier one intact
    assert torch.equal(ckpt.read_checkpoint(folder / "step_1.pt")["model"]["w"], torch.ones(8))

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: SimpleNamespace(free=1024))
    with pytest.raises(MedclipError, match=r"not enough disk space .* needs about 4.2 MB, .* has 0.0 MB free"):
        ckpt.save_atomic(big, folder / "step_2.pt")
    assert [p.name for p in folder.iterdir()] == ["step_1.pt"]


@pytest.mark.integration
def test_a_failed_final_evaluation_leaves_checkpoint_export_curves_and_summary(tmp_path, monkeypatch):
    def broken(encoder, recipe, output_dir, step, tag=""):
        raise RuntimeError(f"evaluation data unreadable at step {step}")

    monkeypatch.setattr(trainer_module, "evaluate", broken)
    out = tmp_path / "run"
    r = recipe(out, "run.steps=3", "run.log_every=1", "eval.suites=[demo]", "eval.every_steps=2",
               f"eval.root={out}/demo_data")  # the demo recipe's own root: the run writes the set there
    with pytest.raises(EvaluationFailed) as info:
        Pretrainer.from_recipe(r, data=FixedStream(make_batch(8))).run()  # the failure at step 2 does not stop training
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, MedclipError)
    assert message.startswith("final evaluation failed: RuntimeError: evaluation data unreadable at step 3;")
    assert (out / "checkpoints" / "step_3.pt").is_file() and (out / "curves.png").is_file()
    assert "final evaluation failed" in (out / "summary.txt").read_text()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("step 2" in r.get("eval_error", "") for r in records)
    import open_clip

    open_clip.create_model_and_transforms(f"local-dir:{out / 'export'}")
