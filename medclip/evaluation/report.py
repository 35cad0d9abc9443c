"""Result files and reports: one JSON per (model, dataset), a Markdown + CSV summary table, PNG plots."""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

from medclip import jsonio
from medclip._deps import require
from medclip.errors import MedclipError

log = logging.getLogger(__name__)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/")).strip("_") or "model"


def write_result(record: dict, out_dir: Path | str) -> Path:
    path = Path(out_dir) / slug(record["model"]) / f"{slug(record['dataset'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(jsonio.dumps(record, indent=2))
    return path


def read_results(out_dir: Path | str) -> list[dict]:
    """Every result JSON under ``out_dir`` (all models run into it so far)."""
    records = []
    for path in sorted(Path(out_dir).glob("*/*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            log.warning("skipping unreadable result %s: %s", path, exc)
            continue
        if isinstance(rec, dict) and {"dataset", "model", "metrics"} <= set(rec):
            records.append(rec)
    return records


def summary_table(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header ``model, dataset [metric], ...`` and one row per model; each column names its metric."""
    datasets: dict[str, str] = {}
    for rec in records:
        datasets.setdefault(rec["dataset"], rec.get("headline_metric") or next(iter(rec["metrics"]), ""))
    models = sorted({rec["model"] for rec in records})
    values = {(rec["model"], rec["dataset"]): rec["metrics"].get(datasets[rec["dataset"]]) for rec in records}
    header = ["model"] + [f"{d} [{m}]" for d, m in datasets.items()]
    rows = []
    for model in models:
        row = [model]
        for d in datasets:
            v = values.get((model, d))
            row.append("" if v is None else f"{100 * v:.2f}" if "rank" not in datasets[d] else f"{v:.1f}")
        rows.append(row)
    return header, rows


def write_summary(out_dir: Path | str) -> tuple[Path, Path]:
    out = Path(out_dir)
    records = read_results(out)
    if not records:
        raise MedclipError(f"no result files under {out}")
    header, rows = summary_table(records)
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = "\nValues are percentages of each column's headline metric (named in brackets); ranks are raw.\n"
    md_path.write_text("\n".join(lines) + "\n" + note)
    return md_path, csv_path


def write_plots(out_dir: Path | str) -> list[Path]:
    """Per-dataset bar charts across models and a confusion matrix per (model, single-label dataset)."""
    matplotlib = require("matplotlib", "plotting (pass --no-plots to skip it)")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    records = read_results(out)
    written = []
    by_dataset: dict[str, list[dict]] = {}
    for rec in records:
        by_dataset.setdefault(rec["dataset"], []).append(rec)
    for dataset, recs in by_dataset.items():
        metric = recs[0].get("headline_metric") or next(iter(recs[0]["metrics"]))
        recs = sorted(recs, key=lambda r: r["model"])
        vals = [r["metrics"].get(metric) or 0.0 for r in recs]
        fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(recs) + 1.5), 3.2))
        ax.bar(range(len(recs)), vals, color="#4C72B0")
        ax.set_xticks(range(len(recs)), [r["model"][-24:] for r in recs], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(metric)
        ax.set_title(dataset, fontsize=10)
        if "rank" not in metric:
            ax.set_ylim(0, 1)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=7)
        fig.tight_layout()
        path = plots / f"bars_{slug(dataset)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
        for rec in recs:
            cm = rec.get("details", {}).get("confusion_matrix")
            if cm:
                written.append(_confusion_plot(plt, cm, rec.get("classnames") or [], rec, plots))
    return written


def _confusion_plot(plt, cm, names, rec, plots: Path) -> Path:
    n = len(cm)
    size = min(12.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    labels = [str(x)[:18] for x in names] if len(names) == n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), labels, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in cm) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i][j] > peak / 2 else "black")
    ax.set_title(f"{rec['dataset']} — {rec['model'][-30:]}", fontsize=9)
    fig.tight_layout()
    path = plots / f"confusion_{slug(rec['model'])}_{slug(rec['dataset'])}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
