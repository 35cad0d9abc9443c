"""The parts a :class:`medclip.training.trainer.Pretrainer` trains with, and the small functions that build
each from a recipe (``Pretrainer.from_recipe`` calls them in order; a caller may build or replace any).

* ``build_module``: the model (weights, attention kernel, gradient checkpointing, freezing), the
  PC-Align heads and the objective, as one ``TrainModule``;
* ``build_optimisation``: the module wrapped for the strategy (DDP / FSDP2, compiled), its optimiser,
  schedule and grad scaler (the optimiser after the wrap: FSDP2 shards the parameters in place);
* ``build_ema``: the EMA of the weights (``optim.ema_decay``), over the wrapped module's own tensors;
* ``build_checkpoint_store``: which checkpoints to keep and how a checkpoint file is written;
* the data: ``medclip.training.components.build_data``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medclip.concepts.tokens import pad_token_id
from medclip.errors import MedclipError
from medclip.models import loading, towers
from medclip.models.encoder import AMP_DTYPES
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig
from medclip.training import checkpoint as ckpt
from medclip.training.attention import set_attention_backend
from medclip.training.components import TrainModule
from medclip.training.config import Recipe
from medclip.training.distributed import DistEnv, wrap_model
from medclip.training.ema import WeightEma
from medclip.training.flops import TrainFlops
from medclip.training.lora import add_adapters
from medclip.training.optim import apply_freezing, build_optimizer, build_scheduler

# Precisions that store the weights in low precision; the others keep fp32 weights (and may autocast).
LOW_PRECISION_WEIGHTS = ("bf16", "pure_bf16", "fp16", "pure_fp16")

CheckpointWriter = Callable[[dict, Path], None]  # writes one checkpoint object to its path (rank 0)


@dataclass
class TrainParts:
    """What a run trains, with what, on which data, and where its checkpoints go."""

    model_cfg: dict  # the open_clip config of ``module.model``
    module: TrainModule  # model + PC-Align heads + objective, unwrapped
    wrapped: nn.Module  # ``module`` as the forward runs it: under DDP/FSDP2, compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    data: object  # batches, with state_dict/load_state_dict/skip_counts (components.build_data's stream)
    checkpoints: ckpt.CheckpointKeeper
    flops: TrainFlops | None = None  # the MFU meter (FLOPs counted on a copy of the unwrapped module)
    peak_tflops: float | None = None  # the device's peak, for MFU
    ema: WeightEma | None = None  # the EMA of the trained weights (optim.ema_decay)


def autocast(recipe: Recipe, device: torch.device):
    """The recipe's autocast context (a no-op for precisions that do not autocast)."""
    dtype = AMP_DTYPES.get(recipe.model.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_model(recipe: Recipe, device: torch.device) -> tuple[dict, nn.Module]:
    """The recipe's open_clip model (its config and the model, in training mode)."""
    mc = recipe.model
    cfg = loading.with_text_dir(loading.resolve_config(mc.name), mc.hf_text_dir)
    if recipe.objective.it_kind == "sigmoid" and "init_logit_bias" not in cfg:
        cfg["init_logit_bias"] = -10.0  # sigmoid IT-Align needs the model's own logit_bias
    precision = mc.precision if mc.precision in LOW_PRECISION_WEIGHTS else "fp32"
    model = loading.build_model(cfg, device, precision)
    if mc.checkpoint:
        loading.load_weights(model, start_weights(mc.checkpoint, mc.hf_text_dir), allow_mismatch="logit_bias" in cfg,
                             source=mc.checkpoint, context=f"model.checkpoint for model.name {mc.name}")
    set_attention_backend(model, mc.attention)
    if mc.grad_checkpointing:
        towers.set_grad_checkpointing(model)  # HF towers through transformers' current API
    apply_freezing(model, mc)
    if mc.lora.rank > 0:
        add_adapters(model, mc.lora)  # after freezing: only the adapters train
    return cfg, model.train()


def start_weights(checkpoint: str, hf_text_dir: str | None = None) -> dict:
    """The state dict a run starts from: a weights or checkpoint file as it is, else whatever ``medclip.load``
    reads (an export or hub-format directory, ``NAME=PATH`` for a zoo model's snapshot; its HF text tower
    from ``hf_text_dir`` when given, as the recipe's model)."""
    if Path(checkpoint).is_file():
        obj = loading.read_weights_file(checkpoint)
        if isinstance(obj, dict) and isinstance(obj.get("model_cfg"), dict):  # a medclip training checkpoint
            # its LoRA adapters are merged in a model built from its config: the text tower's files from here
            return loading.merged_adapters(obj, loading.with_text_dir(obj["model_cfg"], hf_text_dir))
        return loading.extract_state_dict(obj)
    return loading.load_spec(checkpoint, device="cpu", hf_text_dir=hf_text_dir).model.state_dict()


def build_heads(recipe: Recipe, model: nn.Module, model_cfg: dict, device: torch.device) -> ConceptHeads | None:
    """PC-Align's concept heads, when the objective uses them."""
    if recipe.objective.pc_weight <= 0:
        return None
    try:
        towers.check_patch_states(model, recipe.objective.pc_patch_states, training=True)
    except MedclipError as exc:
        raise MedclipError(f"objective.pc_patch_states: {exc}") from None
    config = ConceptHeadsConfig(image_width=towers.image_width(model), text_width=towers.text_width(model),
                                embed_dim=int(model_cfg["embed_dim"]), **recipe.objective.heads_options())
    return ConceptHeads(config).to(device).train()


def build_module(recipe: Recipe, device: torch.device) -> tuple[dict, TrainModule]:
    """Model, heads and objective as the one module the strategy wraps."""
    model_cfg, model = build_model(recipe, device)
    heads = build_heads(recipe, model, model_cfg, device)
    name_pad = pad_token_id(loading.build_tokenizer(model_cfg)) if recipe.objective.use_concept_names else None
    return model_cfg, TrainModule(model, heads, recipe.objective, name_pad).to(device)


def build_optimisation(recipe: Recipe, module: TrainModule, env: DistEnv, device: torch.device):
    """(wrapped module, optimiser, schedule, grad scaler) for the recipe's strategy and precision."""
    wrapped = wrap_model(module, recipe.run.strategy, env, device,
                         find_unused=recipe.objective.pc_start_step > 0 and module.heads is not None)
    sharded = recipe.run.strategy == "fsdp" and env.distributed
    optimizer = build_optimizer(module.named_parameters(), recipe.optim, fused=not sharded)
    scheduler = build_scheduler(optimizer, recipe.optim, recipe.run.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=recipe.model.precision == "amp")
    if recipe.model.compile:
        wrapped = torch.compile(wrapped)
    return wrapped, optimizer, scheduler, scaler


def build_ema(recipe: Recipe, module: TrainModule) -> WeightEma | None:
    """The EMA of ``module``'s trained tensors, or None (optim.ema_decay unset or 0). Built after the wrap: FSDP2
    replaces the parameters with sharded ones, whose shadows are sharded alike."""
    if not recipe.optim.ema_decay:
        return None
    return WeightEma(module, recipe.optim.ema_decay, warmup=recipe.optim.ema_warmup)


def build_checkpoint_store(recipe: Recipe, env: DistEnv, write: CheckpointWriter | None = None) -> ckpt.CheckpointKeeper:
    """The run's checkpoints: rotation (run.keep_checkpoints) and the writer of each file (atomic by default)."""
    return ckpt.CheckpointKeeper(recipe.output_dir, recipe.run.keep_checkpoints, env.is_main,
                                 write=write or ckpt.save_atomic)
