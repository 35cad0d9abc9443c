"""The pretraining loop: one object that trains its parts (model, heads and objective, optimiser and schedule,
data, checkpoint store) and tells its callbacks what happens.

``Pretrainer.from_recipe`` builds the parts from a recipe (``parts.py``) around the run's start
(``start.py``: device, lock, resume checks); ``Pretrainer(recipe, parts, callbacks, start=...)`` takes
parts built elsewhere. ``Pretrainer.run`` is the whole run: train to ``run.steps`` (checkpoints and
evaluation on their schedules), then the final checkpoint, the export, the final evaluation and the
report (curves and summary). Each of those is one method below; callbacks (``callbacks.py``: the run's
log is one) are called at the named points in between.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from medclip.data.images import normalize_batch
from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt
from medclip.training import preflight
from medclip.training.budget import Budget, PlannedSteps, budget_clock_start
from medclip.training.callbacks import Callback, CallbackList, MetricsLog
from medclip.training.components import (
    RandomState,
    batches_forever,
    build_data,
    evaluate,
    export_encoder,
    split_batch,
)
from medclip.training.config import Recipe
from medclip.training.distributed import all_reduce_mean, broadcast_from_main
from medclip.training.flops import TrainFlops, device_peak_tflops
from medclip.training.lora import merged_for_export
from medclip.training.monitor import read_log
from medclip.training.optim import Diverged, DivergenceGuard, grad_norm
from medclip.training.parts import (
    CheckpointWriter,
    TrainParts,
    autocast,
    build_checkpoint_store,
    build_ema,
    build_module,
    build_optimisation,
)
from medclip.training.plots import plot_curves, summary_text
from medclip.training.start import RunStart
from medclip.training.state import TrainerCheckpoints

log = logging.getLogger(__name__)


class EvaluationFailed(MedclipError):
    """An evaluation raised; the run's checkpoint and export are already written."""


class Pretrainer(TrainerCheckpoints, PlannedSteps):
    def __init__(self, recipe: Recipe, parts: TrainParts, callbacks: Iterable[Callback] = (), *, start: RunStart,
                 resumed: tuple[Path, dict] | None = None):
        """Train ``parts`` as ``recipe`` says, in the run ``start`` began and accepted (its lock is released when
        the run ends); ``resumed``: the checkpoint (path, contents) to continue from, checked by
        ``start.checked_resume``. ``callbacks`` are called after the run's log (``MetricsLog``), in order."""
        self.recipe, self.start = recipe, start
        self.env, self.device, self.lock, self.run_id = start.env, start.device, start.lock, start.run_id
        self.output_dir = recipe.output_dir
        self.model_cfg, self.module, self.wrapped = parts.model_cfg, parts.module, parts.wrapped
        self.model, self.heads = parts.module.model, parts.module.heads
        self.optimizer, self.scheduler, self.scaler = parts.optimizer, parts.scheduler, parts.scaler
        self.data, self.checkpoints = parts.data, parts.checkpoints
        self.flops, self.peak_tflops = parts.flops, parts.peak_tflops
        self.ema = parts.ema
        self.callbacks = CallbackList([MetricsLog(), *callbacks])
        self.step = 0
        self.guard = DivergenceGuard(recipe.run.max_nonfinite_steps)
        if resumed is not None:
            self._restore(*resumed)

    @classmethod
    def from_recipe(cls, recipe: Recipe, resume: str | None = None, overwrite: bool = False, data=None,
                    callbacks: Iterable[Callback] = (), checkpoint_writer: CheckpointWriter | None = None):
        """Build the recipe's parts and the trainer, in the order that writes nothing before the run is accepted:
        device and checks, the output directory's lock, the model, the resume checks, then optimiser and data.

        ``data`` (tests): any iterable of batches with state_dict/load_state_dict/skip_counts, instead of the
        recipe's; ``checkpoint_writer``: writes each checkpoint file instead of ``checkpoint.save_atomic``.
        """
        start = RunStart.begin(recipe, resume, overwrite)
        try:
            model_cfg, module = build_module(recipe, start.device)
            resumed = start.checked_resume(resume, module)  # (path, checkpoint) or None; nothing is written before
            start.accept(overwrite)
            # MFU needs the device's peak; the FLOPs are counted on a copy taken before DDP/FSDP wrap the module.
            peak = device_peak_tflops(start.device)
            flops = TrainFlops(module, lambda: autocast(recipe, start.device)) if peak else None
            wrapped, optimizer, scheduler, scaler = build_optimisation(recipe, module, start.env, start.device)
            if data is None:
                data = build_data(recipe, module.model, model_cfg, start.env, recipe.output_dir, start.device)
                preflight.check_made_data(recipe)  # evaluation data the run writes itself (the demo set)
            parts = TrainParts(model_cfg, module, wrapped, optimizer, scheduler, scaler, data,
                               build_checkpoint_store(recipe, start.env, checkpoint_writer), flops, peak,
                               build_ema(recipe, module))
            if resume and resumed is None:
                log.info("no checkpoint to resume from in %s; starting from step 0", recipe.output_dir)
            if resumed is None:
                module.objective.init_parameters(module.model)  # objective.sigmoid_init, fresh runs only
            return cls(recipe, parts, callbacks, start=start, resumed=resumed)
        except BaseException:
            start.lock.release()
            raise

    def _autocast(self):
        return autocast(self.recipe, self.device)

    # ------------------------------------------------------------------ one optimisation step
    def train_step(self, batch: dict) -> dict:
        """Forward, backward and update for one global-batch step; returns detached loss terms."""
        losses = self.backward(batch)
        self.update(losses["total"])
        return losses

    def _device_batch(self, batch: dict) -> dict:
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        return normalize_batch(batch, self.data)  # uint8 images from the loader -> float, on the device

    def _phase_step(self) -> int:
        """The step as the forward sees it: only whether PC-Align is on yet depends on it, so two values
        suffice (a new Python int every step would make torch.compile recompile the module)."""
        start = self.recipe.objective.pc_start_step
        return start if self.step >= start else 0

    def backward(self, batch: dict) -> dict:
        """Gradients of one step's batch (accumulated over micro-batches when accum_steps > 1)."""
        batch = self._device_batch(batch)
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(batch, self.recipe.optim.accum_steps)
        if len(parts) == 1:
            step = self._phase_step()
            with self._autocast():
                features = self.wrapped(parts[0], step)
                losses = self.module.losses(features, step)
            self.scaler.scale(losses["total"]).backward()
        else:
            losses = self._accumulated_backward(parts)
        # Each rank's loss covers its own rows; their mean is the global batch's loss.
        return {k: all_reduce_mean(v.detach().float()) for k, v in losses.items()}

    def _accumulated_backward(self, parts: list[dict]) -> dict:
        """Contrastive batch kept whole: cache all features without grad, then re-forward each part.

        Part j's backward uses the live features of part j and the cached ones of the others; summed
        over j this is the full batch's gradient. The re-forward replays the RNG state of part j's
        cached forward, so dropout draws the same masks and the live features equal the cached ones
        (as GradCache does). Scale/bias parameters enter every part's loss, so they are live only in
        the last part (else their gradient would count k times): under DDP that is the part whose
        backward synchronises, which must reach every parameter. Every part's loss is the loss of the
        whole batch, so the first part's terms are the step's loss.
        """
        step = self._phase_step()
        states, cached = [], []
        with torch.no_grad(), self._autocast():
            for part in parts:
                states.append(RandomState(self.device))
                cached.append(self.wrapped(part, step))
        step_losses = None
        for j, part in enumerate(parts):
            last = j == len(parts) - 1
            sync = last or not hasattr(self.wrapped, "no_sync")
            with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), self._autocast():
                with states[j].replayed():
                    live = self.wrapped(part, step)
                features = self.module.merge_features(cached, j, live)
                losses = self.module.losses(features, step, live_scales=last)
                self.scaler.scale(losses["total"]).backward()
            if j == 0:
                step_losses = losses
        return step_losses

    def update(self, loss: torch.Tensor) -> bool:
        """Apply the step's gradients, unless the loss or the gradients are not finite (then skip and count).

        One host sync per step: the finiteness of the loss and of the global gradient norm. With fp16
        (`amp`), overflowing gradients under a finite loss are the grad scaler's business as usual (it
        skips the update and lowers the scale); they do not count towards divergence.
        """
        self.scaler.unscale_(self.optimizer)  # no-op without fp16; with it, true gradients for the norm
        norm = grad_norm(self.module.parameters(), self.recipe.optim.grad_clip)
        loss_finite, grads_finite = torch.stack([torch.isfinite(loss).all(), torch.isfinite(norm).all()]).tolist()
        applied = loss_finite and grads_finite
        if applied:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
            self.module.clamp_scales(self.recipe.optim.logit_scale_max)
            if self.ema is not None:
                self.ema.update()
        self.scaler.update()  # fp16: a step with non-finite gradients lowers the scale
        self.step += 1
        self.guard.record(self.step, applied or (self.scaler.is_enabled() and loss_finite))
        return applied

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        """Train to run.steps, write the final checkpoint and the export, evaluate, report.

        The export is written before the final evaluation; when that evaluation fails (or training
        diverges), curves and summary are still written and the run ends with one line saying why.
        However the run ends, the output directory's lock is released.
        """
        try:
            return self._run()
        finally:
            self.lock.release()

    def _run(self) -> dict:
        started = time.time()
        if self.recipe.run.budget_seconds:
            self.budget = Budget(self.recipe.run.budget_seconds, used_before=self.budget_used_before,
                                 started=budget_clock_start(self.recipe.run.budget_from))
        results, failure, export_dir = {}, None, None
        self.callbacks.call("on_run_start", self)
        try:
            self._train()
            self.save_checkpoint()
            self.checkpoints.finish()
            exported_ema = self.recipe.optim.ema_export
            encoder = self.snapshot_encoder(ema=exported_ema)
            export_dir = export_encoder(encoder, self.output_dir / "export") if self.env.is_main else None
            if self.budget is not None:
                log.info(self.budget.report(self.step))
            self.callbacks.call("on_train_end", self)
            results = self._evaluate(encoder, gathered=True, ema=exported_ema)
            if self.ema is not None and self.recipe.eval.suites:  # the other weights too: raw and EMA side by side
                del encoder
                results.update(self._evaluate(self.snapshot_encoder(ema=not exported_ema), gathered=True,
                                              ema=not exported_ema))
        except Diverged as exc:
            failure = exc
        except EvaluationFailed as exc:
            failure = EvaluationFailed(f"final evaluation failed: {exc}; the final checkpoint, the export, curves "
                                       f"and summary are in {self.output_dir}")
        finally:
            self.callbacks.call("on_run_end", self, results)
        self._write_report(time.time() - started, export_dir, failure)
        if failure is not None:
            raise failure
        return results

    def _train(self) -> None:
        """Steps until the planned total (run.steps, or what fits in run.budget_seconds). A batch is fetched only
        when a step will use it, so the stream's position after the last step (what the final checkpoint
        stores) is right after its batch."""
        batches = batches_forever(self.data)
        try:
            while self.step < self.planned_steps:
                if self.budget is not None:
                    self._replan()
                batch = next(batches)
                if self.flops is not None and self.flops.per_sample is None:
                    first = split_batch(self._device_batch(batch), self.recipe.optim.accum_steps)[0]
                    self.flops.count(first, self._phase_step())
                losses = self.train_step(batch)
                if self.budget is not None:
                    self.budget.step_done()
                self.callbacks.call("on_step_end", self, batch, losses)
                self._after_step()
        finally:
            batches.close()  # stop the loader's workers now, not when the generator is collected

    def _after_step(self) -> None:
        """The step's checkpoint bookkeeping, the divergence guard's verdict, and the scheduled checkpoint and
        evaluation."""
        run, step, guard, last = self.recipe.run, self.step, self.guard, self.planned_steps
        self.checkpoints.after_step(step, finite=guard.in_a_row == 0)
        if guard.diverged:
            raise Diverged(self._divergence_message())
        if step < last and step % run.checkpoint_every == 0:
            if guard.in_a_row:  # the weights have not moved since the last finite step
                log.warning("step %d: no checkpoint during non-finite steps (%d in a row)", step, guard.in_a_row)
            else:
                started = time.monotonic()
                self.save_checkpoint()
                if self.budget is not None:  # what the final save will take, roughly
                    self.budget.save_seconds = time.monotonic() - started
        every = self.recipe.eval.every_steps
        if step < last and every and step % every == 0:
            try:
                self._evaluate()
            except EvaluationFailed as exc:  # a failed evaluation must not cost the training run
                log.warning("evaluation at step %d failed: %s; training continues", step, exc)

    def _divergence_message(self) -> str:
        guard = self.guard
        good = self.checkpoints.diverged(guard.first_bad_step)
        good = broadcast_from_main(str(good) if good else None)
        where = (f"last good checkpoint: {good}; continue from it with a smaller optim.lr "
                 f"(--resume {good})" if good else "no checkpoint was written yet; start again with a smaller optim.lr")
        return (f"training diverged at step {self.step}: the loss or the gradients were not finite for "
                f"{guard.in_a_row} steps in a row (steps {guard.first_bad_step}-{self.step}, skipped without "
                f"updating the weights; run.max_nonfinite_steps={guard.patience}); {where}")

    def snapshot_encoder(self, ema: bool = False):
        """An Encoder with the current weights (``ema``: their EMA) on rank 0 (every rank takes part in gathering
        them), LoRA adapters merged into plain weights."""
        from medclip.models.loading import encoder_from_state

        name = f"{self.output_dir.name}@{self.step}" + ("-ema" if ema else "")
        # Built inside the swap: a plain module's state dict holds its weights themselves, not copies.
        with self.ema.applied_to() if ema else contextlib.nullcontext():
            model, heads, _ = self._state_dicts()
            if not self.env.is_main:
                return None
            with _rng_untouched():  # building the evaluation (and the merging) model draws random initial weights
                model = merged_for_export(self.model_cfg, model, self.recipe.model.lora)  # plain keys for open_clip
                return encoder_from_state(self.model_cfg, model, self.heads.config.to_dict() if heads else None,
                                          heads, device=self.device, name=name)

    def _evaluate(self, encoder=None, gathered: bool = False, ema: bool = False) -> dict:
        """The recipe's suites on rank 0; a failure there is raised on every rank as EvaluationFailed.

        ``gathered``: every rank already took part in ``snapshot_encoder`` (whose result is None off rank 0);
        gathering again on the other ranks alone would leave them in a collective rank 0 never joins (FSDP2).
        ``ema``: the encoder holds the EMA weights; its results are named ``ema/...`` (in eval/step_N-ema).
        """
        if not self.recipe.eval.suites:
            return {}
        if not gathered:
            encoder = self.snapshot_encoder()
        results, error = {}, None
        if self.env.is_main:
            try:
                with _rng_untouched():
                    results = evaluate(encoder, self.recipe, self.output_dir, self.step, tag="ema" if ema else "")
            except Exception as exc:  # noqa: BLE001 - reported in one line; the run's outputs stay
                error = str(exc) if isinstance(exc, MedclipError) else f"{type(exc).__name__}: {exc}"
        error = broadcast_from_main(error)
        self.callbacks.call("on_evaluate", self, results, error)
        if error:
            raise EvaluationFailed(error)
        return results

    def _write_report(self, wall_seconds: float, export_dir: Path | None, failure: Exception | None) -> None:
        if not self.env.is_main:
            return
        records = read_log(self.output_dir / "log.jsonl")  # what MetricsLog wrote
        plot_curves(records, self.output_dir / "curves.png")
        objective = self.recipe.objective
        two_stages = self.heads is not None and objective.pc_start_step > 0  # heads exist only with pc_weight > 0
        summary = summary_text(records, wall_seconds, self.data.skip_counts(),
                               pc_start_step=objective.pc_start_step if two_stages else None)
        if self.guard.skipped:
            summary += f"non-finite steps skipped: {self.guard.skipped}\n"
        if self.ema is not None:
            evaluated = " (ema/ lines: the EMA's results)" if self.recipe.eval.suites else ""
            summary += (f"EMA of the weights: decay {self.ema.decay}, {self.ema.updates} updates; the export holds the "
                        f"{'EMA' if self.recipe.optim.ema_export else 'raw'} weights{evaluated}\n")
        if failure is not None:
            summary += f"{failure}\n"
        (self.output_dir / "summary.txt").write_text(summary)
        print(summary, end="")
        if export_dir is not None:
            print(f"exported open_clip hub-format model: {export_dir}")


@contextlib.contextmanager
def _rng_untouched():
    """Work that draws random numbers (evaluation, building a model) leaves training's RNG states as they were."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


def pretrain(recipe: Recipe, resume: str | None = None, overwrite: bool = False, callbacks: Iterable[Callback] = (),
             checkpoint_writer: CheckpointWriter | None = None) -> dict:
    return Pretrainer.from_recipe(recipe, resume, overwrite, callbacks=callbacks,
                                  checkpoint_writer=checkpoint_writer).run()
