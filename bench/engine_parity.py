"""Engine parity and ablation rows: medclip against open_clip_train on identical input, then medclip's own
choices switched on one at a time, each row over the same seeds and the same number of steps.

Every row trains ``medclip-small-resnet18`` (the ``shared_real`` recipe's model) for ``--steps`` steps of the
recipe's batch, lr, weight decay, Adam settings and warmup, fp32, one loader worker, and is evaluated by the
same ``medclip eval suite shared_real`` (MedPix dev, COVID-19 test). The rows (``ROWS``):

- ``open_clip_train``: the reference, open_clip_train's own ``main`` on the caption-pool shards (every image
  once per pass with a caption drawn uniformly from its radiologist and label-derived captions; see
  shared_real_vs_open_clip.py), its sample shuffle buffer of 5,000;
- ``parity``: medclip reading those same pool shards (a manifest over them), IT-Align only, shuffle buffer
  5,000: identical input and settings. It must equal the reference within the seeds' spread on every task;
  where it does not, that is a defect of the engine;
- ``own-shards``: medclip's own input, the recipe's shards with one caption drawn per visit from the pool,
  still IT-only with buffer 5,000;
- ``buffer-500``: and the recipe's shuffle buffer (500);
- ``shipped``: and PC-Align (the recipe's weight, its start step scaled to ``--steps``): the recipe as shipped;
- candidates, each the recipe plus one change, to compare with ``shipped``: ``long-captions`` (captions
  longer than the context cut to a window of whole sentences instead of truncated at the end);
  ``long-captions-concepts`` (the window drawn among those that keep the most concept spans);
  ``pool-positives`` (a caption is a positive of every image whose caption pool holds it, e.g. a label
  caption of every image with those labels, where open_clip makes it a negative).

A row/seed whose export exists is not trained again (the script can be stopped and re-run), and each model is
evaluated once into ``OUT/eval/ROW-sSEED``. Two tables: mean ± std over seeds per row and dataset (and
``medpix_dev_mean``, the mean of the MedPix dev headlines), with each row minus open_clip_train, then with each
row minus the row before it (what that choice costs or buys); ``=`` marks a difference within the spread (the
larger of the two rows' standard deviations).

    .venv/bin/python bench/engine_parity.py --steps 240 --seeds 0 1 2          # ~1.5 h on an idle 2-core CPU
    .venv/bin/python bench/engine_parity.py --rows open_clip_train parity --seeds 0   # parity alone, one seed
    .venv/bin/python bench/engine_parity.py --report                           # the table of what is trained
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _open_clip_baseline as ocb  # noqa: E402  (shards, caption pool, open_clip_train: one implementation)
import shared_real_vs_open_clip as srv  # noqa: E402  (the medclip runs of the shared_real bench)
from sweep_shared_real import DEV  # noqa: E402  (the MedPix dev datasets settings are chosen on)

REPO = ocb.REPO
OPEN_CLIP_SAMPLE_SHUFFLE = 5000  # open_clip_train.data's _SAMPLE_SHUFFLE_SIZE for webdataset training
IT_ONLY = ["objective.pc_weight=0"]


@dataclasses.dataclass(frozen=True)
class Row:
    data: str  # "pool": the caption-pool shards; "own": the recipe's shards with their caption pools
    overrides: tuple[str, ...] = ()  # recipe overrides of the medclip run (None engine: open_clip_train)
    engine: str = "medclip"
    changes: str | None = None  # the row this one changes (the second table's reference); None: the row before


ROWS = {
    "open_clip_train": Row("pool", engine="open_clip_train"),
    "parity": Row("pool", (*IT_ONLY, f"data.shuffle_buffer={OPEN_CLIP_SAMPLE_SHUFFLE}")),
    "own-shards": Row("own", (*IT_ONLY, f"data.shuffle_buffer={OPEN_CLIP_SAMPLE_SHUFFLE}")),
    "buffer-500": Row("own", IT_ONLY),
    "shipped": Row("own"),
    # Candidates beyond the recipe, each against "shipped":
    "long-captions": Row("own", ("data.long_captions=window",), changes="shipped"),
    "long-captions-concepts": Row("own", ("data.long_captions=concepts",), changes="shipped"),
    "pool-positives": Row("own", ("objective.it_positives=pool",), changes="shipped"),
}


def pool_manifest(pool_urls: list[str], images: int, path: Path) -> Path:
    """A medclip manifest over the pool shards open_clip_train reads (their ``.txt`` is the caption)."""
    path.write_text(yaml.safe_dump({
        "name": "caption-pool", "urls": pool_urls, "shards": len(pool_urls), "samples": images,
        "counts_exact": True, "caption_fields": ["txt"], "split": "train",
    }))
    return path


def scaled_pc_start(recipe, steps: int) -> str:
    """The recipe's PC-Align start at the same fraction of a ``steps``-long run."""
    start = round(recipe.objective.pc_start_step * steps / recipe.run.steps)
    return f"objective.pc_start_step={start}"


def medclip_overrides(row: Row, recipe, steps: int, manifest: Path | None) -> list[str]:
    extra = [*row.overrides]
    if row.data == "pool":
        extra += ["data.build=[]", f"data.sources=[{{manifest: {manifest}}}]"]
    if "objective.pc_weight=0" not in extra:
        extra.append(scaled_pc_start(recipe, steps))
    return extra


def train_row(name: str, row: Row, seed: int, args, recipe, shards_root: Path, pool: ocb.BaselineShards,
              out: Path) -> Path:
    """The export of one row and seed, trained unless it is there already."""
    run_dir = out / f"{name}-s{seed}"
    export = run_dir / "export"
    if (export / "open_clip_config.json").exists():
        return export
    samples = args.steps * recipe.data.batch_size
    pool_urls = pool.for_data("pool", samples) if row.data == "pool" else None
    start = time.perf_counter()
    if row.engine == "open_clip_train":
        seeded = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, seed=seed))
        _, checkpoint = ocb.train_baseline(seeded, recipe.model.name, pool_urls, args.steps, run_dir)
        ocb.export_baseline(recipe.model.name, checkpoint, export)
    else:
        manifest = pool_manifest(pool_urls, len(pool_urls) // len(pool.urls) * pool.images_per_pass,
                                 out / "caption-pool.yaml") if pool_urls else None
        bench_args = argparse.Namespace(recipe=args.recipe, overrides=args.overrides, budget=None)
        srv.fresh_run_dir(run_dir, shards_root)
        cmd = srv.medclip_command(bench_args, run_dir, seed, args.steps,
                                  medclip_overrides(row, recipe, args.steps, manifest))
        ocb.run_timed(cmd, out / f"{name}-s{seed}.log")
    print(f"{name} seed {seed}: {args.steps} steps in {time.perf_counter() - start:.0f}s -> {export}", flush=True)
    return export


def evaluate(export: Path, eval_dir: Path) -> dict[str, float]:
    """Headline per dataset of ``export`` on the shared_real suite (evaluated once, then read back)."""
    if not any(eval_dir.glob("*/*.json")):
        eval_dir.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(ocb.BIN / "medclip"), "eval", "suite", "shared_real", "--model", str(export), "--out",
               str(eval_dir), "--no-plots", "--no-progress", "--workers", "1"]
        ocb.run_timed(cmd, eval_dir.with_suffix(".log"))
    return ocb.headlines(eval_dir).get(str(export), {})


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def with_dev_mean(headlines: dict[str, float]) -> dict[str, float]:
    """A seed's headlines and ``medpix_dev_mean``, the mean of the MedPix dev ones (the sweep's objective)."""
    if all(d in headlines for d in DEV):
        return {**headlines, "medpix_dev_mean": statistics.fmean(headlines[d] for d in DEV)}
    return headlines


def _difference(mean: float, std: float, other: tuple[float, float]) -> str:
    diff = mean - other[0]
    return f" ({100 * diff:+.1f}{' =' if abs(diff) <= max(std, other[1]) else ''})"


def table(results: dict[str, dict[int, dict[str, float]]], reference: str | None = "open_clip_train") -> list[str]:
    """Markdown rows: dataset x row, mean ± std over seeds (x100), and in brackets the row minus ``reference``
    (None: minus the row it changes, ``Row.changes``, or else the row before it), ``=`` where that is within the
    larger of the two standard deviations."""
    rows = [name for name in results if results[name]]
    if not rows:
        return ["(no row has a finished, evaluated seed yet)"]
    datasets = sorted(set.intersection(*(set(h) for name in rows for h in results[name].values())))
    lines = ["| dataset | " + " | ".join(f"{name} (seeds {len(results[name])})" for name in rows) + " |",
             "|---" * (len(rows) + 1) + "|"]
    for dataset in datasets:
        stats = {name: mean_std([h[dataset] for h in results[name].values()]) for name in rows}
        cells = []
        for i, name in enumerate(rows):
            changed = ROWS[name].changes if name in ROWS else None
            against = reference if reference is not None else changed or (rows[i - 1] if i else None)
            cell = f"{100 * stats[name][0]:.1f} ± {100 * stats[name][1]:.1f}"
            if against in stats and against != name:
                cell += _difference(*stats[name], stats[against])
            cells.append(cell)
        lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain/shared_real.yaml")
    parser.add_argument("--steps", type=int, default=240, help="training steps of every row")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for every medclip row (repeatable)")
    parser.add_argument("--out", default="runs/engine_parity")
    parser.add_argument("--report", action="store_true", help="train nothing: the table of the finished rows")
    args = parser.parse_args(argv)
    from medclip.training.config import load_recipe

    recipe = load_recipe(REPO / args.recipe, args.overrides)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    shards_root = out / "shards"
    pool = None
    if not args.report:
        manifests = ocb.build_shards(recipe, shards_root)
        pool = ocb.BaselineShards(ocb.shard_urls(manifests), out / "caption_pool")
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in args.rows}
    for seed in args.seeds:
        for name in args.rows:
            export = out / f"{name}-s{seed}" / "export"
            if not args.report:
                export = train_row(name, ROWS[name], seed, args, recipe, shards_root, pool, out)
            if (export / "open_clip_config.json").exists():
                results[name][seed] = with_dev_mean(evaluate(export, out / "eval" / f"{name}-s{seed}"))
    lines = ["Each row against open_clip_train:", "", *table(results), "",
             "Each row against the row before it, a candidate against shipped (what that choice costs or buys):", "", *table(results, None)]
    print("\n".join(lines))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
