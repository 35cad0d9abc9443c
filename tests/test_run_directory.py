"""A run directory belongs to one run (issue 29): a fresh run does not mix with another run's files, a live
run's lock keeps a second process out (a killed run's lock is taken over), a resume checks lineage and model
before anything is written, and rotation never deletes the run's newest checkpoint. Through `medclip pretrain`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import one_error_line

from medclip.cli import main
from medclip.training import rundir
from medclip.training.checkpoint import list_checkpoints
from medclip.training.monitor import read_log

TINY = ["--config", "demo", "--set", "data.demo_train_samples=96", "--set", "data.demo_val_samples=16",
        "--set", "data.batch_size=16", "--set", "data.num_workers=1", "--set", "eval.suites=[]",
        "--set", "eval.every_steps=0", "--set", "run.progress=false", "--set", "run.tensorboard=false",
        "--set", "optim.warmup_steps=1", "--set", "run.log_every=1"]


def pretrain(out, *args: str) -> list[str]:
    return ["pretrain", *TINY, "--set", f"run.output_dir={out}", *args]


def refused(capsys, argv: list[str]) -> str:
    """The command exits 2 with one error line; that line."""
    capsys.readouterr()
    assert main(argv) == 2
    return one_error_line(capsys.readouterr().err)


def checkpoint_run_ids(out) -> set:
    return {torch.load(p, weights_only=True, map_location="cpu").get("run_id") for p in list_checkpoints(out)}


def snapshot(out) -> dict:
    """Every file of a run directory and its bytes (to show that a refused command changed nothing)."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(pretrain(out, "--set", "run.steps=4", "--set", "run.checkpoint_every=2",
                         "--set", "run.keep_checkpoints=3")) == 0
    return out


def copy_of(run, tmp_path, name: str = "run"):
    return shutil.copytree(run, tmp_path / name)


@pytest.mark.integration
def test_a_fresh_run_into_another_runs_directory_stops_and_overwrite_replaces_that_run(finished_run, tmp_path,
                                                                                     capsys):
    out = copy_of(finished_run, tmp_path)
    before = snapshot(out)
    line = refused(capsys, pretrain(out, "--set", "run.steps=3", "--set", "run.checkpoint_every=1",
                                    "--set", "optim.lr=0.005"))
    assert line == (f"medclip: error: run.output_dir {out} already holds 2 checkpoint(s) of another run, newest "
                    f"step_4.pt; continue it with --resume latest, choose another run.output_dir, or pass "
                    f"--overwrite to remove that run's files and start afresh")
    assert snapshot(out) == before  # not even recipe.yaml was rewritten

    old_run = rundir.read_run_id(out)
    assert main(pretrain(out, "--set", "run.steps=3", "--set", "run.checkpoint_every=1", "--set", "optim.lr=0.005",
                         "--overwrite")) == 0
    new_run = rundir.read_run_id(out)
    assert old_run and new_run and new_run != old_run
    assert [p.name for p in list_checkpoints(out)] == ["step_2.pt", "step_3.pt"]  # keep_checkpoints=2
    assert checkpoint_run_ids(out) == {new_run}
    assert {r["run_id"] for r in read_log(out / "log.jsonl")} == {new_run}

    # The resume continues this run, and its log reads every step once.
    assert main(pretrain(out, "--set", "run.steps=4", "--resume", "latest")) == 0
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2, 3, 4]
    assert checkpoint_run_ids(out) == {new_run} and rundir.read_run_id(out) == new_run

    # The old run's checkpoint does not resume into this run's directory.
    foreign = finished_run / "checkpoints" / "step_4.pt"
    before = snapshot(out)
    line = refused(capsys, pretrain(out, "--set", "run.steps=6", "--resume", str(foreign)))
    assert line == (f"medclip: error: --resume: {foreign} belongs to run {old_run}, but {out} holds run {new_run} "
                    f"(its recipe.yaml); resume a checkpoint of run {new_run}, or resume into another "
                    f"run.output_dir")
    assert snapshot(out) == before
    line = refused(capsys, pretrain(out, "--overwrite", "--resume", "latest"))
    assert line == "medclip: error: --overwrite starts a new run and --resume continues one: choose one of them"


@pytest.mark.integration
def test_a_rejected_resume_writes_nothing(finished_run, tmp_path, capsys):
    """Resuming a medclip-tiny run as medclip-tiny-bert: one line, exit 2 (was: exit 1 with 'unexpected
    RuntimeError ... (a bug?)', and recipe.yaml already rewritten to the rejected model)."""
    out = copy_of(finished_run, tmp_path)
    before = snapshot(out)
    line = refused(capsys, pretrain(out, "--set", "run.steps=6", "--set", "model.name=medclip-tiny-bert",
                                    "--resume", "latest"))
    assert line.startswith(f"medclip: error: --resume: {out}/checkpoints/step_4.pt holds a medclip-tiny model, "
                           f"this recipe builds medclip-tiny-bert (")
    assert line.endswith("resume with --set model.name=medclip-tiny, or start a new run in another run.output_dir")
    assert snapshot(out) == before and not (out / rundir.LOCK_NAME).exists()


@pytest.mark.integration
def test_rotation_never_deletes_the_runs_newest_checkpoint(finished_run, tmp_path):
    """Back to step 2 of a run whose checkpoints go to step 4, one step on, keeping 1: step_3.pt (this run's
    final checkpoint) stays although step_4.pt sorts after it (was: rotated away at the end of the run)."""
    out = copy_of(finished_run, tmp_path)
    assert main(pretrain(out, "--set", "run.steps=3", "--set", "run.keep_checkpoints=1",
                         "--resume", str(out / "checkpoints" / "step_2.pt"))) == 0
    assert "step_3.pt" in [p.name for p in list_checkpoints(out)]


@pytest.mark.integration
def test_checkpoints_of_earlier_versions_without_a_run_id_still_resume(finished_run, tmp_path, caplog):
    out = copy_of(finished_run, tmp_path)
    for path in list_checkpoints(out):  # as written before run ids existed
        obj = torch.load(path, weights_only=True, map_location="cpu")
        del obj["run_id"]
        torch.save(obj, path)
    recipe = out / "recipe.yaml"
    recipe.write_text(recipe.read_text().split("\n", 1)[1])
    assert rundir.read_run_id(out) is None
    with caplog.at_level("INFO"):
        assert main(pretrain(out, "--set", "run.steps=5", "--resume", "latest")) == 0
    run_id = rundir.read_run_id(out)
    assert f"{out}/checkpoints/step_4.pt has no run id (written by an earlier medclip version); resuming it as " \
           f"run {run_id}" in caplog.text
    assert torch.load(out / "checkpoints" / "step_5.pt", weights_only=True)["run_id"] == run_id


def _wait_for(condition, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.integration
def test_a_live_run_keeps_a_second_process_out_and_a_killed_runs_lock_is_taken_over(finished_run, tmp_path,
                                                                                  capsys, caplog):
    out = copy_of(finished_run, tmp_path)
    live = subprocess.Popen([sys.executable, "-m", "medclip", *pretrain(out, "--set", "run.steps=100000",
                                                                        "--set", "run.checkpoint_every=1",
                                                                        "--resume", "latest")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        lock = out / rundir.LOCK_NAME
        _wait_for(lambda: (out / "checkpoints" / "step_5.pt").is_file() or live.poll() is not None,
                  "the live run's first checkpoint")
        assert live.poll() is None, live.stderr.read().decode()
        assert json.loads(lock.read_text())["pid"] == live.pid
        recipe = (out / "recipe.yaml").read_bytes()
        for extra in ([], ["--resume", "latest"], ["--overwrite"]):
            line = refused(capsys, pretrain(out, "--set", "run.steps=3", "--set", "run.seed=2", *extra))
            assert line == (f"medclip: error: run.output_dir {out} is in use by another run (process {live.pid} on "
                            f"this host, {lock}); wait for it to end, or choose another run.output_dir")
        assert (out / "recipe.yaml").read_bytes() == recipe and json.loads(lock.read_text())["pid"] == live.pid
    finally:
        os.killpg(live.pid, signal.SIGKILL)  # the run and its loader worker, as a crashed node would leave it
        live.wait()
    newest = int(list_checkpoints(out)[-1].stem.split("_")[1])
    with caplog.at_level("INFO"):
        assert main(pretrain(out, "--set", f"run.steps={newest + 1}", "--resume", "latest")) == 0
    assert f"taking over the lock {lock} left by process {live.pid}, no longer running" in caplog.text
    assert not lock.exists()
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(1, newest + 2))
