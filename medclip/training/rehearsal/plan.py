"""What a rehearsal keeps of a recipe and what it swaps: the rehearsed recipe, with every change listed.

Kept as they are: sources and their weights, the manifests (their files are read unchanged),
objective, optimiser, strategy (DDP / FSDP2), precision where the CPU has it, accumulation,
gradient checkpointing, compile, attention kernel, freezing, LoRA adapters (model.lora), eval suites,
checkpoint rotation, export. Swapped, because they cannot fit on a laptop or in minutes: the model (a
debug model of the same family, see model; a fine-tuning recipe's start weights become the debug
model's random weights), the data when the shards are not on disk (stand-ins in the same format, see
data / evaldata), and the schedule's length (steps, warmup, PC-Align start, checkpoint and eval
intervals scaled down together).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

STEPS = 20
CHECKPOINT_EVERY = 7  # odd: with 2 loader workers the resume point falls on worker 1's turn
KILL_AT_CHECKPOINT = 14  # the killed run dies (SIGKILL) while writing this checkpoint; resumes from 7
BATCH_PER_PROCESS = 4  # bf16 autocast is emulated (5x slower) on CPUs without native bf16
MAX_WORKERS = 2
MAX_SHUFFLE_BUFFER = 100
DEMO_TRAIN_SAMPLES = 256
DEMO_VAL_SAMPLES = 48
EVAL_BATCH = 32


@dataclass
class Swap:
    key: str
    before: object
    after: object
    why: str

    def line(self) -> str:
        return f"{self.key}: {self.before!r} -> {self.after!r} ({self.why})"


@dataclass
class RehearsalPlan:
    """The rehearsed recipe (as a dict, without output_dir) and how it differs from the recipe."""

    config: str
    recipe: object  # the user's Recipe, overrides applied
    values: dict
    swaps: list[Swap] = field(default_factory=list)
    model_notes: list[str] = field(default_factory=list)
    sources: list = field(default_factory=list)  # data.SourceData
    suites: list = field(default_factory=list)  # evaldata.SuiteData
    nproc: int = 2
    device: str = "cpu"

    def write_recipe(self, path: Path, output_dir: Path, evaluate: bool = True) -> Path:
        """The rehearsed recipe into ``output_dir``; without ``evaluate``, its suites are dropped (the
        killed and resumed runs: the straight run evaluates, and the resumed run's weights equal to its
        then also show that evaluation leaves training untouched)."""
        values = copy.deepcopy(self.values)
        values["run"]["output_dir"] = str(output_dir)
        if not evaluate:
            values["eval"]["suites"] = []
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def kept(self) -> list[str]:
        r = self.recipe
        objective = f"{r.objective.it_kind} IT-Align" + (
            f" + {r.objective.pc_weight} x PC-Align ({r.objective.pc_pool}) from step "
            f"{self.values['objective']['pc_start_step']}" if r.objective.pc_weight > 0 else "")
        return [
            f"strategy {r.run.strategy} on {self.nproc} processes ({'nccl' if self.device == 'cuda' else 'gloo'})",
            f"precision {self.values['model']['precision']}, accumulation {r.optim.accum_steps}, "
            f"gradient checkpointing {'on' if r.model.grad_checkpointing else 'off'}, "
            f"compile {'on' if r.model.compile else 'off'}, attention {self.values['model']['attention']}",
            f"objective {objective}",
            f"trains {_trained(r.model)}",
            f"optimizer AdamW lr {r.optim.lr:g} betas ({r.optim.beta1}, {r.optim.beta2}) eps {r.optim.eps:g} "
            f"wd {r.optim.weight_decay:g}, grad clip {r.optim.grad_clip}, {r.optim.schedule} schedule"
            + (f", EMA of the weights decay {r.optim.ema_decay:g}" if r.optim.ema_decay else ""),
            f"sources {len(r.data.sources)} manifests, {len(r.data.build)} builds, demo {r.data.demo}; "
            f"weights {_weights(r.data.sources)}, caption/concept fields from the manifests",
            f"eval suites {', '.join(r.eval.suites) or 'none'}; keep_checkpoints {r.run.keep_checkpoints}; export",
        ]


def _scaled(value: int, total: int, steps: int = STEPS) -> int:
    """A step count of the recipe at the same fraction of the rehearsal's length (>= 1 when it was > 0)."""
    if value <= 0:
        return value
    return max(1, min(steps - 1, round(value * steps / max(total, 1))))


def cpu_precision(precision: str) -> tuple[str, str | None]:
    """The recipe's precision if this CPU runs it, else the nearest one it does (and why)."""
    import torch

    if precision in ("amp", "fp16", "pure_fp16"):
        try:
            with torch.autocast("cpu", dtype=torch.float16):
                torch.ones(2, 2) @ torch.ones(2, 2)
        except RuntimeError:
            return "amp_bf16", "this CPU has no float16 autocast"
    return precision, None


def _swap(plan: RehearsalPlan, section: str, key: str, value, why: str) -> None:
    before = plan.values[section].get(key)
    if before != value:
        plan.values[section][key] = value
        plan.swaps.append(Swap(f"{section}.{key}", before, value, why))


def _schedule(plan: RehearsalPlan) -> None:
    r = plan.recipe
    total = r.run.steps
    _swap(plan, "run", "steps", STEPS, "a few dozen steps")
    # A budget would re-plan the steps from the clock: the checks compare fixed steps run by run.
    _swap(plan, "run", "budget_seconds", None, f"exactly {STEPS} steps, not as many as fit in the budget")
    _swap(plan, "optim", "warmup_steps", _scaled(r.optim.warmup_steps, total), "same fraction of the run")
    _swap(plan, "objective", "pc_start_step", _scaled(r.objective.pc_start_step, total), "same fraction of the run")
    _swap(plan, "run", "checkpoint_every", CHECKPOINT_EVERY, f"checkpoints at {CHECKPOINT_EVERY} and "
          f"{KILL_AT_CHECKPOINT}; the killed run dies while writing {KILL_AT_CHECKPOINT}")
    if r.eval.every_steps:
        _swap(plan, "eval", "every_steps", STEPS // 2, "one periodic evaluation mid-run")
    _swap(plan, "eval", "batch_size", min(r.eval.batch_size, EVAL_BATCH), "tiny model")
    _swap(plan, "run", "log_every", 1, "every loss is compared")


def _batch(plan: RehearsalPlan) -> None:
    r = plan.recipe
    accum = r.optim.accum_steps
    batch = -(-max(BATCH_PER_PROCESS, 2 * accum) // accum) * accum  # a multiple of the accumulation steps
    _swap(plan, "data", "batch_size", batch, "per process; the recipe's accumulation steps divide it")
    if r.data.num_workers > MAX_WORKERS:
        _swap(plan, "data", "num_workers", MAX_WORKERS, "workers > 0 keep the multi-worker resume path")
    if r.data.shuffle_buffer > MAX_SHUFFLE_BUFFER:
        _swap(plan, "data", "shuffle_buffer", MAX_SHUFFLE_BUFFER, "stand-in sources are small")
    if r.data.demo:
        _swap(plan, "data", "demo_train_samples", min(r.data.demo_train_samples, DEMO_TRAIN_SAMPLES), "smaller demo set")
        _swap(plan, "data", "demo_val_samples", min(r.data.demo_val_samples, DEMO_VAL_SAMPLES), "smaller demo set")


def _run_settings(plan: RehearsalPlan) -> None:
    _swap(plan, "run", "deterministic", True, "bit-identical resume is compared")
    _swap(plan, "run", "device", plan.device, "the rehearsal's device")
    _swap(plan, "run", "progress", False, "logs go to files")
    _swap(plan, "run", "tensorboard", False, "no logger needed")
    _swap(plan, "run", "wandb", False, "offline")


def _model(plan: RehearsalPlan, debug_name: str, start_weights) -> None:
    """``start_weights()``: writes the debug model's stand-in start weights, returns their path."""
    r = plan.recipe
    _swap(plan, "model", "name", debug_name, "debug model of the same family")
    if r.model.checkpoint:  # a fine-tuning recipe starts from weights: the debug model's own, random
        _swap(plan, "model", "checkpoint", str(start_weights()), "the full-size model's weights do not fit the "
              "debug model; its random weights stand in as the start")
    if r.model.hf_text_dir:
        _swap(plan, "model", "hf_text_dir", None, "text files of the full-size model do not fit the debug model")
    if plan.device == "cpu":
        precision, why = cpu_precision(r.model.precision)
        if why:
            _swap(plan, "model", "precision", precision, why)
    if r.model.attention == "xformers":
        from medclip.training.attention import xformers_available

        if not xformers_available():
            _swap(plan, "model", "attention", "sdpa", "xformers is not installed here")


def make_plan(recipe, config: str, work_dir: Path, nproc: int = 2, device: str = "cpu") -> RehearsalPlan:
    """Derive the rehearsed recipe; writes the debug model config and any stand-in data under ``work_dir``."""
    from medclip.models.loading import resolve_config, with_text_dir
    from medclip.training.rehearsal.data import prepare_training_data, stand_in_pool
    from medclip.training.rehearsal.evaldata import prepare_eval_data
    from medclip.training.rehearsal.model import derive_debug_model

    plan = RehearsalPlan(config, recipe, copy.deepcopy(recipe.to_dict()), nproc=nproc, device=device)
    model_cfg = with_text_dir(resolve_config(recipe.model.name), recipe.model.hf_text_dir)
    debug = derive_debug_model(model_cfg)
    plan.model_notes = debug.notes
    _model(plan, debug.write(work_dir / "model"),
           lambda: debug.write_start_weights(work_dir / "model", recipe.run.seed))
    _schedule(plan)
    _batch(plan)
    _run_settings(plan)
    image_size = debug.config["vision_cfg"].get("image_size", 64)
    image_size = image_size if isinstance(image_size, int) else max(image_size)
    if recipe.eval.suites:
        plan.swaps.append(Swap("eval.suites of the killed and resumed runs", recipe.eval.suites, [],
                               "the straight run evaluates; equal final weights then also show that "
                               "evaluation leaves training untouched"))
    pool = stand_in_pool(image_size, recipe.run.seed)
    data = plan.values["data"]
    readable = STEPS * nproc * data["batch_size"] + nproc * max(1, data["num_workers"]) * data["shuffle_buffer"]
    plan.sources = prepare_training_data(plan.values, pool, work_dir / "data", min_samples=readable)
    plan.suites = prepare_eval_data(plan.values, work_dir / "eval", pool)
    return plan


def _trained(model) -> str:
    """What of the model trains: LoRA adapters, or the towers as freezing leaves them."""
    if model.lora.rank > 0:
        targets = ", ".join(model.lora.targets) or "the default targets"
        return f"LoRA adapters only: rank {model.lora.rank}, alpha {model.lora.alpha:g}, dropout " \
               f"{model.lora.dropout:g} on {targets}"
    locked = [f"{tower} tower locked (last {n} unlocked)" for tower, frozen, n in
              (("image", model.freeze_image, model.unlocked_image_layers),
               ("text", model.freeze_text, model.unlocked_text_layers)) if frozen]
    return "; ".join(locked) if locked else "every weight"


def _weights(sources) -> str:
    """A recipe source's weight, or the manifest's own where the recipe gives none."""
    if not sources:
        return "-"
    if all(s.weight is None for s in sources):
        return "from the manifests"
    return ", ".join("the manifest's" if s.weight is None else f"{s.weight:g}" for s in sources)
