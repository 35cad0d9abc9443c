"""Run feedback: progress bar, JSONL log, TensorBoard and (optional) wandb, all from rank 0."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tqdm import tqdm

log = logging.getLogger(__name__)


class Monitor:
    def __init__(self, output_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 progress: bool = True, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "medclip", config: dict | None = None):
        self.enabled = enabled
        self.jsonl_path = output_dir / "log.jsonl"
        self._bar = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.jsonl_path, "a")
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="pretrain")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; skipping TensorBoard logs")
        if wandb:
            try:
                import wandb as wandb_lib

                self._wandb = wandb_lib.init(project=wandb_project, dir=str(output_dir), config=config or {})
            except ImportError:
                log.warning("wandb was asked for but is not installed; skipping it")

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._bar is not None:
            shown = {k: numbers[k] for k in ("loss", "it", "pc", "lr", "samples_per_s", "mfu") if k in numbers}
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

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


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
