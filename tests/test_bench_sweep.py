"""The shared_real sweep: every trial is a valid recipe of the same training samples, scored on the MedPix dev
datasets only (never a test split), and the study reports the best trial's settings as overrides."""

from pathlib import Path

import optuna
import pytest
import yaml
from engine_helpers import load_bench
from torchvision import transforms

import medclip
from medclip.errors import MedclipError
from medclip.training.components import train_transform
from medclip.training.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pretrain" / "shared_real.yaml"


def _sweep():
    return load_bench("sweep_shared_real.py")


def test_objective_reads_only_dev_splits():
    suite = yaml.safe_load((ROOT / "zero_shot" / "shared_real.yaml").read_text())
    dev = {d["name"] for d in suite["datasets"] if "/dev." in d["args"]["path"]}
    assert set(_sweep().DEV) == dev  # the COVID-19 datasets (its test split) are never scored
    assert not any("test" in d["args"]["path"] for d in suite["datasets"] if d["name"] in dev)


@pytest.mark.parametrize("seed", range(6))
def test_every_trial_is_a_valid_recipe_of_the_same_samples(seed):
    sweep = _sweep()
    recipe = load_recipe(RECIPE)
    samples = recipe.run.steps * recipe.data.batch_size
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    overrides, steps = sweep.trial_overrides(trial, recipe, samples)
    chosen = load_recipe(RECIPE, overrides)  # validated like a user's --set
    assert chosen.run.steps == steps and abs(steps * chosen.data.batch_size - samples) <= chosen.data.batch_size
    assert chosen.objective.pc_start_step <= 0.8 * steps + 1 and 0.4 <= chosen.data.crop_scale[0] <= 1
    names = {o.split("=", 1)[0] for o in overrides}
    assert {"optim.lr", "optim.warmup_steps", "data.batch_size", "data.crop_scale", "data.first_caption_share",
            "data.long_captions", "objective.it_positives", "objective.pc_weight", "objective.pc_start_step"} <= names


def test_study_scores_trials_and_reports_the_best(tmp_path, monkeypatch):
    """Trials through the Trainer with the commands replaced: the dev mean is the objective, and the report names
    the best trial's overrides."""
    sweep = _sweep()
    recipe = load_recipe(RECIPE)
    commands = []
    monkeypatch.setattr(sweep.ocb, "run_timed", lambda cmd, log: commands.append(cmd) or 1.0)
    scores = iter([0.3, 0.5, 0.4])

    def headlines(eval_dir):
        value = next(scores)
        return {str(eval_dir.parent / "export"): {name: value for name in sweep.DEV} | {"covid_view": 0.99}}

    monkeypatch.setattr(sweep.ocb, "headlines", headlines)
    args = sweep.argparse.Namespace(recipe=str(RECIPE), overrides=[], samples=640, seed=0)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(sweep.Trainer(args, recipe, tmp_path / "shards", tmp_path), n_trials=3)
    assert [round(t.value, 6) for t in study.trials] == [0.3, 0.5, 0.4]  # the COVID-19 test score is not used
    evals = [c for c in commands if c[1:3] == ["eval", "suite"]]
    assert len(evals) == 3 and all(c[c.index("--datasets") + 1:c.index("--model")] == list(sweep.DEV) for c in evals)
    lines = sweep.report(study)
    assert lines[2].startswith("| 1 | 50.00 |")
    assert lines[-1] == " ".join(f"--set {o}" for o in study.trials[1].user_attrs["overrides"])


def test_crop_scale_reaches_the_training_transform():
    model = medclip.load("medclip-tiny").model
    crop = train_transform(load_recipe(RECIPE, ["data.crop_scale=[0.5, 0.8]"]), model).transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.scale == (0.5, 0.8)
    assert train_transform(load_recipe(RECIPE), model).transforms[0].scale == (0.9, 1.0)  # open_clip's default
    with pytest.raises(MedclipError, match="data.crop_scale must be"):
        load_recipe(RECIPE, ["data.crop_scale=[0.9, 0.5]"])


def test_a_second_call_draws_new_settings_and_fails_trials_a_killed_call_left_running(tmp_path):
    """Re-running the sweep adds trials: it must not replay the first call's start-up draws (the same sampler
    seed would), and a trial whose process was killed must not stay RUNNING."""
    sweep, db = _sweep(), tmp_path / "study.db"
    first = sweep.open_study(db, sampler_seed=0)
    for _ in range(2):
        trial = first.ask()
        trial.suggest_float("lr", 1e-5, 1e-2, log=True)
        first.tell(trial, 0.5)
    killed = first.ask()
    killed.suggest_float("lr", 1e-5, 1e-2, log=True)  # its process dies here: RUNNING in the database

    second = sweep.open_study(db, sampler_seed=0)
    states = {t.number: t.state for t in second.trials}
    assert states[killed.number] == optuna.trial.TrialState.FAIL
    new = second.ask()
    new.suggest_float("lr", 1e-5, 1e-2, log=True)
    assert new.params["lr"] not in {t.params["lr"] for t in second.trials if t.number != new.number}
