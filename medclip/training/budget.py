"""Training to a wall-clock budget (``run.budget_seconds``): how many steps fit, re-planned as the run goes.

The clock starts when ``Pretrainer.run`` starts (after set-up: model, data build), or with
``run.budget_from: process`` when the process started (Linux), and covers training, its checkpoints and
evaluations, and the final checkpoint and export; the final evaluation comes after it. Before every step the plan is made again from the time the recent steps took (the last ``WINDOW``,
so a machine that slows down is noticed within a few steps) and what is left:

    steps left = (budget - elapsed - final save - margin) / step time

The final save is reserved at 1.5x the last checkpoint write (before one, an estimate from the bytes to
write); the margin is ``MARGIN`` of the budget, for step times that vary. The lr schedule is built on the
planned total, so its decay ends at the last step whatever the plan became (``medclip.training.optim``).
The plan and the budget used so far are kept in each checkpoint: a resumed run continues with the plan
and the rest of the budget.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

from medclip.errors import MedclipError
from medclip.training.distributed import broadcast_from_main
from medclip.training.optim import replan_scheduler

log = logging.getLogger(__name__)

WINDOW = 20  # recent steps whose mean time predicts the next ones
MARGIN = 0.02  # of the budget, kept free for the step times' spread
SAVE_FACTOR = 1.5  # the final save (checkpoint + export) against the last checkpoint write
WRITE_BYTES_PER_S = 100e6  # before any checkpoint: assumed disk speed for the first estimate


def process_started() -> float | None:
    """``time.monotonic()`` at this process's start (Linux: from /proc), None where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command name
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def budget_clock_start(budget_from: str) -> float:
    if budget_from == "training":
        return time.monotonic()
    started = process_started()
    if started is None:
        raise MedclipError("run.budget_from: process needs the process's start time from /proc (Linux); "
                           "use run.budget_from: training")
    return started


@dataclass
class Budget:
    seconds: float
    used_before: float = 0.0  # by the run this one resumes
    save_seconds: float | None = None  # the last checkpoint write
    started: float = field(default_factory=time.monotonic)
    _ends: deque = field(default_factory=lambda: deque(maxlen=WINDOW + 1))

    def elapsed(self) -> float:
        return self.used_before + time.monotonic() - self.started

    def step_done(self) -> None:
        self._ends.append(time.monotonic())

    def step_seconds(self) -> float | None:
        """Mean time of the recent steps (the first step, with the loader's start, is not one of them)."""
        if len(self._ends) < 2:
            return None
        return (self._ends[-1] - self._ends[0]) / (len(self._ends) - 1)

    def reserve(self, save_bytes: int) -> float:
        """Seconds kept for the final checkpoint and export, and the margin."""
        save = self.save_seconds if self.save_seconds is not None else 1.0 + save_bytes / WRITE_BYTES_PER_S
        return SAVE_FACTOR * save + MARGIN * self.seconds

    def plan(self, step: int, planned: int, save_bytes: int) -> int:
        """Total steps to plan for, being at ``step`` (at least one more; the current plan while no step
        time has been measured)."""
        per_step = self.step_seconds()
        if per_step is None:
            return max(planned, step + 1)
        left = self.seconds - self.elapsed() - self.reserve(save_bytes)
        return step + max(1, math.floor(left / per_step))

    def report(self, steps: int) -> str:
        return budget_line(self.elapsed(), self.seconds, f"{steps} steps planned to fit and the final save")


def budget_line(used: float, total: float, by: str) -> str:
    """The budget's use as the log and the run summary state it."""
    return f"budget: {used:.1f} of {total:.0f} s used ({100 * used / total:.0f}%) by {by}"


class PlannedSteps:
    """The run's length, as :class:`medclip.training.trainer.Pretrainer` plans it (uses its recipe, scheduler,
    module and step): ``run.steps``, or with ``run.budget_seconds`` what fits in the budget."""

    _planned_steps: int | None = None  # None: run.steps
    budget: Budget | None = None  # run.budget_seconds' clock, from Pretrainer.run
    budget_used_before: float = 0.0  # of the budget, by the run a resumed one continues
    _save_bytes: int | None = None  # what the final save writes, counted once (not at every step)

    @property
    def planned_steps(self) -> int:
        return self._planned_steps or self.recipe.run.steps

    def set_planned_steps(self, total: int) -> None:
        self._planned_steps = total
        replan_scheduler(self.scheduler, self.recipe.optim, total)

    def _replan(self) -> None:
        """run.budget_seconds: the steps that fit in what is left of the budget (the same on every rank)."""
        if self._save_bytes is None:  # weights, Adam's two moments and the export: fixed for the run
            self._save_bytes = 4 * sum(p.numel() * p.element_size() for p in self.module.parameters())
        total = broadcast_from_main(self.budget.plan(self.step, self.planned_steps, self._save_bytes))
        if total != self.planned_steps:
            self.set_planned_steps(total)  # the run's log follows at the step's end (callbacks.MetricsLog)
