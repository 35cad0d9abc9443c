"""End-of-run PNG (loss terms and evaluation metrics over steps) and a short text summary."""

from __future__ import annotations

from pathlib import Path

from medclip._deps import require
from medclip.training.budget import budget_line

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


# Skip counts that are not samples: a shard failure counts shards, a dropped concept span counts concepts.
SHARD_KINDS = ("truncated_tar", "unreadable_shard")
CONCEPT_KINDS = ("concept_dropped",)


def summary_text(records: list[dict], wall_seconds: float, skipped: dict, pc_start_step: int | None = None) -> str:
    """The run in a few lines: steps and wall time, the loss per term and stage, trainable parameters and
    peak memory, the run's mean throughput with the range of the logged intervals, the budget used (run.budget_seconds), evaluation results, and
    what was skipped (samples, shards and concepts counted apart).

    ``pc_start_step``: the objective has two stages, IT-Align alone through this step, then IT + PC-Align
    (their losses are not comparable across the boundary); None: one stage.
    """
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    lines = [f"steps: {train[-1]['step'] if train else 0}, wall time: {wall_seconds / 60:.1f} min"]
    lines += _loss_lines(train, pc_start_step)
    if (throughput := _throughput_line(train)) is not None:
        lines.append(throughput)
    lines += _size_lines(records)
    if budget := next((r for r in reversed(records) if "budget_s" in r), None):
        lines.append(budget_line(budget["budget_used_s"], budget["budget_s"],
                                 "training and the final save (run.budget_seconds)"))
    # The last step's evaluations: one record, or two with an EMA of the weights (raw, then ema/...).
    last = [r for r in evals if r["step"] == evals[-1]["step"]] if evals else []
    for record in last:
        for key, value in record.items():
            if key.startswith("eval/") and isinstance(value, (int, float)):
                lines.append(f"{key[len('eval/'):]}: {value:.4f}")
    lines += _skip_lines(skipped)
    return "\n".join(lines) + "\n"


def _size_lines(records: list[dict]) -> list[str]:
    """``trainable parameters: 384,000 of 27,584,833 (1.39%)`` and ``peak memory: 1435 MiB (peak RSS of ...)``."""
    lines = []
    if counts := next((r for r in records if "trainable_params" in r), None):
        trainable, total = counts["trainable_params"], counts["total_params"]
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")
    if peak := next((r for r in reversed(records) if "peak_rss_mib" in r or "peak_cuda_allocated_mib" in r), None):
        lines.append(f"peak memory: {peak['peak_cuda_allocated_mib']:.0f} MiB (CUDA max allocated)"
                     if "peak_cuda_allocated_mib" in peak else
                     f"peak memory: {peak['peak_rss_mib']:.0f} MiB (peak RSS of the rank-0 training process, CPU)")
    return lines


def _loss_lines(train: list[dict], pc_start_step: int | None) -> list[str]:
    """``loss, stage 1, IT-Align (steps 10-200): it 7.6029 -> 3.1000``: each term's first and last logged value."""
    if not train:
        return []
    if pc_start_step is None or not any(r["step"] > pc_start_step for r in train):
        stages = [("", train)]
    else:
        stages = [("IT-Align", [r for r in train if r["step"] <= pc_start_step]),
                  ("IT + PC-Align", [r for r in train if r["step"] > pc_start_step])]
        stages = [(f", stage {i}, {name}", rows) for i, (name, rows) in enumerate(stages, 1) if rows]
    lines = []
    for name, rows in stages:
        first, last = rows[0], rows[-1]
        pc_on = any(isinstance(r.get("pc"), str) or (isinstance(r.get("pc"), (int, float)) and r["pc"] != 0)
                    for r in rows)  # a string is a non-finite value
        terms = [k for k in (("loss", "it", "pc") if pc_on else ("it",)) if k in first and k in last] or ["loss"]
        changes = ", ".join(f"{'total' if k == 'loss' else k} {_number(first[k])} -> {_number(last[k])}"
                            for k in terms)
        lines.append(f"loss{name} (steps {first['step']}-{last['step']}): {changes}")
    return lines


def _throughput_line(train: list[dict]) -> str | None:
    """The run's mean (samples over seconds of every logged interval) and the slowest and fastest interval."""
    timed = [r for r in train if isinstance(r.get("samples_per_s"), (int, float))
             and isinstance(r.get("interval_s"), (int, float)) and r["interval_s"] > 0]
    if not timed:
        return None
    seconds = sum(r["interval_s"] for r in timed)
    mean = sum(r["samples_per_s"] * r["interval_s"] for r in timed) / seconds
    rates = [r["samples_per_s"] for r in timed]
    return (f"throughput: {mean:.1f} samples/s (mean of the run's training time; logged intervals "
            f"{min(rates):.1f}-{max(rates):.1f})")


def _skip_lines(skipped: dict) -> list[str]:
    def listed(kinds) -> str:
        return ", ".join(f"{k}={v}" for k, v in kinds.items() if v) or "none"

    samples = {k: v for k, v in skipped.items() if k not in SHARD_KINDS + CONCEPT_KINDS}
    lines = [f"skipped samples: {listed(samples)}"]
    shards = {k: skipped[k] for k in SHARD_KINDS if skipped.get(k)}
    if shards:
        lines.append(f"skipped shards: {listed(shards)}")
    concepts = sum(skipped.get(k, 0) for k in CONCEPT_KINDS)
    if concepts:
        lines.append(f"concept spans dropped (truncated with their caption, or on no token): {concepts}")
    return lines


def _number(value) -> str:
    """A logged number; non-finite ones are logged as the strings 'nan' / 'inf' (JSON has no NaN)."""
    return f"{value:.4f}" if isinstance(value, (int, float)) else str(value)
