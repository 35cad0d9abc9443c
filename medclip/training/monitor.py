"""Run feedback from rank 0: progress, JSONL log, TensorBoard and (optional) wandb.

Progress is a tqdm bar on a terminal; written to a file or a CI log it is one plain line per
logged step (every ``run.log_every`` steps: step, loss terms, lr, samples/s, ETA), as open_clip
logs, instead of a bar redrawn with carriage returns. ``log.jsonl`` continues from the step a run
starts at: after a resume, the records past the checkpoint's step (written before the run was
killed) are dropped, so every step appears once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from medclip import jsonio

log = logging.getLogger(__name__)

# Terms shown on the bar / in each line, in this order (when the step logged them).
SHOWN = ("loss", "it", "pc", "lr", "samples_per_s", "mfu")


class Monitor:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 progress: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "medclip", config: dict | None = None, stream=None, run_id: str | None = None):
        self.enabled, self.run_id = enabled, run_id
        self.jsonl_path = output_dir / "log.jsonl"
        self.total_steps, self.start_step = total_steps, start_step
        self._stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._lines = False
        self._tb = None
        self._wandb = None
        self._started = time.monotonic()
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        truncate_log(self.jsonl_path, start_step)
        self._jsonl = open(self.jsonl_path, "a")
        if progress and _is_terminal(self._stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="pretrain",
                             file=self._stream)
        else:
            self._lines = progress
        if tensorboard:
            self._tb = _tensorboard_writer(output_dir / "tensorboard")
        if wandb:
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=wandb_project, dir=str(output_dir), config=config or {})
            except ImportError:
                log.warning("wandb was asked for but is not installed; skipping it")

    def set_total(self, total_steps: int) -> None:
        """A re-planned run length (``run.budget_seconds``): progress and ETA count towards it."""
        self.total_steps = total_steps
        if self._bar is not None:
            self._bar.total = total_steps
            self._bar.refresh()

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **({"run_id": self.run_id} if self.run_id else {}),
                  **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(jsonio.dumps(record) + "\n")
        self._jsonl.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        shown = {k: numbers[k] for k in SHOWN if k in numbers}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        elif self._lines and shown:
            print(self.progress_line(step, shown), file=self._stream, flush=True)
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def progress_line(self, step: int, shown: dict, now: float | None = None) -> str:
        """``step 20/400 (5%) | loss 5.4655 | it 3.2700 | pc 4.3900 | lr 3.67e-04 | 147.8 samples/s | ETA 3m12s``."""
        parts = [f"step {step}/{self.total_steps} ({100 * step / max(self.total_steps, 1):.0f}%)"]
        for key, value in shown.items():
            if key == "lr":
                parts.append(f"lr {value:.3e}")
            elif key == "samples_per_s":
                parts.append(f"{value:.1f} samples/s")
            elif key == "mfu":
                parts.append(f"MFU {100 * value:.1f}%")
            else:
                parts.append(f"{key} {value:.4f}")
        elapsed = (time.monotonic() if now is None else now) - self._started
        done = step - self.start_step
        if done > 0:
            parts.append(f"ETA {_duration(elapsed / done * (self.total_steps - step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()


class Throughput:
    """Samples per second since the last reading, and the seconds that reading covers."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.started, self.samples = time.time(), 0

    def add_step(self) -> None:
        self.samples += self.samples_per_step

    def rate_and_reset(self) -> tuple[float, float]:
        seconds = max(time.time() - self.started, 1e-9)
        rate = self.samples / seconds
        self.started, self.samples = time.time(), 0
        return rate, seconds


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _tensorboard_writer(folder: Path):
    """A SummaryWriter, or None (said once) when the tensorboard package is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("TensorBoard logging is off: the tensorboard package is not installed "
                 "(pip install 'medclip-torch[tensorboard]'; set run.tensorboard: false to silence this)")
        return None
    return SummaryWriter(str(folder))


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def truncate_log(path: Path, start_step: int) -> None:
    """Keep the records up to ``start_step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    kept = [r for r in read_log(path) if r.get("step", 0) <= start_step]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(jsonio.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: Path) -> list[dict]:
    """The records of a ``log.jsonl``; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
