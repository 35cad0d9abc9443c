"""The pretraining loop: one object that owns model, heads, optimiser, data stream and feedback."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml

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
from medclip.training.attention import set_attention_backend
from medclip.training.components import (
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
    barrier,
    detect_env,
    gather_objects,
    init_distributed,
    pick_device,
    wrap_model,
)
from medclip.training.flops import device_peak_tflops, train_flops_per_sample
from medclip.training.monitor import Monitor, read_log
from medclip.training.optim import apply_freezing, build_optimizer, build_scheduler
from medclip.training.plots import plot_curves, summary_text

log = logging.getLogger(__name__)

# Precisions that store the weights in low precision; the others keep fp32 weights (and may autocast).
LOW_PRECISION_WEIGHTS = ("bf16", "pure_bf16", "fp16", "pure_fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Pretrainer:
    def __init__(self, recipe: Recipe, resume: str | None = None, data=None):
        self.recipe = recipe
        self.env = detect_env()
        self.device = pick_device(recipe.run.device, self.env)
        init_distributed(self.env, self.device)
        if recipe.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(recipe.run.seed)  # same init on every rank; DDP also broadcasts it
        self.output_dir = recipe.output_dir
        if self.env.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))

        self.model_cfg, self.model = self._build_model()
        self.heads = self._build_heads() if recipe.objective.pc_weight > 0 else None
        name_pad = pad_token_id(build_tokenizer(self.model_cfg)) if recipe.objective.use_concept_names else None
        self.module = TrainModule(self.model, self.heads, recipe.objective, name_pad).to(self.device)
        self.wrapped = wrap_model(self.module, recipe.run.strategy, self.env, self.device,
                                  find_unused=recipe.objective.pc_start_step > 0 and self.heads is not None)
        sharded = recipe.run.strategy == "fsdp" and self.env.distributed
        self.optimizer = build_optimizer(self.module.named_parameters(), recipe.optim, fused=not sharded)
        self.scheduler = build_scheduler(self.optimizer, recipe.optim, recipe.run.steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=recipe.model.precision == "amp")
        if recipe.model.compile:
            self.wrapped = torch.compile(self.wrapped)

        self.step = 0
        # `data` may be injected (tests): any iterable of batches with state_dict/load_state_dict/skip_counts.
        self.data = data if data is not None else build_data(recipe, self.model, self.model_cfg, self.env,
                                                             self.output_dir)
        resume_path = ckpt.resolve_resume(resume, self.output_dir) if resume else None
        if resume_path is not None:
            self._restore(resume_path)
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
            model.set_grad_checkpointing(True)  # HF towers: their own gradient_checkpointing_enable
        apply_freezing(model, mc)
        return cfg, model.train()

    def _build_heads(self) -> ConceptHeads:
        config = ConceptHeadsConfig(image_width=towers.image_width(self.model), text_width=towers.text_width(self.model),
                                    embed_dim=int(self.model_cfg["embed_dim"]))
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
        self.update()
        return losses

    def backward(self, batch: dict) -> dict:
        """Gradients of one step's batch (accumulated over micro-batches when accum_steps > 1)."""
        batch = {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in batch.items()}
        batch = normalize_batch(batch, self.data)  # uint8 images from the loader -> float, on the device
        self.optimizer.zero_grad(set_to_none=True)
        parts = split_batch(batch, self.recipe.optim.accum_steps)
        if len(parts) == 1:
            with self._autocast():
                features = self.wrapped(parts[0], self.step)
                losses = self.module.losses(features, self.step)
            self.scaler.scale(losses["total"]).backward()
        else:
            losses = self._accumulated_backward(parts)
        # Each rank's loss covers its own rows; their mean is the global batch's loss.
        return {k: all_reduce_mean(v.detach().float()) for k, v in losses.items()}

    def update(self) -> None:
        if self.recipe.optim.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.recipe.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.module.clamp_scales(self.recipe.optim.logit_scale_max)
        self.step += 1

    def _accumulated_backward(self, parts: list[dict]) -> dict:
        """Contrastive batch kept whole: cache all features without grad, then re-forward each part.

        Part j's backward uses the live features of part j and the cached ones of the others; summed
        over j this is the full batch's gradient. Scale/bias parameters enter every part's loss, so
        they are live only in the first part (else their gradient would count k times).
        """
        with torch.no_grad(), self._autocast():
            cached = [self.wrapped(p, self.step) for p in parts]
        losses = None
        for j, part in enumerate(parts):
            sync = j == len(parts) - 1 or not hasattr(self.wrapped, "no_sync")
            with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), self._autocast():
                live = self.wrapped(part, self.step)
                features = self.module.merge_features(cached, j, live)
                step_losses = self.module.losses(features, self.step, live_scales=j == 0)
                self.scaler.scale(step_losses["total"]).backward()
            losses = losses or step_losses
        return losses

    # ------------------------------------------------------------------ checkpoints
    def _state_dicts(self) -> tuple[dict, dict | None, dict]:
        if self.recipe.run.strategy == "fsdp" and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            full, optim = get_state_dict(self.module, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full, optim = self.module.state_dict(), self.optimizer.state_dict()
        # Canonical shapes in checkpoints: FSDP's 1-element scale/bias vectors are stored as scalars.
        full = {k: v.reshape(()) if k.endswith(("logit_scale", "logit_bias")) and v.numel() == 1 else v
                for k, v in full.items()}
        model = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        heads = {k[len("heads."):]: v for k, v in full.items() if k.startswith("heads.")} or None
        return model, heads, optim

    def save_checkpoint(self) -> Path | None:
        model, heads, optim = self._state_dicts()
        data_states = gather_objects(self.data.state_dict())
        rngs = gather_objects(ckpt.rng_state())
        path = ckpt.checkpoint_dir(self.output_dir) / f"step_{self.step}.pt"
        if self.env.is_main:
            obj = {
                "step": self.step,
                "model": model,
                "model_cfg": self.model_cfg,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "data": data_states,
                "rng": rngs,
                "world_size": self.env.world_size,
                "recipe": self.recipe.to_dict(),
            }
            if heads is not None:
                obj["heads"], obj["heads_config"] = heads, self.heads.config.to_dict()
            ckpt.save_atomic(obj, path)
            ckpt.rotate(self.output_dir, self.recipe.run.keep_checkpoints)
        barrier()
        return path if self.env.is_main else None

    def _restore(self, path: Path) -> None:
        obj = ckpt.read_checkpoint(path)
        if obj.get("world_size", 1) != self.env.world_size:
            raise MedclipError(f"{path} was written by {obj.get('world_size')} processes; resuming with "
                               f"{self.env.world_size} would change the data order (use the same world size)")
        full = {f"model.{k}": v for k, v in obj["model"].items()}
        if self.heads is not None:
            if "heads" not in obj:
                raise MedclipError(f"{path} has no PC-Align heads, but this recipe trains PC-Align")
            full.update({f"heads.{k}": v for k, v in obj["heads"].items()})
        shapes = {k: p.shape for k, p in self.module.named_parameters()}
        full = {k: v.reshape(shapes[k]) if k in shapes and v.shape != shapes[k] and v.numel() == 1 else v
                for k, v in full.items()}
        if self.recipe.run.strategy == "fsdp" and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(self.module, self.optimizer, model_state_dict=full, optim_state_dict=obj["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        else:
            self.module.load_state_dict(full)
            self.optimizer.load_state_dict(obj["optimizer"])
        self.scheduler.load_state_dict(obj["scheduler"])
        self.scaler.load_state_dict(obj["scaler"])
        self.data.load_state_dict(obj["data"][self.env.rank])
        ckpt.set_rng_state(obj["rng"][self.env.rank])
        self.step = int(obj["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict:
        recipe, run = self.recipe, self.recipe.run
        monitor = Monitor(self.output_dir, run.steps, self.step, self.env.is_main, progress=run.progress,
                          tensorboard=run.tensorboard, wandb=run.wandb, wandb_project=run.wandb_project,
                          config=recipe.to_dict())
        peak = device_peak_tflops(self.device)
        flops_per_sample = None
        started = time.time()
        window_start, window_samples = time.time(), 0
        global_batch = recipe.data.batch_size * self.env.world_size
        try:
            for batch in batches_forever(self.data):
                if self.step >= run.steps:
                    break
                if flops_per_sample is None and peak is not None:
                    flops_per_sample = self._count_flops(batch)
                losses = self.train_step(batch)
                window_samples += global_batch
                monitor.advance()
                if self.step % run.log_every == 0 or self.step == run.steps:
                    elapsed = max(time.time() - window_start, 1e-9)
                    metrics = {"loss": losses["total"], **{k: v for k, v in losses.items() if k != "total"},
                               "lr": self.optimizer.param_groups[0]["lr"],
                               "logit_scale": self.module.model.logit_scale.detach().exp().item(),
                               "samples_per_s": window_samples / elapsed,
                               **{f"skipped/{k}": v for k, v in self.data.skip_counts().items()}}
                    if flops_per_sample is not None:
                        tflops = flops_per_sample * metrics["samples_per_s"] / self.env.world_size / 1e12
                        metrics.update(tflops_per_device=tflops, mfu=tflops / peak)
                    monitor.log(self.step, metrics)
                    window_start, window_samples = time.time(), 0
                if self.step % run.checkpoint_every == 0 and self.step < run.steps:
                    self.save_checkpoint()
                if recipe.eval.every_steps and self.step % recipe.eval.every_steps == 0 and self.step < run.steps:
                    self._evaluate(monitor)
            if self.step < run.steps:
                raise MedclipError(f"the data stream ended at step {self.step} of {run.steps}")
            self.save_checkpoint()
            encoder = self.snapshot_encoder()
            results = self._evaluate(monitor, encoder)
            export_dir = export_encoder(encoder, self.output_dir / "export") if self.env.is_main else None
        finally:
            monitor.close()
        if self.env.is_main:
            records = read_log(monitor.jsonl_path)
            plot_curves(records, self.output_dir / "curves.png")
            summary = summary_text(records, time.time() - started, self.data.skip_counts())
            (self.output_dir / "summary.txt").write_text(summary)
            print(summary, end="")
            print(f"exported open_clip hub-format model: {export_dir}")
        return results

    def _count_flops(self, batch: dict) -> float:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch = normalize_batch(batch, self.data)
        parts = split_batch(batch, self.recipe.optim.accum_steps)

        def forward():
            with self._autocast():
                return self.module.losses(self.module(parts[0], self.step), self.step)

        flops = train_flops_per_sample(forward, len(parts[0]["images"]))
        self.optimizer.zero_grad(set_to_none=True)
        return flops

    def snapshot_encoder(self):
        """An Encoder with the current weights on rank 0 (every rank takes part in gathering them)."""
        model, heads, _ = self._state_dicts()
        if not self.env.is_main:
            return None
        from medclip.models.loading import encoder_from_state

        return encoder_from_state(self.model_cfg, model, self.heads.config.to_dict() if heads else None, heads,
                                  device=self.device, name=f"{self.output_dir.name}@{self.step}")

    def _evaluate(self, monitor: Monitor, encoder=None) -> dict:
        if not self.recipe.eval.suites:
            return {}
        if encoder is None:
            encoder = self.snapshot_encoder()
        results = evaluate(encoder, self.recipe, self.output_dir, self.step) if self.env.is_main else {}
        barrier()
        if results:
            monitor.log(self.step, {f"eval/{k}": v for k, v in results.items()})
        return results


def pretrain(recipe: Recipe, resume: str | None = None) -> dict:
    return Pretrainer(recipe, resume).run()
