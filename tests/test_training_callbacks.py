"""The trainer's callbacks and checkpoint writer, through `medclip.pretrain` as a user calls it."""

from __future__ import annotations

import ast

import pytest

import medclip
from medclip.training import checkpoint as ckpt
from medclip.training.callbacks import Callback
from medclip.training.monitor import read_log

PACKAGE = medclip.__file__.rsplit("/", 1)[0]


class Recorder(Callback):
    """Every call, in order: (point, trainer.step, what the point carries)."""

    def __init__(self):
        self.calls = []

    def on_run_start(self, trainer):
        self.calls.append(("run_start", trainer.step, None))

    def on_step_end(self, trainer, batch, losses):
        self.calls.append(("step_end", trainer.step, (list(batch["keys"]), float(losses["total"]))))

    def before_checkpoint(self, trainer, path):
        self.calls.append(("before_checkpoint", trainer.step, (path.name, path.exists())))

    def after_checkpoint(self, trainer, path):
        self.calls.append(("after_checkpoint", trainer.step, (path.name, path.exists())))

    def on_evaluate(self, trainer, results, error=None):
        self.calls.append(("evaluate", trainer.step, (sorted(results), error)))

    def on_train_end(self, trainer):
        self.calls.append(("train_end", trainer.step, None))

    def on_run_end(self, trainer, results):
        self.calls.append(("run_end", trainer.step, sorted(results)))


@pytest.mark.integration
def test_callbacks_and_checkpoint_writer_see_a_run_through_the_public_api(tmp_path):
    recorder, written = Recorder(), []

    def writer(obj, path):  # a caller's writer: the checkpoint object and its path, on rank 0
        written.append((obj["step"], path.name))
        ckpt.save_atomic(obj, path)

    result = medclip.pretrain("demo", callbacks=[recorder], checkpoint_writer=writer,
                              run={"steps": 4, "checkpoint_every": 2, "log_every": 1, "output_dir": str(tmp_path / "run"),
                                   "tensorboard": False, "progress": False},
                              data={"demo_train_samples": 64, "demo_val_samples": 16, "batch_size": 8,
                                    "num_workers": 2},
                              **{"eval.every_steps": 3})
    points = [(point, step) for point, step, _ in recorder.calls]
    assert points == [("run_start", 0), ("step_end", 1), ("step_end", 2), ("before_checkpoint", 2),
                      ("after_checkpoint", 2), ("step_end", 3), ("evaluate", 3), ("step_end", 4),
                      ("before_checkpoint", 4), ("after_checkpoint", 4), ("train_end", 4), ("evaluate", 4),
                      ("run_end", 4)]
    calls = {(point, step): seen for point, step, seen in recorder.calls}
    # The batch each step trained on: 8 samples, none seen twice in 4 steps of a 64-sample set.
    keys = [key for step in range(1, 5) for key in calls["step_end", step][0]]
    assert len(keys) == 32 and len(set(keys)) == 32
    assert calls["before_checkpoint", 2] == ("step_2.pt", False) and calls["after_checkpoint", 2] == ("step_2.pt", True)
    assert written == [(2, "step_2.pt"), (4, "step_4.pt")]
    assert calls["evaluate", 3][1] is None and calls["evaluate", 3][0]  # the periodic evaluation's metric names
    assert calls["run_end", 4] == sorted(result.metrics) and result.metrics
    # The run's own log is there as before: MetricsLog is every trainer's first callback.
    records = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if any(k.startswith("eval/") for k in r)] == [3, 4]


def _assigned(tree: ast.AST):
    """(line, what is assigned to) of every assignment, and ``OBJ.*`` of every ``setattr(OBJ, ...)``."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                yield node.lineno, ast.unparse(target)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args:
            yield node.lineno, f"{ast.unparse(node.args[0])}.*"


def test_nothing_in_the_package_patches_torch_or_the_trainer():
    """Observers come in as callbacks and parts: no module assigns to torch's functions, to the trainer's
    class, or to an object's __class__ (other than the documented lazy-module hook in medclip/_lazy.py)."""
    from pathlib import Path

    found = []
    for path in sorted(Path(PACKAGE).rglob("*.py")):
        for line, text in _assigned(ast.parse(path.read_text())):
            patched = text.startswith(("torch.", "Pretrainer.")) or text.endswith("__class__")
            if patched and not (path.name == "_lazy.py" and text.endswith("__class__")):
                found.append(f"{path.relative_to(PACKAGE)}:{line}: {text}")
    assert found == []
