"""open_clip_train as the benches' reference: medclip's shards and their caption-pool passes, open_clip_train
run on them with a recipe's settings, and its checkpoint exported and scored like medclip's models.

Used by shared_real_vs_open_clip.py and engine_parity.py. Run as a script, it is open_clip_train's own
``main`` with medclip's model configs registered (what ``SELF`` runs in a subprocess)::

    .venv/bin/python bench/_open_clip_baseline.py --train-data ... --model medclip-small-resnet18 ...
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")
CALIBRATION_STEPS = 30
SELF = [sys.executable, str(Path(__file__).resolve())]


def run_timed(cmd: list[str], log_path: Path) -> float:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return elapsed


def open_clip_train_main(argv: list[str]) -> None:
    """Run open_clip_train's main with medclip's model configs registered (the baseline subprocess)."""
    import open_clip_train.data as data
    from open_clip_train.main import main

    import medclip

    medclip.register_model_configs()  # the medclip-* configs, for open_clip's create_model

    # open_clip_train 3.x is written for webdataset 0.2, whose tar expander has no end-of-shard marker;
    # webdataset >= 1.0 yields an empty dict there, which its grouping function cannot read. Drop the
    # markers before it; nothing else about its pipeline changes.
    group = data.group_by_keys_nothrow
    data.group_by_keys_nothrow = lambda files, *a, **k: group((f for f in files if f), *a, **k)
    main(argv)


# ---------------------------------------------------------------------------------------------- data
def build_shards(recipe, shards_root: Path) -> list[Path]:
    """The recipe's data.build sources, built once (as ``medclip pretrain`` would) into ``shards_root``."""
    from medclip.training.prepare import build_source

    manifests = []
    for spec in recipe.data.build:
        if "{output_dir}" in spec.input:
            raise SystemExit(f"data.build {spec.name}: an input under {{output_dir}} cannot be built before the run")
        # Paths as the medclip subprocess (cwd = the repository) resolves them, so its build key matches.
        spec = dataclasses.replace(spec, input=str((REPO / spec.input).resolve()),
                                   vocab=[str((REPO / v).resolve()) for v in spec.vocab])
        manifests.append(build_source(spec, shards_root))
    return manifests


def shard_urls(manifests: list[Path]) -> list[str]:
    from medclip.data.manifest import load_manifest

    return [url for m in manifests for url in load_manifest(m).urls]


def read_samples(url: str):
    """(key, image extension, image bytes, caption pool) of each sample of a medclip shard."""
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(url) as tar:
        for info in tar:
            if info.isreg():
                key, _, ext = info.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    for key, files in members.items():
        ext = next((e for e in ("jpg", "png", "jpeg", "webp") if e in files), None)
        if ext is None or "txt" not in files:
            continue
        pool = json.loads(files["json"]).get("captions") if "json" in files else None
        yield key, ext, files[ext], pool or [files["txt"].decode("utf-8")]


def write_caption_pool(urls: list[str], out: Path, passes: int, seed: int = 0) -> tuple[list[str], int]:
    """Pool shards: per pass and source shard, one tar with every image once and a caption drawn uniformly
    from its pool (the draws of pass p do not depend on how many passes are written). Returns the shard
    paths and the number of images per pass."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    paths, images = [], 0
    for p in range(passes):
        images = 0
        for i, url in enumerate(urls):
            path = out / f"pool-p{p:03d}-{i:04d}.tar"
            with wds.TarWriter(str(path), encoder=False) as sink:
                for key, ext, image, pool in read_samples(url):
                    caption = random.Random(f"{seed}/{p}/{key}").choice(pool)
                    sink.write({"__key__": f"{key}_p{p}", ext: image, "txt": caption.encode("utf-8")})
                    images += 1
            paths.append(str(path))
    return paths, images


class BaselineShards:
    """The shards a baseline reads for one caption set (pool shards are written when first needed)."""

    def __init__(self, urls: list[str], out: Path):
        self.urls, self.out = urls, out
        self.images_per_pass = sum(1 for url in urls for _ in read_samples(url))
        self.pool: list[str] = []

    def for_data(self, data: str, samples: int) -> list[str]:
        if data == "radiologist":
            return self.urls
        passes = math.ceil(samples / self.images_per_pass) + 1  # one spare: shuffling draws across passes
        if len(self.pool) < passes * len(self.urls):
            if self.out.exists():
                shutil.rmtree(self.out)
            self.pool, _ = write_caption_pool(self.urls, self.out, passes)
            print(f"caption pool: {passes} passes of {self.images_per_pass} images -> {self.out}")
        return self.pool



# ----------------------------------------------------------------------------------- open_clip_train
def at_least_one_step(steps: int, who: str, budget: float) -> int:
    if steps < 1:
        raise SystemExit(f"{who}: not one step fits in --budget {budget:.0f}s on this machine (busy?); "
                         "give a larger budget, or --baseline-steps")
    return steps


def baseline_argv(recipe, model: str, shards: list[str], steps: int, logs: Path, name: str) -> list[str]:
    batch = recipe.data.batch_size
    return [
        "--train-data", "::".join(shards), "--dataset-type", "webdataset",
        "--train-num-samples", str(steps * batch), "--epochs", "1", "--batch-size", str(batch),
        "--model", model, "--precision", "fp32", "--workers", "1", "--seed", str(recipe.run.seed),
        # Explicit betas / eps: open_clip_train would otherwise pick them by whether "vit" is in the name.
        "--lr", str(recipe.optim.lr), "--wd", str(recipe.optim.weight_decay), "--beta1", str(recipe.optim.beta1),
        "--beta2", str(recipe.optim.beta2), "--eps", str(recipe.optim.eps),
        "--warmup", str(min(recipe.optim.warmup_steps, max(steps - 1, 0))),
        "--logs", str(logs), "--name", name, "--log-every-n-steps", "5", "--save-frequency", "1",
        "--report-to", "", "--device", "cpu",
    ]


def baseline_settings(recipe, spec: str):
    """``MODEL`` or ``MODEL@BATCH`` -> (model, the recipe with that batch size). Another batch size
    keeps the warmup's length in samples."""
    model, _, batch = spec.partition("@")
    if not batch:
        return model, recipe
    try:
        size = int(batch)
    except ValueError:
        raise SystemExit(f"--baseline-model {spec}: the batch size after '@' must be an integer") from None
    warmup = round(recipe.optim.warmup_steps * recipe.data.batch_size / size)
    return model, dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, batch_size=size),
                                      optim=dataclasses.replace(recipe.optim, warmup_steps=warmup))


def calibrate_baseline(recipe, model: str, shards: list[str], budget: float, out: Path) -> int:
    """Steps of ``model`` that fit in the budget, from a short timed open_clip_train run."""
    logs = out / f"open_clip_train-{model}-b{recipe.data.batch_size}-calibration"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    argv = baseline_argv(recipe, model, shards, CALIBRATION_STEPS, logs, "calibration")
    total = run_timed(SELF + argv, logs / "calibration.log")
    times = [float(t) for t in BATCH_TIME.findall((logs / "calibration" / "out.log").read_text())]
    step_time = statistics.median(times[1:] or times)  # the first window holds the loader's start-up
    startup = max(total - CALIBRATION_STEPS * step_time, 0.0)
    steps = math.floor((budget - startup) / step_time)
    print(f"open_clip_train {model} calibration: {CALIBRATION_STEPS} steps in {total:.1f}s, {step_time:.3f}s/step, "
          f"start-up {startup:.1f}s -> {steps} steps fit in {budget:.0f}s")
    return at_least_one_step(steps, f"open_clip_train {model}", budget)


def train_baseline(recipe, model: str, shards: list[str], steps: int, logs: Path) -> tuple[float, Path]:
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    wall = run_timed(SELF + baseline_argv(recipe, model, shards, steps, logs, "baseline"), logs / "baseline.log")
    checkpoint = logs / "baseline" / "checkpoints" / "epoch_1.pt"
    print(f"open_clip_train {model} seed {recipe.run.seed}: {steps} steps of batch {recipe.data.batch_size} "
          f"in {wall:.1f}s -> {checkpoint}")
    return wall, checkpoint


def export_baseline(model_name: str, checkpoint: Path, directory: Path) -> Path:
    import medclip

    encoder = medclip.load(model_name, checkpoint=checkpoint)
    return medclip.save(encoder, directory)

def headlines(eval_dir: Path) -> dict[str, dict[str, float]]:
    """{model: {dataset: headline}} from the result JSONs of one eval run."""
    from medclip.evaluation.report import read_results

    out: dict[str, dict[str, float]] = {}
    for r in read_results(eval_dir):
        if r["headline"] is not None:
            out.setdefault(r["model"], {})[r["dataset"]] = r["headline"]
    return out


if __name__ == "__main__":
    open_clip_train_main(sys.argv[1:])
