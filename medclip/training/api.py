"""`medclip.pretrain`: the Python entry point to training, the same path as `medclip pretrain`."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medclip.training.config import Recipe


@dataclass
class PretrainResult:
    """What a finished run leaves behind."""

    output_dir: Path  #: everything the run wrote: checkpoints/, log.jsonl, curves.png, summary.txt, eval/
    export_dir: Path | None  #: the final model in open_clip's hub format (``medclip.load(export_dir)``)
    metrics: dict = field(default_factory=dict)  #: final evaluation, ``{"suite/dataset/metric": value}``


def _override_strings(overrides: dict) -> list[str]:
    """``{"run": {"steps": 5}, "optim.lr": 1e-4}`` -> ``["run.steps=5", "optim.lr=0.0001"]`` (YAML values)."""
    import yaml

    out = []
    for key, value in overrides.items():
        if isinstance(value, dict) and "." not in key:
            out.extend(_override_strings({f"{key}.{k}": v for k, v in value.items()}))
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=2**31).strip()
            out.append(f"{key}={text.removesuffix('...').strip()}")
    return out


def resolve_recipe(recipe: str | os.PathLike | Recipe, overrides: dict | None = None) -> Recipe:
    """A checked :class:`Recipe` from a name, a path or a Recipe, with ``overrides`` applied."""
    from medclip.training.config import Recipe, load_recipe

    if isinstance(recipe, Recipe):
        if not overrides:
            return recipe
        return load_recipe(None, _override_strings(recipe.to_dict()) + _override_strings(overrides))
    return load_recipe(recipe, _override_strings(overrides or {}))


def pretrain(recipe: str | os.PathLike | Recipe = "demo", *, resume: str | None = None, overwrite: bool = False,
             callbacks: Sequence = (), checkpoint_writer: Callable | None = None, **overrides) -> PretrainResult:
    """Pretrain a dual encoder from a recipe, as ``medclip pretrain --config RECIPE`` does.

    Args:
        recipe: a shipped recipe's name (``"demo"``, ``"shared_real"``...; ``medclip list recipes``
            shows them), the path of a recipe YAML file, or a ``medclip.training.config.Recipe``.
        resume: ``"latest"`` to continue from the newest checkpoint in the run's output directory
            (starting afresh if there is none), or the path of a checkpoint; None starts from step 0.
            A checkpoint of another run (another run id), or of another model, raises
            ``medclip.MedclipError`` before anything is written.
        overwrite: start afresh even though the output directory holds another run's checkpoints or
            export (they, its log, evaluation and report are removed first); without it such a
            directory raises ``medclip.MedclipError``. A directory in use by a live run always does.
        callbacks: ``medclip.training.callbacks.Callback`` objects the trainer calls at named points of the
            run (after each step with its batch and losses, around each checkpoint write, after each
            evaluation, at the end), after the run's own log.
        checkpoint_writer: ``writer(checkpoint, path)`` that writes each checkpoint file on rank 0 instead
            of ``medclip.training.checkpoint.save_atomic`` (a test can make a write fail part-way).
        **overrides: recipe values to change, per section as mappings
            (``run={"steps": 50, "output_dir": "runs/try"}``, ``optim={"lr": 1e-4}``) or as dotted
            keys (``**{"run.steps": 50}``). They are checked like ``--set`` on the command line: an
            unknown key or a bad value raises ``medclip.MedclipError`` before anything is built.

    Returns:
        A ``PretrainResult`` with the run's ``output_dir``, the ``export_dir`` of the final model in
        open_clip's hub format (load it with ``medclip.load(result.export_dir)`` or
        ``open_clip.create_model_and_transforms("local-dir:" + str(result.export_dir))``), and the
        final evaluation ``metrics``.

    Under ``torchrun`` every process calls ``pretrain`` with the same arguments; the recipe's
    ``run.strategy`` chooses DDP or FSDP2. Example::

        result = medclip.pretrain("demo", run={"steps": 100, "output_dir": "runs/demo-100"})
        encoder = medclip.load(result.export_dir)
    """
    from medclip.training.trainer import pretrain as run_pretraining

    checked = resolve_recipe(recipe, overrides)
    metrics = run_pretraining(checked, resume=resume, overwrite=overwrite, callbacks=callbacks,
                              checkpoint_writer=checkpoint_writer)
    export = checked.output_dir / "export"
    return PretrainResult(checked.output_dir, export if export.is_dir() else None, dict(metrics or {}))
