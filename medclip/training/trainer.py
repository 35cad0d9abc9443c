"""The pretraining loop: one object that owns model, heads, optimiser, data stream and feedback.

``Pretrainer.run`` is the whole run: train to ``run.steps`` (logging, checkpoints and evaluation on
their schedules), then the final checkpoint, the export, the final evaluation and the report (curves
and summary). Each of those is one method below.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from medclip.concepts.tokens import pad_token_id
from medclip.data.images import normalize_batch
from medclip.errors import MedclipError
from medclip.models import towers
from medclip.models.encoder import AMP_DTYPES
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig
from medclip.models.loading import (
    build_model,
    build_tokenizer,
    extract_state_dict,
    load_weights,
    read_weights_file,
    resolve_config,
    with_text_dir,
)
from medclip.training import checkpoint as ckpt
from medclip.training import preflight
from medclip.training.attention import set_attention_backend
from medclip.training.budget import Budget, PlannedSteps, budget_clock_start
from medclip.training.components import (
    RandomState,
    TrainModule,
    batches_forever,
    build_data,
    evaluate,
    export_encoder,
    split_batch,
)
from medclip.training.config import Recipe
from medclip.training.distributed import (
    all_reduce_mean,
    broadcast_from_main,
    detect_env,
    init_distributed,
    pick_device,
    wrap_model,
)
from medclip.training.flops import TrainFlops, device_peak_tflops
from medclip.training.monitor import Monitor, Throughput, read_log
from medclip.training.optim import (
    Diverged,
    DivergenceGuard,
    apply_freezing,
    build_optimizer,
    build_scheduler,
    grad_norm,
)
from medclip.training.plots import plot_curves, summary_text
from medclip.training.state import TrainerCheckpoints

log = logging.getLogger(__name__)

# Precisions that store the weights in low precision; the others keep fp32 weights (and may autocast).
LOW_PRECISION_WEIGHTS = ("bf16", "pure_bf16", "fp16", "pure_fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class EvaluationFailed(MedclipError):
    """An evaluation raised; the run's checkpoint and export are already written."""


class Pretrainer(TrainerCheckpoints, PlannedSteps):
    def __init__(self, recipe: Recipe, resume: str | None = None, data=None, overwrite: bool = False):
        self.recipe = recipe
        self.env = detect_env()
        self.device = pick_device(recipe.run.device, self.env)
        init_distributed(self.env, self.device)
        preflight.check(recipe, is_main=self.env.is_main)  # names, data, packages, disk: before anything is built
        if resume and overwrite:
            raise MedclipError("--overwrite starts a new run and --resume continues one: choose one of them")
        if recipe.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(recipe.run.seed)  # same init on every rank; DDP also broadcasts it
        self.output_dir = recipe.output_dir
        self.lock = self._claim_output_dir(fresh=not resume, overwrite=overwrite)
        try:
            self._build(resume, data, overwrite)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, resume: str | None, data, overwrite: bool) -> None:
        recipe = self.recipe
        self.model_cfg, self.model = self._build_model()
        self.heads = self._build_heads() if recipe.objective.pc_weight > 0 else None
        name_pad = pad_token_id(build_tokenizer(self.model_cfg)) if recipe.objective.use_concept_names else None
        self.module = TrainModule(self.model, self.heads, recipe.objective, name_pad).to(self.device)
        resumed = self._checked_resume(resume)  # (path, checkpoint) or None; nothing is written before this
        self._accept_run(overwrite)
        # MFU needs the device's peak; the FLOPs are counted on a copy taken before DDP/FSDP wrap the module.
        self.peak_tflops = device_peak_tflops(self.device)
        self.flops = TrainFlops(self.module, self._autocast) if self.peak_tflops else None
        self.wrapped = wrap_model(self.module, recipe.run.strategy, self.env, self.device,
                                  find_unused=recipe.objective.pc_start_step > 0 and self.heads is not None)
        sharded = recipe.run.strategy == "fsdp" and self.env.distributed
        self.optimizer = build_optimizer(self.module.named_parameters(), recipe.optim, fused=not sharded)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, recipe.run.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.model.precision == "amp")
        if recipe.model.compile:
            self.wrapped = torch.compile(self.wrapped)

        self.step = 0
        self.guard = DivergenceGuard(recipe.run.max_nonfinite_steps)
        self.checkpoints = ckpt.CheckpointKeeper(self.output_dir, recipe.run.keep_checkpoints, self.env.is_main)
        # `data` may be injected (tests): any iterable of batches with state_dict/load_state_dict/skip_counts.
        self.data = data if data is not None else build_data(recipe, self.model, self.model_cfg, self.env,
                                                             self.output_dir)
        if data is None:
            preflight.check_made_data(recipe)  # evaluation data the run writes itself (the demo set)
        if resumed is not None:
            self._restore(*resumed)
        else:
            if resume:
                log.info("no checkpoint to resume from in %s; starting from step 0", self.output_dir)
            self.module.objective.init_parameters(self.model)  # objective.sigmoid_init, fresh runs only

    # ------------------------------------------------------------------ setup
    def _build_model(self):
        mc = self.recipe.model
        cfg = with_text_dir(resolve_config(mc.name), mc.hf_text_dir)
        if self.recipe.objective.it_kind == "sigmoid" and "init_logit_bias" not in cfg:
            cfg["init_logit_bias"] = -10.0  # sigmoid IT-Align needs the model's own logit_bias
        precision = mc.precision if mc.precision in LOW_PRECISION_WEIGHTS else "fp32"
        model = build_model(cfg, self.device, precision)
        if mc.checkpoint:
            obj = read_weights_file(mc.checkpoint)
            load_weights(model, extract_state_dict(obj), allow_mismatch="logit_bias" in cfg,
                         source=mc.checkpoint)
        set_attention_backend(model, mc.attention)
        if mc.grad_checkpointing:
            towers.set_grad_checkpointing(model)  # HF towers through transformers' current API
        apply_freezing(model, mc)
        return cfg, model.train()

    def _build_heads(self) -> ConceptHeads:
        config = ConceptHeadsConfig(image_width=towers.image_width(self.model), text_width=towers.text_width(self.model),
                                    embed_dim=int(self.model_cfg["embed_dim"]),
                                    **self.recipe.objective.heads_options())
        return ConceptHeads(config).to(self.device).train()

    def _autocast(self):
        dtype = AMP_DTYPES.get(self.recipe.model.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

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
        monitor = self._open_monitor()
        results, failure, export_dir = {}, None, None
        try:
            self._train(monitor)
            self.save_checkpoint()
            self.checkpoints.finish()
            encoder = self.snapshot_encoder()
            export_dir = export_encoder(encoder, self.output_dir / "export") if self.env.is_main else None
            self._log_budget(monitor)
            results = self._evaluate(monitor, encoder, gathered=True)
        except Diverged as exc:
            failure = exc
        except EvaluationFailed as exc:
            failure = EvaluationFailed(f"final evaluation failed: {exc}; the final checkpoint, the export, curves "
                                       f"and summary are in {self.output_dir}")
        finally:
            monitor.close()
        self._write_report(monitor, time.time() - started, export_dir, failure)
        if failure is not None:
            raise failure
        return results

    def _open_monitor(self) -> Monitor:
        run = self.recipe.run
        return Monitor(self.output_dir, self.planned_steps, self.step, self.env.is_main, progress=run.progress,
                       tensorboard=run.tensorboard, wandb=run.wandb, wandb_project=run.wandb_project,
                       config=self.recipe.to_dict(), run_id=self.run_id)

    def _train(self, monitor: Monitor) -> None:
        """Steps until the planned total (run.steps, or what fits in run.budget_seconds). A batch is fetched only
        when a step will use it, so the stream's position after the last step (what the final checkpoint
        stores) is right after its batch."""
        batches = batches_forever(self.data)
        throughput = Throughput(self.recipe.data.batch_size * self.env.world_size)
        try:
            while self.step < self.planned_steps:
                if self.budget is not None:
                    self._replan(monitor)
                batch = next(batches)
                if self.flops is not None and self.flops.per_sample is None:
                    first = split_batch(self._device_batch(batch), self.recipe.optim.accum_steps)[0]
                    self.flops.count(first, self._phase_step())
                losses = self.train_step(batch)
                if self.budget is not None:
                    self.budget.step_done()
                throughput.add_step()
                monitor.advance()
                self._after_step(monitor, losses, throughput)
        finally:
            batches.close()  # stop the loader's workers now, not when the generator is collected

    def _after_step(self, monitor: Monitor, losses: dict, throughput: Throughput) -> None:
        run, step, guard, last = self.recipe.run, self.step, self.guard, self.planned_steps
        if step % run.log_every == 0 or step == last or guard.diverged:
            monitor.log(step, self._step_metrics(losses, throughput))
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
                self._evaluate(monitor)
            except EvaluationFailed as exc:  # a failed evaluation must not cost the training run
                log.warning("evaluation at step %d failed: %s; training continues", step, exc)
                monitor.log(step, {"eval_error": str(exc)})

    def _step_metrics(self, losses: dict, throughput: Throughput) -> dict:
        samples_per_s, interval_s = throughput.rate_and_reset()
        metrics = {"loss": losses["total"], **{k: v for k, v in losses.items() if k != "total"},
                   "lr": self.optimizer.param_groups[0]["lr"],
                   "logit_scale": _full(self.module.model.logit_scale).exp().item(),
                   "samples_per_s": samples_per_s, "interval_s": interval_s, "nonfinite_steps": self.guard.skipped,
                   **{f"skipped/{k}": v for k, v in self.data.skip_counts().items()}}
        if self.flops is not None:
            tflops = self.flops.per_sample * samples_per_s / self.env.world_size / 1e12
            metrics.update(tflops_per_device=tflops, mfu=tflops / self.peak_tflops)
        return metrics

    def _divergence_message(self) -> str:
        guard = self.guard
        good = self.checkpoints.diverged(guard.first_bad_step)
        good = broadcast_from_main(str(good) if good else None)
        where = (f"last good checkpoint: {good}; continue from it with a smaller optim.lr "
                 f"(--resume {good})" if good else "no checkpoint was written yet; start again with a smaller optim.lr")
        return (f"training diverged at step {self.step}: the loss or the gradients were not finite for "
                f"{guard.in_a_row} steps in a row (steps {guard.first_bad_step}-{self.step}, skipped without "
                f"updating the weights; run.max_nonfinite_steps={guard.patience}); {where}")

    def snapshot_encoder(self):
        """An Encoder with the current weights on rank 0 (every rank takes part in gathering them)."""
        model, heads, _ = self._state_dicts()
        if not self.env.is_main:
            return None
        from medclip.models.loading import encoder_from_state

        with _rng_untouched():  # building the evaluation model draws random initial weights
            return encoder_from_state(self.model_cfg, model, self.heads.config.to_dict() if heads else None, heads,
                                      device=self.device, name=f"{self.output_dir.name}@{self.step}")

    def _evaluate(self, monitor: Monitor, encoder=None, gathered: bool = False) -> dict:
        """The recipe's suites on rank 0; a failure there is raised on every rank as EvaluationFailed.

        ``gathered``: every rank already took part in ``snapshot_encoder`` (whose result is None off rank 0);
        gathering again on the other ranks alone would leave them in a collective rank 0 never joins (FSDP2).
        """
        if not self.recipe.eval.suites:
            return {}
        if not gathered:
            encoder = self.snapshot_encoder()
        results, error = {}, None
        if self.env.is_main:
            try:
                with _rng_untouched():
                    results = evaluate(encoder, self.recipe, self.output_dir, self.step)
            except Exception as exc:  # noqa: BLE001 - reported in one line; the run's outputs stay
                error = str(exc) if isinstance(exc, MedclipError) else f"{type(exc).__name__}: {exc}"
        error = broadcast_from_main(error)
        if error:
            raise EvaluationFailed(error)
        if results:
            monitor.log(self.step, {f"eval/{k}": v for k, v in results.items()})
        return results

    def _write_report(self, monitor: Monitor, wall_seconds: float, export_dir: Path | None,
                      failure: Exception | None) -> None:
        if not self.env.is_main:
            return
        records = read_log(monitor.jsonl_path)
        plot_curves(records, self.output_dir / "curves.png")
        objective = self.recipe.objective
        two_stages = self.heads is not None and objective.pc_weight > 0 and objective.pc_start_step > 0
        summary = summary_text(records, wall_seconds, self.data.skip_counts(),
                               pc_start_step=objective.pc_start_step if two_stages else None)
        if self.guard.skipped:
            summary += f"non-finite steps skipped: {self.guard.skipped}\n"
        if failure is not None:
            summary += f"{failure}\n"
        (self.output_dir / "summary.txt").write_text(summary)
        print(summary, end="")
        if export_dir is not None:
            print(f"exported open_clip hub-format model: {export_dir}")


def _full(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value; under FSDP2 its shards are gathered (a collective: every rank calls it)."""
    value = param.detach()
    return value.full_tensor() if hasattr(value, "full_tensor") else value


@contextlib.contextmanager
def _rng_untouched():
    """Work that draws random numbers (evaluation, building a model) leaves training's RNG states as they were."""
    state = ckpt.rng_state()
    try:
        yield
    finally:
        ckpt.set_rng_state(state)


def pretrain(recipe: Recipe, resume: str | None = None, overwrite: bool = False) -> dict:
    return Pretrainer(recipe, resume, overwrite=overwrite).run()
