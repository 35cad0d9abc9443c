"""End-to-end runs on the demo set: exact resume after an interruption, outputs of a finished run."""

from __future__ import annotations

import json

import pytest
import torch

import medclip
from medclip.training.callbacks import Callback
from medclip.training.config import load_recipe
from medclip.training.trainer import Pretrainer


def demo_recipe(out, *overrides):
    return load_recipe(None, [
        f"run.output_dir={out}", "data.demo=true", "data.demo_train_samples=96", "data.demo_val_samples=24",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=32", "run.steps=8",
        "run.checkpoint_every=3", "run.keep_checkpoints=3", "run.log_every=2", "run.progress=false",
        "run.tensorboard=false", "run.deterministic=true", "objective.pc_weight=0.5", "optim.warmup_steps=2",
        *overrides])


class Interrupted(Exception):
    pass


class InterruptAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, batch, losses):
        if trainer.step == self.step:
            raise Interrupted


@pytest.mark.integration
def test_interrupted_run_resumed_from_latest_matches_uninterrupted(tmp_path):
    straight = Pretrainer.from_recipe(demo_recipe(tmp_path / "straight"))
    straight.run()
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "step_8.pt", weights_only=True)

    # Same run, killed after step 4 (the checkpoint of step 3 is on disk), then resumed.
    with pytest.raises(Interrupted):
        Pretrainer.from_recipe(demo_recipe(tmp_path / "resumed"), callbacks=[InterruptAfterStep(4)]).run()
    resumed = Pretrainer.from_recipe(demo_recipe(tmp_path / "resumed"), resume="latest")
    assert resumed.step == 3
    resumed.run()
    got = torch.load(tmp_path / "resumed" / "checkpoints" / "step_8.pt", weights_only=True)

    for part in ("model", "heads"):
        assert got[part].keys() == expected[part].keys()
        for key in expected[part]:
            torch.testing.assert_close(got[part][key], expected[part][key], atol=0, rtol=0, msg=key)
    assert got["data"] == expected["data"]

    # Outputs of a finished run: JSONL log, summary, curves, export loadable by open_clip and medclip.
    out = tmp_path / "straight"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert (out / "curves.png").stat().st_size > 0 and "loss (steps 2-8): total " in (out / "summary.txt").read_text()
    encoder = medclip.load(out / "export")
    assert encoder.heads is not None
    import open_clip

    open_clip.create_model_and_transforms(f"local-dir:{out / 'export'}")


def samples_drawn(stream_state: dict) -> int:
    """Samples the loader workers had read when the state was taken (no sample of the demo set is bad)."""
    workers = stream_state.get("workers")
    return sum(w["position"] for w in workers) if workers else sum(stream_state["positions"])


def _tensors_equal(got: dict, expected: dict) -> None:
    for part in ("model", "heads"):
        assert got[part].keys() == expected[part].keys()
        for key in expected[part]:
            torch.testing.assert_close(got[part][key], expected[part][key], atol=0, rtol=0, msg=key)


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])  # the demo recipe's 1, and the default 2 (round robin over workers)
def test_continuing_a_finished_run_equals_a_straight_run(tmp_path, workers):
    """`--set run.steps=N+k --resume latest` after a finished N-step run = a straight N+k-step run.

    The schedule is constant after warmup: with cosine, the first N steps' learning rates depend on
    run.steps, so no continuation can equal a longer run (it extends the cosine from where it stood).
    """
    settings = (f"data.num_workers={workers}", "data.demo_train_samples=160", "optim.schedule=constant",
                "run.checkpoint_every=100")
    straight = Pretrainer.from_recipe(demo_recipe(tmp_path / "straight", "run.steps=9", *settings))
    straight.run()
    expected = torch.load(tmp_path / "straight" / "checkpoints" / "step_9.pt", weights_only=True)

    Pretrainer.from_recipe(demo_recipe(tmp_path / "continued", "run.steps=5", *settings)).run()
    first = torch.load(tmp_path / "continued" / "checkpoints" / "step_5.pt", weights_only=True)
    # The final checkpoint's stream position is right after the 5th batch: 5 x 16 samples drawn, no more.
    assert samples_drawn(first["data"][0]) == 5 * 16
    continued = Pretrainer.from_recipe(demo_recipe(tmp_path / "continued", "run.steps=9", *settings), resume="latest")
    assert continued.step == 5
    continued.run()
    got = torch.load(tmp_path / "continued" / "checkpoints" / "step_9.pt", weights_only=True)
    _tensors_equal(got, expected)
    assert got["data"] == expected["data"]
