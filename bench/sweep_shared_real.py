"""Choose the shared_real recipe's settings on the MedPix dev split with Optuna (TPE), never on a test split.

Each trial trains ``medclip pretrain --config pretrain/shared_real.yaml`` with the trial's settings for the
same number of samples as the recipe (``--samples``, default its steps x batch: a larger batch trains fewer
steps), then scores the export with ``medclip eval suite shared_real --datasets`` on the **MedPix dev**
datasets only (``DEV``; the suite's COVID-19 datasets are its test split and stay out of every choice). The
objective is the mean of their headlines (zero-shot modality, body region, plane, caption retrieval R@5, and
the body-region and modality linear probes).

The search space (``SPACE``): lr, warmup, batch size, random-crop scale (augmentation strength), the share of
the radiologist caption against the label captions, long-caption handling, IT-Align's positives (a caption's own
image, or every image whose pool holds it), PC-Align's weight (0: IT-only), its start (a fraction of the run)
and its patch neighbourhood. Resolution is not searched: the image size belongs
to the model's architecture (its config), which the comparison with open_clip_train keeps fixed.

The study lives in ``OUT/study.db`` (SQLite): stop the script and run it again to add trials; shards are built
once into ``OUT/shards``. Each trial is one seed (``--seed``); re-run the chosen settings with 3 seeds
(bench/engine_parity.py or shared_real_vs_open_clip.py with ``--set``) before shipping them. ``--report``
prints every trial and the best settings as recipe overrides without training.

    .venv/bin/pip install -e '.[bench]'                                      # Optuna
    .venv/bin/python bench/sweep_shared_real.py --trials 20                 # ~10 min per trial on 2 CPU cores
    .venv/bin/python bench/sweep_shared_real.py --trials 12 --samples 7680  # shorter trials (240 steps of 32)
    .venv/bin/python bench/sweep_shared_real.py --report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _open_clip_baseline as ocb  # noqa: E402  (shard build, timed commands, headlines: one implementation)
import shared_real_vs_open_clip as srv  # noqa: E402  (the medclip command and run directory of the benches)

REPO = ocb.REPO
# MedPix dev datasets of zero_shot/shared_real.yaml; its covid_* datasets are the COVID-19 test split.
DEV = ("medpix_modality", "medpix_location", "medpix_plane", "medpix_retrieval", "medpix_location_probe",
       "medpix_modality_probe")


def _pc_start(trial, recipe, steps: int) -> list[str]:
    fraction = trial.suggest_float("pc_start_fraction", 0.0, 0.8)
    return [f"objective.pc_start_step={round(fraction * steps)}"]


# name -> (trial, recipe, steps) -> recipe overrides. Batch size is drawn first (the steps depend on it).
SPACE: dict[str, Callable] = {
    "lr": lambda t, r, s: [f"optim.lr={t.suggest_float('lr', 2e-4, 3e-3, log=True)}"],
    "warmup_steps": lambda t, r, s: [f"optim.warmup_steps={t.suggest_int('warmup_steps', 10, 100, step=10)}"],
    "crop_scale": lambda t, r, s: [f"data.crop_scale=[{t.suggest_float('crop_min', 0.4, 1.0)}, 1.0]"],
    "first_caption_share": lambda t, r, s: [
        "data.first_caption_share=" + t.suggest_categorical("first_caption_share", ["null", "0.25", "0.5", "0.75"])],
    # A stored study's categorical choices cannot change (Optuna refuses to resume it): a new choice needs a
    # new parameter name. 'concepts' (data.long_captions) did not beat the shipped head truncation on
    # engine_parity's 3 seeds (MedPix dev mean 51.3 ± 1.3 against 52.5 ± 0.6): not searched.
    "long_captions": lambda t, r, s: [
        f"data.long_captions={t.suggest_categorical('long_captions', ['head', 'window'])}"],
    "it_positives": lambda t, r, s: [
        f"objective.it_positives={t.suggest_categorical('it_positives', ['own', 'pool'])}"],
    "pc_weight": lambda t, r, s: [f"objective.pc_weight={t.suggest_float('pc_weight', 0.0, 0.3)}"],
    "pc_start": _pc_start,
    "pc_patch_context": lambda t, r, s: [
        f"objective.pc_patch_context={t.suggest_categorical('pc_patch_context', [1, 3])}"],
}


def trial_overrides(trial, recipe, samples: int) -> tuple[list[str], int]:
    """The recipe overrides of one trial and its number of steps (``samples`` / batch size)."""
    batch = trial.suggest_categorical("batch_size", [16, 32, 64])
    steps = max(1, round(samples / batch))
    overrides = [f"data.batch_size={batch}", f"run.steps={steps}"]
    for suggest in SPACE.values():
        overrides += suggest(trial, recipe, steps)
    return overrides, steps


def dev_score(headlines: dict[str, float]) -> float:
    missing = [d for d in DEV if d not in headlines]
    if missing:
        raise RuntimeError(f"the evaluation has no result for {', '.join(missing)}")
    return statistics.fmean(headlines[d] for d in DEV)


class Trainer:
    """One trial: a medclip run on the prebuilt shards, then the dev evaluation of its export."""

    def __init__(self, args, recipe, shards_root: Path, out: Path):
        self.args, self.recipe, self.shards_root, self.out = args, recipe, shards_root, out

    def __call__(self, trial) -> float:
        overrides, steps = trial_overrides(trial, self.recipe, self.args.samples)
        run_dir = self.out / f"trial-{trial.number:03d}"
        srv.fresh_run_dir(run_dir, self.shards_root)
        bench_args = argparse.Namespace(recipe=self.args.recipe, overrides=self.args.overrides, budget=None)
        start = time.perf_counter()
        ocb.run_timed(srv.medclip_command(bench_args, run_dir, self.args.seed, steps, overrides),
                      self.out / f"trial-{trial.number:03d}.log")
        eval_dir = run_dir / "eval_dev"
        ocb.run_timed([str(ocb.BIN / "medclip"), "eval", "suite", "shared_real", "--datasets", *DEV, "--model",
                       str(run_dir / "export"), "--out", str(eval_dir), "--no-plots", "--no-progress",
                       "--workers", "1"], self.out / f"trial-{trial.number:03d}-eval.log")
        headlines = ocb.headlines(eval_dir).get(str(run_dir / "export"), {})
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("headlines", headlines)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 1))
        score = dev_score(headlines)
        print(f"trial {trial.number}: dev mean {100 * score:.2f} in {time.perf_counter() - start:.0f}s "
              f"({' '.join(overrides)})", flush=True)
        return score


def report(study) -> list[str]:
    """Markdown: every finished trial's dev mean and settings, and the best trial's overrides."""
    done = [t for t in study.trials if t.value is not None]
    lines = ["| trial | dev mean | " + " | ".join(DEV) + " | settings |", "|---" * (len(DEV) + 3) + "|"]
    for t in sorted(done, key=lambda t: -t.value):
        heads = t.user_attrs.get("headlines", {})
        lines.append(f"| {t.number} | {100 * t.value:.2f} | "
                     + " | ".join(f"{100 * heads[d]:.1f}" if d in heads else "" for d in DEV)
                     + " | " + json.dumps(t.params, sort_keys=True) + " |")
    if done:
        best = max(done, key=lambda t: t.value)
        lines += ["", f"best: trial {best.number}, dev mean {100 * best.value:.2f}; recipe overrides:",
                  " ".join(f"--set {o}" for o in best.user_attrs.get("overrides", []))]
    return lines


def open_study(db: Path, sampler_seed: int):
    """The study in ``db`` (created if new), ready for this call's trials.

    Trials a killed call left RUNNING are marked FAIL (one call runs at a time). The sampler's seed is offset
    by the trials already there: with the same seed, a second call would draw the first call's start-up
    settings again and train them twice.
    """
    import optuna

    study = optuna.create_study(study_name="shared_real_dev", storage=f"sqlite:///{db}", direction="maximize",
                                load_if_exists=True)
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        print(f"trial {trial.number}: left running by a stopped call, marked failed", flush=True)
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials))
    return study


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain/shared_real.yaml")
    parser.add_argument("--trials", type=int, default=20, help="trials to add to the study in this call")
    parser.add_argument("--samples", type=int, default=None,
                        help="training samples per trial (default: the recipe's steps x batch size)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every trial")
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every trial (repeatable)")
    parser.add_argument("--out", default="runs/sweep_shared_real")
    parser.add_argument("--report", action="store_true", help="train nothing: print the study so far")
    args = parser.parse_args(argv)
    try:
        import optuna  # noqa: F401  (checked here: open_study and the trials import it)
    except ImportError:
        raise SystemExit("the sweep needs Optuna: pip install -e '.[bench]'") from None
    from medclip.training.config import load_recipe

    recipe = load_recipe(REPO / args.recipe, args.overrides)
    args.samples = args.samples or recipe.run.steps * recipe.data.batch_size
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(out / "study.db", args.sampler_seed)
    if not args.report:
        shards_root = out / "shards"
        ocb.build_shards(recipe, shards_root)
        study.optimize(Trainer(args, recipe, shards_root, out), n_trials=args.trials, catch=(SystemExit,))
    lines = report(study)
    print("\n".join(lines))
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
