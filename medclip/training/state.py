"""What a training checkpoint holds, and how the trainer writes and restores it (all ranks take part);
the trainer's claim on its output directory (lock, fresh or resumed run, run id: ``rundir.py``).

A checkpoint holds its run's id, model, PC-Align heads, optimiser, scheduler, grad scaler, step, the divergence
guard's count, each rank's data-stream position and RNG states, whether the weights are finite, and
the recipe. Files, rotation and the choice of the checkpoint to go back to: ``checkpoint.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt
from medclip.training import rundir
from medclip.training.distributed import broadcast_from_main, gather_objects
from medclip.training.optim import apply_recipe_settings

log = logging.getLogger(__name__)


class TrainerCheckpoints:
    """Checkpoint methods of :class:`medclip.training.trainer.Pretrainer` (uses its module, optimiser,
    scheduler, scaler, guard, data, env, recipe, output_dir, run_id and step)."""

    def _claim_output_dir(self, fresh: bool, overwrite: bool) -> rundir.RunLock:
        """Rank 0 locks the output directory; a fresh run stops there if another run's files are in it.
        Rank 0's refusal is every rank's: the others stop with the same line instead of waiting for it."""
        lock, error = rundir.RunLock(self.output_dir), None
        if self.env.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                error = rundir.fresh_run_problem(self.output_dir, overwrite) if fresh else None
            except MedclipError as exc:
                error = str(exc)
            if error:
                lock.release()
        error = broadcast_from_main(error)
        if error:
            raise MedclipError(error)
        return lock

    def _checked_resume(self, resume: str | None) -> tuple[Path, dict] | None:
        """The checkpoint to resume and its contents, checked; the run's id (the checkpoint's, or a new one)."""
        owner = broadcast_from_main(rundir.read_run_id(self.output_dir) if self.env.is_main else None)
        path = ckpt.resolve_resume(resume, self.output_dir) if resume else None
        if path is None:
            self.run_id = broadcast_from_main(rundir.new_run_id())
            return None
        obj = self._read_resume(path, owner)
        self.run_id = rundir.resumed_run_id(path, obj.get("run_id"), owner)
        self.run_id = broadcast_from_main(self.run_id)
        return path, obj

    def _accept_run(self, overwrite: bool) -> None:
        """The run is accepted: only now the earlier run's files go (--overwrite) and recipe.yaml is written."""
        if self.env.is_main:
            if overwrite:
                rundir.clear_previous_run(self.output_dir)
            rundir.write_recipe(self.output_dir, self.recipe.to_dict(), self.run_id)
            ckpt.remove_stale_temporaries(self.output_dir)

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
        """Every rank takes part; rank 0 writes. A failed write stops every rank with the same one line."""
        model, heads, optim = self._state_dicts()
        data_states = gather_objects(self.data.state_dict())
        rngs = gather_objects(ckpt.rng_state())
        path = ckpt.checkpoint_dir(self.output_dir) / f"step_{self.step}.pt"
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
                "finite": ckpt.all_finite(model, heads),
                "guard": self.guard.state_dict(),
                "planned_steps": self.planned_steps,  # a budgeted run's plan and its clock: resumed as they were
                "budget_used": self.budget.elapsed() if self.budget is not None else None,
            }
            if heads is not None:
                obj["heads"], obj["heads_config"] = heads, self.heads.config.to_dict()
            try:
                ckpt.save_atomic(obj, path)
            except MedclipError as exc:
                error = str(exc)
        error = broadcast_from_main(error)
        if error:
            raise MedclipError(error)
        self.checkpoints.written(self.step, path)
        return path if self.env.is_main else None

    def _read_resume(self, path: Path, owner: str | None) -> dict:
        """The checkpoint to resume, checked before the run writes anything: the same world size, a model of
        the recipe's architecture, and the lineage of the run in the output directory (``owner``)."""
        obj = ckpt.read_checkpoint(path)
        if obj.get("world_size", 1) != self.env.world_size:
            raise MedclipError(f"{path} was written by {obj.get('world_size')} processes; resuming with "
                               f"{self.env.world_size} would change the data order (use the same world size)")
        if self.heads is not None and "heads" not in obj:
            raise MedclipError(f"{path} has no PC-Align heads, but this recipe trains PC-Align")
        problem = (rundir.lineage_problem(path, obj.get("run_id"), owner, self.output_dir)
                   or self._model_problem(path, obj))
        if problem:
            raise MedclipError(problem)
        return obj

    def _model_problem(self, path: Path, obj: dict) -> str | None:
        """Why the checkpoint's tensors do not fit this recipe's model (None when they do)."""
        expected = {k: v.shape for k, v in self.module.state_dict().items()
                    if k.startswith("model.") or (self.heads is not None and k.startswith("heads."))}
        got = _checkpoint_tensors(obj, with_heads=self.heads is not None)
        differ = sorted(k for k in expected.keys() | got.keys()
                        if k not in expected or k not in got or expected[k].numel() != got[k].numel())
        if not differ:
            return None
        trained = (obj.get("recipe") or {}).get("model", {}).get("name", "another model")
        return (f"--resume: {path} holds a {trained} model, this recipe builds {self.recipe.model.name} "
                f"({len(differ)} tensors differ, first {differ[0]}); resume with --set model.name={trained}, "
                f"or start a new run in another run.output_dir")

    def _restore(self, path: Path, obj: dict) -> None:
        full = _checkpoint_tensors(obj, with_heads=self.heads is not None)
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


def _checkpoint_tensors(obj: dict, with_heads: bool) -> dict:
    """The checkpoint's model (and heads) tensors under the training module's names."""
    full = {f"model.{k}": v for k, v in obj["model"].items()}
    if with_heads:
        full.update({f"heads.{k}": v for k, v in obj["heads"].items()})
    return full
