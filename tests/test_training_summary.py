"""The run summary tells the truth (issue 30, item 5): the run's mean throughput with the range of the logged
intervals (not the last interval's), the loss per term and objective stage, and concepts not counted as samples."""

from __future__ import annotations

import re

from engine_helpers import FixedStream, make_batch, recipe

from medclip.training.monitor import read_log
from medclip.training.trainer import Pretrainer


class SkippingStream(FixedStream):
    """Reports skips of samples, shards and concepts, as the real stream counts them."""

    def skip_counts(self) -> dict:
        return {"concept_dropped": 5, "missing_caption": 2, "truncated_tar": 1}


def test_summary_gives_the_runs_mean_throughput_and_the_loss_per_stage(tmp_path, capsys):
    steps = 4
    Pretrainer.from_recipe(recipe(tmp_path, f"run.steps={steps}", "run.log_every=1", "objective.pc_start_step=2"),
               data=SkippingStream(make_batch(8))).run()
    summary = (tmp_path / "summary.txt").read_text()
    assert summary in capsys.readouterr().out
    log = [r for r in read_log(tmp_path / "log.jsonl") if "loss" in r]

    # Throughput: samples over the seconds of all intervals, then the range of the intervals.
    mean = 8 * steps / sum(r["interval_s"] for r in log)
    rates = [r["samples_per_s"] for r in log]
    line = next(x for x in summary.splitlines() if x.startswith("throughput: "))
    shown = [float(v) for v in re.findall(r"\d+\.\d", line)]
    assert shown == [round(mean, 1), round(min(rates), 1), round(max(rates), 1)], (line, mean, rates)

    # Loss per stage: IT-Align alone through pc_start_step, then IT + PC; each term's first and last value.
    def fmt(v):
        return f"{v:.4f}"

    first, last = log[0], log[1]
    assert f"loss, stage 1, IT-Align (steps 1-2): it {fmt(first['it'])} -> {fmt(last['it'])}\n" in summary
    first, last = log[2], log[3]
    assert first["pc"] > 0 and log[1]["pc"] == 0
    assert (f"loss, stage 2, IT + PC-Align (steps 3-4): total {fmt(first['loss'])} -> {fmt(last['loss'])}, "
            f"it {fmt(first['it'])} -> {fmt(last['it'])}, pc {fmt(first['pc'])} -> {fmt(last['pc'])}\n") in summary

    # Skips: samples, shards and concepts each counted as what they are.
    assert "skipped samples: missing_caption=2\n" in summary
    assert "skipped shards: truncated_tar=1\n" in summary
    assert "concept spans dropped (truncated with their caption, or on no token): 5\n" in summary


def test_one_stage_objective_gives_one_loss_line(tmp_path):
    Pretrainer.from_recipe(recipe(tmp_path, "run.steps=2", "run.log_every=1", "objective.pc_start_step=0"),
               data=FixedStream(make_batch(8))).run()
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^loss \(steps 1-2\): total \S+ -> \S+, it \S+ -> \S+, pc \S+ -> \S+$", summary, re.M), summary
    assert "stage" not in summary
