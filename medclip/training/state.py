"""What a training checkpoint holds, and how the trainer writes and restores it (all ranks take part).
The checks of a checkpoint to resume, before the run writes anything: ``start.py``.

A checkpoint holds its run's id, model, PC-Align heads, the EMA of the weights (optim.ema_decay), optimiser,
scheduler, grad scaler, step, the divergence guard's count, each rank's data-stream position and RNG states,
whether the weights are finite, and the recipe. Files, rotation and the choice of the checkpoint to go back
to: ``checkpoint.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt
from medclip.training.distributed import broadcast_from_main, gather_objects
from medclip.training.optim import apply_recipe_settings
from medclip.training.start import checkpoint_tensors

log = logging.getLogger(__name__)


class TrainerCheckpoints:
    """Checkpoint methods of :class:`medclip.training.trainer.Pretrainer` (uses its module, optimiser,
    scheduler, scaler, EMA, guard, data, checkpoint store, callbacks, env, recipe, output_dir, run_id and step)."""

    def _state_dicts(self) -> tuple[dict, dict | None, dict]:
        if self.recipe.run.strategy == "fsdp" and self.env.distributed:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            full, optim = get_state_dict(self.module, self.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            full, optim = self.module.state_dict(), self.optimizer.state_dict()
        full = canonical_scalars(full)
        model = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
        heads = {k[len("heads."):]: v for k, v in full.items() if k.startswith("heads.")} or None
        return model, heads, optim

    def save_checkpoint(self) -> Path | None:
        """Every rank takes part; rank 0 writes (with the checkpoint store's writer). A failed write stops every
        rank with the same one line. Callbacks see ``before_checkpoint`` and ``after_checkpoint`` around it."""
        path = ckpt.checkpoint_dir(self.output_dir) / f"step_{self.step}.pt"
        self.callbacks.call("before_checkpoint", self, path)
        model, heads, optim = self._state_dicts()
        ema = self._ema_state()
        data_states = gather_objects(self.data.state_dict())
        rngs = gather_objects(ckpt.rng_state())
        error = None
        if self.env.is_main:
            obj = {
                "step": self.step,
                "run_id": self.run_id,
                "model": model,
                "model_cfg": self.model_cfg,
                "optimizer": optim,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "data": data_states,
                "rng": rngs,
                "world_size": self.env.world_size,
                "recipe": self.recipe.to_dict(),
                "finite": ckpt.all_finite(model, heads, ema and ema["weights"]),
                "guard": self.guard.state_dict(),
                "planned_steps": self.planned_steps,  # a budgeted run's plan and its clock: resumed as they were
                "budget_used": self.budget.elapsed() if self.budget is not None else None,
            }
            if ema is not None:
                obj["ema"] = ema
            if heads is not None:
                obj["heads"], obj["heads_config"] = heads, self.heads.config.to_dict()
            try:
                self.checkpoints.write(obj, path)
            except MedclipError as exc:
                error = str(exc)
        error = broadcast_from_main(error)
        if error:
            raise MedclipError(error)
        self.checkpoints.written(self.step, path)
        self.callbacks.call("after_checkpoint", self, path)
        return path if self.env.is_main else None

    def _restore(self, path: Path, obj: dict) -> None:
        full = checkpoint_tensors(obj, with_heads=self.heads is not None)
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
        self._restore_ema(path, obj.get("ema"))
        self.scheduler.load_state_dict(obj["scheduler"])
        for name, (old, new) in apply_recipe_settings(self.optimizer, self.scheduler, self.recipe.optim).items():
            log.info("resume: optimiser %s is now %s (the checkpoint's run used %s)", name, new, old)
        self.scaler.load_state_dict(obj["scaler"])
        self.guard.load_state_dict(obj.get("guard", {}))
        if self.recipe.run.budget_seconds and obj.get("planned_steps"):
            self.set_planned_steps(int(obj["planned_steps"]))
            self.budget_used_before = float(obj.get("budget_used") or 0.0)
        self.data.load_state_dict(obj["data"][self.env.rank])
        ckpt.set_rng_state(obj["rng"][self.env.rank])
        self.step = int(obj["step"])
        self.checkpoints.written(self.step, path)
        log.info("resumed from %s at step %d", path, self.step)

    def _ema_state(self) -> dict | None:
        """The EMA's state with full tensors under the checkpoint's shapes (every rank takes part)."""
        if self.ema is None:
            return None
        state = self.ema.state_dict()
        return {**state, "weights": canonical_scalars(state["weights"])}

    def _restore_ema(self, path: Path, state: dict | None) -> None:
        """After the model's weights: the checkpoint's EMA, or (a checkpoint without one) an EMA from them."""
        if self.ema is None:
            if state is not None:
                log.info("resume: %s holds an EMA of the weights; this recipe keeps none (optim.ema_decay)", path)
            return
        if state is None:
            self.ema.reset()
            log.info("resume: %s holds no EMA of the weights; the EMA starts from its weights", path)
            return
        self.ema.load_state_dict(state)
        if state["decay"] != self.ema.decay:
            log.info("resume: EMA decay is now %s (the checkpoint's run used %s)", self.ema.decay, state["decay"])


def canonical_scalars(full: dict) -> dict:
    """Canonical shapes in checkpoints: FSDP's 1-element scale/bias vectors are stored as scalars."""
    return {k: v.reshape(()) if k.endswith(("logit_scale", "logit_bias")) and v.numel() == 1 else v
            for k, v in full.items()}
