"""The start of a run, before and between the building of its parts: processes and device, the checks of
the recipe, the claim on the output directory (lock, fresh or resumed run, run id: ``rundir.py``), the
checkpoint to resume checked against the built model, and the run's acceptance (only then is anything
written). :meth:`medclip.training.trainer.Pretrainer.from_recipe` goes through these steps in order.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt
from medclip.training import preflight, rundir
from medclip.training.config import LoraConfig, Recipe
from medclip.training.distributed import (
    DistEnv,
    broadcast_from_main,
    detect_env,
    init_distributed,
    pick_device,
)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class RunStart:
    """The processes, device, output directory and lock of a run, and (once decided) its id."""

    recipe: Recipe
    env: DistEnv
    device: torch.device
    lock: rundir.RunLock
    run_id: str | None = None

    @property
    def output_dir(self) -> Path:
        return self.recipe.output_dir

    @classmethod
    def begin(cls, recipe: Recipe, resume: str | None = None, overwrite: bool = False) -> RunStart:
        """Processes and device up, the recipe checked (names, data, packages, disk: before anything is built),
        the seed set and the output directory claimed."""
        env = detect_env()
        device = pick_device(recipe.run.device, env)
        init_distributed(env, device)
        preflight.check(recipe, is_main=env.is_main)
        if resume and overwrite:
            raise MedclipError("--overwrite starts a new run and --resume continues one: choose one of them")
        if recipe.run.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(recipe.run.seed)  # same init on every rank; DDP also broadcasts it
        return cls(recipe, env, device, _claim_output_dir(recipe.output_dir, env, fresh=not resume,
                                                          overwrite=overwrite))

    def checked_resume(self, resume: str | None, module) -> tuple[Path, dict] | None:
        """The checkpoint to resume and its contents, checked against the built training ``module``; sets the
        run's id (the checkpoint's, or a new one)."""
        owner = broadcast_from_main(rundir.read_run_id(self.output_dir) if self.env.is_main else None)
        path = ckpt.resolve_resume(resume, self.output_dir) if resume else None
        if path is None:
            self.run_id = broadcast_from_main(rundir.new_run_id())
            return None
        obj = self._read_resume(path, owner, module)
        self.run_id = broadcast_from_main(rundir.resumed_run_id(path, obj.get("run_id"), owner))
        return path, obj

    def accept(self, overwrite: bool) -> None:
        """The run is accepted: only now the earlier run's files go (--overwrite) and recipe.yaml is written."""
        if self.env.is_main:
            if overwrite:
                rundir.clear_previous_run(self.output_dir)
            rundir.write_recipe(self.output_dir, self.recipe.to_dict(), self.run_id)
            ckpt.remove_stale_temporaries(self.output_dir)

    def _read_resume(self, path: Path, owner: str | None, module) -> dict:
        """The checkpoint to resume, checked before the run writes anything: the same world size, a model of
        the recipe's architecture, and the lineage of the run in the output directory (``owner``)."""
        obj = ckpt.read_checkpoint(path)
        if obj.get("world_size", 1) != self.env.world_size:
            raise MedclipError(f"{path} was written by {obj.get('world_size')} processes; resuming with "
                               f"{self.env.world_size} would change the data order (use the same world size)")
        if module.heads is not None and "heads" not in obj:
            raise MedclipError(f"{path} has no PC-Align heads, but this recipe trains PC-Align")
        problem = (rundir.lineage_problem(path, obj.get("run_id"), owner, self.output_dir)
                   or self._lora_problem(path, obj) or self._heads_problem(path, obj, module)
                   or self._model_problem(path, obj, module))
        if problem:
            raise MedclipError(problem)
        return obj

    def _lora_problem(self, path: Path, obj: dict) -> str | None:
        """Why the checkpoint's LoRA adapters are not this recipe's (None when they are). Another alpha fits the
        same tensors but scales their update differently: the resumed model would not be the checkpoint's."""
        trained = LoraConfig(**(((obj.get("recipe") or {}).get("model") or {}).get("lora") or {}))
        wanted = self.recipe.model.lora
        if trained.rank <= 0 and wanted.rank <= 0:
            return None
        for key in ("rank", "alpha", "targets"):  # dropout changes no weight: it may change on resume
            old, new = getattr(trained, key), getattr(wanted, key)
            if old != new:
                return (f"--resume: {path} was trained with model.lora.{key} {old}, this recipe has "
                        f"{new}; resume with --set model.lora.{key}={old}, or start a new run in another "
                        f"run.output_dir")
        return None

    def _heads_problem(self, path: Path, obj: dict, module) -> str | None:
        """Why the checkpoint's PC-Align heads read other patch states than this recipe's (None when they do).
        Other states (e.g. 'embed' and 'block1') fit the same tensors: the resumed heads would read what they
        were not trained on."""
        if module.heads is None:
            return None
        trained = (obj.get("recipe") or {}).get("objective") or {}
        for option in ("pc_patch_states", "pc_patch_context", "pc_patch_head"):
            old, new = trained.get(option), getattr(self.recipe.objective, option)
            if old is not None and old != new:  # None: a checkpoint from before the option
                return (f"--resume: {path} was trained with objective.{option} {old}, this recipe has {new}; "
                        f"resume with --set objective.{option}={old}, or start a new run in another "
                        f"run.output_dir")
        return None

    def _model_problem(self, path: Path, obj: dict, module) -> str | None:
        """Why the checkpoint's tensors do not fit this recipe's model (None when they do)."""
        with_heads = module.heads is not None
        expected = {k: v.shape for k, v in module.state_dict().items()
                    if k.startswith("model.") or (with_heads and k.startswith("heads."))}
        got = checkpoint_tensors(obj, with_heads=with_heads)
        differ = sorted(k for k in expected.keys() | got.keys()
                        if k not in expected or k not in got or expected[k].numel() != got[k].numel())
        if not differ:
            return None
        trained = (obj.get("recipe") or {}).get("model", {}).get("name", "another model")
        return (f"--resume: {path} holds a {trained} model, this recipe builds {self.recipe.model.name} "
                f"({len(differ)} tensors differ, first {differ[0]}); resume with --set model.name={trained}, "
                f"or start a new run in another run.output_dir")


def _claim_output_dir(output_dir: Path, env: DistEnv, fresh: bool, overwrite: bool) -> rundir.RunLock:
    """Rank 0 locks the output directory; a fresh run stops there if another run's files are in it.
    Rank 0's refusal is every rank's: the others stop with the same line instead of waiting for it."""
    lock, error = rundir.RunLock(output_dir), None
    if env.is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            error = rundir.fresh_run_problem(output_dir, overwrite) if fresh else None
        except MedclipError as exc:
            error = str(exc)
        except OSError as exc:  # every rank must hear it: the others wait for rank 0's word
            error = f"cannot use run.output_dir {output_dir}: {exc.strerror or exc}"
        if error:
            lock.release()
    error = broadcast_from_main(error)
    if error:
        raise MedclipError(error)
    return lock


def checkpoint_tensors(obj: dict, with_heads: bool) -> dict:
    """The checkpoint's model (and heads) tensors under the training module's names."""
    full = {f"model.{k}": v for k, v in obj["model"].items()}
    if with_heads:
        full.update({f"heads.{k}": v for k, v in obj["heads"].items()})
    return full
