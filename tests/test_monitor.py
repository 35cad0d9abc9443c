"""Readable run logs: plain lines off a terminal, a bar on one, TensorBoard only when installed,
log.jsonl without repeated steps after a resume; medclip.pretrain as the Python entry point."""

from __future__ import annotations

import inspect
import io
import logging
import sys

import pytest

import medclip
from medclip.training.monitor import Monitor, read_log


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _metrics(step: int) -> dict:
    return {"loss": 5.0 - step / 10, "it": 3.0, "pc": 2.0 - step / 20, "lr": 1e-3, "samples_per_s": 150.0,
            "logit_scale": 14.3}


def _train(folder, stream, steps: int, log_every: int = 10) -> None:
    monitor = Monitor(folder, total_steps=steps, start_step=0, enabled=True, tensorboard=False, stream=stream)
    for step in range(1, steps + 1):
        monitor.advance()
        if step % log_every == 0:
            monitor.log(step, _metrics(step))
    monitor.close()


def test_one_plain_line_per_logged_step_when_not_a_terminal(tmp_path):
    stream = io.StringIO()
    _train(tmp_path, stream, steps=40)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in stream.getvalue()
    assert lines[0].startswith("step 10/40 (25%) | loss 4.0000 | it 3.0000 | pc 1.5000 | lr 1.000e-03 | "
                               "150.0 samples/s | ETA ")
    assert lines[-1].startswith("step 40/40 (100%) |") and lines[-1].endswith("ETA 0m00s")
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [10, 20, 30, 40]


def test_progress_bar_on_a_terminal(tmp_path):
    stream = Terminal()
    _train(tmp_path, stream, steps=20)
    assert "\r" in stream.getvalue() and "pretrain: 100%" in stream.getvalue()
    assert "step 10/20" not in stream.getvalue()


def test_tensorboard_off_is_said_once_when_not_installed(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with caplog.at_level(logging.INFO, logger="medclip.training.monitor"):
        monitor = Monitor(tmp_path, total_steps=20, start_step=0, enabled=True, tensorboard=True,
                          stream=io.StringIO())
        monitor.log(10, _metrics(10))
        monitor.log(20, _metrics(20))
        monitor.close()
    said = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert said == ["TensorBoard logging is off: the tensorboard package is not installed (pip install "
                    "'medclip-torch[tensorboard]'; set run.tensorboard: false to silence this)"]
    assert not (tmp_path / "tensorboard").exists() and len(read_log(tmp_path / "log.jsonl")) == 2


@pytest.mark.integration
def test_pretrain_api_and_log_jsonl_continuing_after_a_resume(tmp_path, capsys):
    """A run killed after step 4 was logged but before its checkpoint: the resume from step 2 rewrites 3 and 4."""
    doc = inspect.getdoc(medclip.pretrain)
    assert "recipe:" in doc and "resume:" in doc and "**overrides:" in doc and "Returns:" in doc
    overrides = dict(run={"steps": 4, "checkpoint_every": 2, "log_every": 1, "output_dir": str(tmp_path / "run"),
                          "tensorboard": False},
                     data={"demo_train_samples": 64, "demo_val_samples": 16, "batch_size": 16},
                     **{"eval.suites": [], "eval.every_steps": 0})
    result = medclip.pretrain("demo", **overrides)
    assert result.output_dir == tmp_path / "run" and (result.export_dir / "open_clip_config.json").is_file()
    err = capsys.readouterr().err  # pytest's capture is not a terminal: plain lines, no bar
    assert "step 4/4 (100%) | loss " in err and "\r" not in err
    log_path = tmp_path / "run" / "log.jsonl"
    assert [r["step"] for r in read_log(log_path)] == [1, 2, 3, 4]
    (tmp_path / "run" / "checkpoints" / "step_4.pt").unlink()  # the kill came before step 4's checkpoint
    medclip.pretrain("demo", resume="latest", **overrides)
    assert [r["step"] for r in read_log(log_path)] == [1, 2, 3, 4]
