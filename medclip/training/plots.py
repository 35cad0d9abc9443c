"""End-of-run PNG (loss terms and evaluation metrics over steps) and a short text summary."""

from __future__ import annotations

from pathlib import Path

from medclip._deps import require

matplotlib = require("matplotlib", "plotting training curves")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "it", "pc")


def plot_curves(records: list[dict], out_path: Path) -> Path | None:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if not train:
        return None
    metric_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and isinstance(r[k], (int, float))})
    fig, axes = plt.subplots(1, 2 if metric_keys else 1, figsize=(11 if metric_keys else 6, 4), squeeze=False)
    ax = axes[0][0]
    for key in LOSS_KEYS:
        points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), (int, float))]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.legend()
    if metric_keys:
        ax = axes[0][1]
        for key in metric_keys:
            points = [(r["step"], r[key]) for r in evals if isinstance(r.get(key), (int, float))]
            ax.plot(*zip(*points), marker="o", label=key[len("eval/"):])
        ax.set_xlabel("step")
        ax.set_title("evaluation")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def summary_text(records: list[dict], wall_seconds: float, skipped: dict) -> str:
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    lines = [f"steps: {train[-1]['step'] if train else 0}, wall time: {wall_seconds / 60:.1f} min"]
    if train:
        first, last = train[0], train[-1]
        lines.append(f"loss: {_number(first['loss'])} -> {_number(last['loss'])}")
        if "samples_per_s" in last:
            lines.append(f"throughput: {last['samples_per_s']:.1f} samples/s")
    if evals:
        for key, value in evals[-1].items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                lines.append(f"{key[len('eval/'):]}: {value:.4f}")
    lines.append("skipped samples: " + (", ".join(f"{k}={v}" for k, v in skipped.items() if v) or "none"))
    return "\n".join(lines) + "\n"


def _number(value) -> str:
    """A logged number; non-finite ones are logged as the strings 'nan' / 'inf' (JSON has no NaN)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
