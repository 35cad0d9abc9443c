"""What observes a run: callbacks the trainer calls at named points, and the run's log as one of them.

A callback subclasses :class:`Callback` and overrides the points it needs; every rank calls every
callback (a callback that writes files checks ``trainer.env.is_main`` itself). The points, in a run's order:

* ``on_run_start(trainer)``: training is about to start (after set-up and any resume);
* ``on_step_end(trainer, batch, losses)``: a step was applied (``trainer.step`` counts it); ``batch`` is
  the rank's batch as the loader gave it (with its sample ``keys``), ``losses`` the step's detached terms;
* ``before_checkpoint(trainer, path)`` / ``after_checkpoint(trainer, path)``: around each checkpoint write;
* ``on_evaluate(trainer, results, error)``: an evaluation finished (``error``: its one line when it failed);
* ``on_train_end(trainer)``: the steps, the final checkpoint and the export are done;
* ``on_run_end(trainer, results)``: the run is over (also after a failure; ``results`` may be empty).

``MetricsLog`` (log.jsonl, progress, TensorBoard, W&B) is the callback every ``Pretrainer`` starts with.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from medclip.training.monitor import Monitor, Throughput


class Callback:
    """A no-op at every point: override the ones you need."""

    def on_run_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, batch: dict, losses: dict) -> None:
        pass

    def before_checkpoint(self, trainer, path: Path) -> None:
        pass

    def after_checkpoint(self, trainer, path: Path) -> None:
        pass

    def on_evaluate(self, trainer, results: dict, error: str | None = None) -> None:
        pass

    def on_train_end(self, trainer) -> None:
        pass

    def on_run_end(self, trainer, results: dict) -> None:
        pass


class CallbackList:
    """The run's callbacks, called in order at each point."""

    def __init__(self, callbacks: Iterable[Callback]):
        self.callbacks = list(callbacks)

    def call(self, point: str, trainer, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, point)(trainer, *args)


class MetricsLog(Callback):
    """The run's log: losses, lr, logit scale, throughput, MFU and peak memory so far every ``run.log_every``
    steps (and at the last step, and when training diverges; the first record also counts the trainable and
    all parameters), evaluation results, the budget (see ``monitor.Monitor``)."""

    monitor: Monitor | None = None

    def on_run_start(self, trainer) -> None:
        run = trainer.recipe.run
        self.monitor = Monitor(trainer.output_dir, trainer.planned_steps, trainer.step, trainer.env.is_main,
                               progress=run.progress, tensorboard=run.tensorboard, wandb=run.wandb,
                               wandb_project=run.wandb_project, config=trainer.recipe.to_dict(),
                               run_id=trainer.run_id)
        self.throughput = Throughput(trainer.recipe.data.batch_size * trainer.env.world_size)
        trainable, total = parameter_counts(trainer.module)
        self.sizes = {"trainable_params": trainable, "total_params": total}  # in the first step record logged

    def on_step_end(self, trainer, batch: dict, losses: dict) -> None:
        if self.monitor.total_steps != trainer.planned_steps:  # run.budget_seconds re-planned the run
            self.monitor.set_total(trainer.planned_steps)
        self.throughput.add_step()
        self.monitor.advance()
        step = trainer.step
        if step % trainer.recipe.run.log_every == 0 or step == trainer.planned_steps or trainer.guard.diverged:
            sizes, self.sizes = self.sizes, {}
            self.monitor.log(step, {**step_metrics(trainer, losses, self.throughput), **sizes,
                                    **peak_memory(trainer.device)})

    def on_evaluate(self, trainer, results: dict, error: str | None = None) -> None:
        if error:
            self.monitor.log(trainer.step, {"eval_error": error})
        elif results:
            self.monitor.log(trainer.step, {f"eval/{k}": v for k, v in results.items()})

    def on_train_end(self, trainer) -> None:
        if trainer.budget is not None:
            self.monitor.log(trainer.step, {"budget_s": trainer.budget.seconds,
                                            "budget_used_s": trainer.budget.elapsed()})

    def on_run_end(self, trainer, results: dict) -> None:
        if self.monitor is not None:
            self.monitor.close()


def step_metrics(trainer, losses: dict, throughput: Throughput) -> dict:
    samples_per_s, interval_s = throughput.rate_and_reset()
    metrics = {"loss": losses["total"], **{k: v for k, v in losses.items() if k != "total"},
               "lr": trainer.optimizer.param_groups[0]["lr"],
               "logit_scale": full_value(trainer.module.model.logit_scale).exp().item(),
               "samples_per_s": samples_per_s, "interval_s": interval_s, "nonfinite_steps": trainer.guard.skipped,
               **{f"skipped/{k}": v for k, v in trainer.data.skip_counts().items()}}
    if trainer.flops is not None:
        tflops = trainer.flops.per_sample * samples_per_s / trainer.env.world_size / 1e12
        metrics.update(tflops_per_device=tflops, mfu=tflops / trainer.peak_tflops)
    return metrics


def parameter_counts(module: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters of the trained module (model and PC-Align heads)."""
    params = list(module.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def peak_memory(device: torch.device) -> dict:
    """The run's peak memory so far in MiB, under a key that says what was measured: the CUDA allocator's peak on a
    GPU; on a CPU the peak resident set of this process (its loader workers are processes of their own)."""
    if device.type == "cuda":
        return {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    import resource

    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: kilobytes


def full_value(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value; under FSDP2 its shards are gathered (a collective: every rank calls it)."""
    value = param.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value
