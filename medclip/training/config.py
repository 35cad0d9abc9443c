"""Typed recipe: YAML -> nested dataclasses, with `--set a.b=value` overrides and strict keys."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medclip import resources
from medclip.data.leakage import LeakageCheckConfig
from medclip.data.stream import check_first_caption_share
from medclip.data.windows import check_long_captions
from medclip.errors import MedclipError
from medclip.losses.objective import ObjectiveConfig  # the recipe's objective section is the loss config
from medclip.models.loading import PRECISIONS
from medclip.training.attention import BACKENDS
from medclip.training.prepare import BuildSpec, check_label_names
from medclip.training.recipe_values import build_section


@dataclass
class LoraConfig:
    """LoRA adapters through peft (docs/finetune.md); the export merges them into the plain weights."""

    rank: int = 0  # 0: no adapters
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # Regular expressions over module names (full match), each must match an adaptable layer; empty: the
    # attention and MLP projections of both towers' blocks (medclip.training.lora.default_targets).
    targets: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "medclip-tiny"
    # What to start from: a medclip export or hub-format directory, a weights or training-checkpoint file, or a
    # zoo name with its local snapshot (NAME=PATH): anything medclip.load accepts.
    checkpoint: str | None = None
    finetune: bool = False  # a fine-tuning recipe: the run refuses to start without model.checkpoint
    hf_text_dir: str | None = None
    precision: str = "fp32"  # fp32 | amp_bf16 | amp (fp16 with grad scaler) | bf16 | pure_bf16
    grad_checkpointing: bool = False
    compile: bool = False
    attention: str = "sdpa"  # sdpa | xformers | math
    freeze_image: bool = False
    freeze_text: bool = False
    unlocked_image_layers: int = 0  # with freeze_image: keep the last N groups trainable
    unlocked_text_layers: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class SourceConfig:
    manifest: str
    weight: float | None = None  # overrides the manifest's own sampling weight
    root: str | None = None  # overrides the manifest's shard root


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    build: list[BuildSpec] = field(default_factory=list)  # tables converted to shards at the start of the run
    demo: bool = False  # build the embedded synthetic demo set under output_dir and train on it
    demo_train_samples: int = 2400
    demo_val_samples: int = 300
    # Where the demo's findings sit: anatomical (their usual place) or random (position independent of the concept;
    # docs/grounding.md).
    demo_layout: str = "anatomical"
    batch_size: int = 64  # per process
    num_workers: int = 2
    shuffle_buffer: int = 1000
    augment: bool = True
    # The random crop's area range, as a fraction of the image (open_clip's AugmentationCfg.scale); None: open_clip's
    # default (0.9, 1.0).
    crop_scale: list[float] | None = None
    # Decode large JPEGs at the DCT scale the random crop needs (1/2, 1/4, 1/8), the crop drawn on the full
    # size (README, Data): 3-8x less loader CPU at 1-2k px sources. False: decode every image at full size.
    fast_decode: bool = True
    # Decode JPEGs on the GPU (nvJPEG) in the training process; the workers only draw each crop (docs/data.md).
    # Without a CUDA device: one logged line and the CPU path.
    gpu_decode: bool = False
    # Chance of drawing a sample's own caption rather than one of its label captions (None: all equal).
    first_caption_share: float | None = None
    # Captions longer than the text context: head (truncated at the end, as open_clip), window (a run of whole
    # sentences that fits, drawn per visit, with its concepts) or concepts (drawn among the windows that keep
    # the most concepts; docs/data.md).
    long_captions: str = "head"
    # Samples per epoch over all ranks (None: sum of weight x samples over the sources; see README, Data).
    epoch_samples: int | None = None
    # Let manifests run the shell commands of their pipe: URLs (only for manifests you trust; --allow-pipe).
    allow_pipe: bool = False
    # Before step 1: training images against these evaluation sides (suites, folders, tables, shards); the run
    # refuses to start on an exact or near copy unless allow_leakage (README, "Leakage check").
    leakage_check: LeakageCheckConfig = field(default_factory=LeakageCheckConfig)


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr: float = 0.0
    grad_clip: float | None = None
    accum_steps: int = 1  # micro-batches per step; the contrastive batch stays whole
    logit_scale_max: float = 4.6052  # ln(100), as CLIP
    # EMA of the trained weights (training/ema.py), in every checkpoint; None or 0: off. Typical 0.999-0.9999;
    # the average spans about 1 / (1 - decay) steps, so a short run needs a smaller decay.
    ema_decay: float | None = None
    ema_warmup: bool = True  # update n uses min(ema_decay, (1 + n) / (10 + n)): the start weights fade fast
    ema_export: bool = False  # export the EMA weights instead of the raw ones (the checkpoint keeps both)


@dataclass
class EvalConfig:
    suites: list[str] = field(default_factory=list)  # zero_shot suite names or YAML paths
    every_steps: int = 0  # 0: only at the end
    root: str | None = None
    batch_size: int = 128


@dataclass
class RunConfig:
    output_dir: str = "runs/demo"
    steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    strategy: str = "ddp"  # ddp | fsdp
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "medclip"
    progress: bool = True
    deterministic: bool = False
    # Divergence guard: a step whose loss or gradients are not finite is skipped (no update); after this
    # many such steps in a row the run stops, naming the last checkpoint with finite weights.
    max_nonfinite_steps: int = 10
    # Wall-clock seconds for training and the final checkpoint + export (not set-up, not the final evaluation):
    # the run fits its number of steps to it as it measures its step time (run.steps is only the first plan).
    budget_seconds: float | None = None
    # When the budget's clock starts: "training" (Pretrainer.run: set-up not counted) or "process" (the
    # process's start on Linux: the whole command, as a benchmark holding every side to one budget charges it).
    budget_from: str = "training"


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)


CHOICES = {
    "model.precision": PRECISIONS,
    "data.demo_layout": ("anatomical", "random"),
    "model.attention": BACKENDS,
    "optim.schedule": ("cosine", "constant"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.strategy": ("ddp", "fsdp"),
    "run.budget_from": ("training", "process"),
}
POSITIVE = ("data.batch_size", "run.steps", "optim.accum_steps", "run.log_every", "optim.lr", "optim.eps",
            "run.keep_checkpoints", "run.checkpoint_every", "run.max_nonfinite_steps", "eval.batch_size",
            "run.budget_seconds")
NON_NEGATIVE = ("optim.weight_decay", "optim.warmup_steps", "data.num_workers", "eval.every_steps", "optim.min_lr",
                "data.shuffle_buffer", "data.demo_train_samples", "data.demo_val_samples", "objective.pc_weight",
                "objective.pc_start_step", "optim.grad_clip",  # grad_clip 0 or null: no clipping
                "model.lora.rank", "model.lora.alpha", "model.unlocked_image_layers", "model.unlocked_text_layers")
UNIT_INTERVAL = ("optim.beta1", "optim.beta2", "model.lora.dropout")  # Adam's betas, dropout: [0, 1)


def _set_path(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise MedclipError(f"--set {dotted}: {part} is not a section")
    node[parts[-1]] = value


def _flat_values(node, prefix: str = "") -> dict:
    """{dotted key: value} of every field, nested sections (model.lora) included."""
    flat = {}
    for f in dataclasses.fields(node):
        key, value = f"{prefix}{f.name}", getattr(node, f.name)
        flat.update(_flat_values(value, f"{key}.") if dataclasses.is_dataclass(value) else {key: value})
    return flat


def _non_finite(value, where: str):
    """The first float anywhere in ``value`` (nested dataclasses and lists) that is NaN or infinite."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if found := _non_finite(getattr(value, f.name), f"{where}.{f.name}" if where else f.name):
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if found := _non_finite(item, f"{where}[{i}]"):
                return found
    return None


def _check_lora(model: ModelConfig) -> None:
    """LoRA settings that would train nothing, or not what the recipe's freezing says."""
    lora = model.lora
    if lora.rank == 0 and lora.targets:
        raise MedclipError(f"recipe key model.lora.targets needs model.lora.rank > 0 (rank 0: no adapters), "
                           f"got {lora.targets!r}")
    if lora.rank > 0 and lora.alpha == 0:
        raise MedclipError(f"recipe key model.lora.alpha must be positive with model.lora.rank {lora.rank} (the "
                           f"adapters' update is scaled by alpha / rank: 0 trains nothing), got {lora.alpha!r}")
    for key in ("freeze_image", "freeze_text", "unlocked_image_layers", "unlocked_text_layers"):
        if lora.rank > 0 and getattr(model, key):  # peft would train every adapter, frozen tower or not
            raise MedclipError(f"recipe key model.{key} does not combine with model.lora (only the adapters train, in "
                               f"both towers by default): leave it unset and choose the adapted layers with "
                               f"model.lora.targets, e.g. [visual\\..*] for the image tower alone")


def validate(recipe: Recipe) -> Recipe:
    """Names and ranges of every value, before anything is built (a NaN passes every `x < 0` test)."""
    if found := _non_finite(recipe, ""):
        raise MedclipError(f"recipe key {found[0]} must be a finite number, got {found[1]!r}")
    flat = _flat_values(recipe)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise MedclipError(f"recipe key {key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    for key in POSITIVE:
        if flat[key] is not None and not flat[key] > 0:
            raise MedclipError(f"recipe key {key} must be positive, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] is not None and flat[key] < 0:
            raise MedclipError(f"recipe key {key} must not be negative, got {flat[key]!r}")
    for key in UNIT_INTERVAL:
        if not 0 <= flat[key] < 1:
            raise MedclipError(f"recipe key {key} must be in [0, 1), got {flat[key]!r}")
    _check_lora(recipe.model)
    if recipe.optim.ema_decay is not None and not 0 <= recipe.optim.ema_decay < 1:
        raise MedclipError(f"recipe key optim.ema_decay must be in [0, 1) (0 or null: no EMA), "
                           f"got {recipe.optim.ema_decay!r}")
    if recipe.optim.ema_export and not recipe.optim.ema_decay:
        raise MedclipError("recipe key optim.ema_export needs an EMA: set optim.ema_decay too (e.g. 0.999)")
    if recipe.optim.min_lr > recipe.optim.lr:
        raise MedclipError(f"recipe key optim.min_lr ({recipe.optim.min_lr}) is above optim.lr ({recipe.optim.lr})")
    if not recipe.data.sources and not recipe.data.demo and not recipe.data.build:
        raise MedclipError("recipe has no data: set data.demo: true, or list data.sources or data.build")
    for spec in recipe.data.build:
        check_label_names(spec)
    check_first_caption_share(recipe.data.first_caption_share, "recipe key data.first_caption_share")
    check_long_captions(recipe.data.long_captions, "recipe key data.long_captions")
    scale = recipe.data.crop_scale
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise MedclipError(f"recipe key data.crop_scale must be [min, max] with 0 < min <= max <= 1 (fractions of "
                           f"the image's area), got {scale!r}")
    if not 0 <= recipe.data.leakage_check.max_distance < 64:
        raise MedclipError(f"recipe key data.leakage_check.max_distance must be 0-63 (bits of a 64-bit hash), got "
                           f"{recipe.data.leakage_check.max_distance}")
    if recipe.data.epoch_samples is not None and recipe.data.epoch_samples < 1:
        raise MedclipError(f"recipe key data.epoch_samples must be positive (or null), got {recipe.data.epoch_samples}")
    if recipe.model.finetune and not recipe.model.checkpoint:
        raise MedclipError("this recipe fine-tunes a trained model: set model.checkpoint (--set model.checkpoint=DIR "
                           "with a medclip export, a weights file, a zoo model's name, or NAME=PATH for its local snapshot)")
    if recipe.data.batch_size % recipe.optim.accum_steps:
        raise MedclipError(f"data.batch_size {recipe.data.batch_size} is not divisible by "
                           f"optim.accum_steps {recipe.optim.accum_steps}")
    return recipe


def _field_type(dotted: str):
    """The declared type of a recipe key such as 'eval.root' (None when the path is not a plain field)."""
    cls = Recipe
    for part in dotted.split("."):
        if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
            return None
        cls = typing.get_type_hints(cls)[part]
    return cls


def parse_override(item: str) -> tuple[str, object]:
    """`key=value` from the command line: the value is YAML, except that a string key takes text as it is
    (so `eval.root={output_dir}/data` is a path, not a broken YAML mapping)."""
    if "=" not in item:
        raise MedclipError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not raw.strip():
        return key, None
    if raw.lstrip().startswith("!"):
        raise MedclipError(f"--set {key}: YAML tags such as {raw.split()[0]!r} are not accepted; give a plain value")
    text_key = _field_type(key) in (str, str | None)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        if text_key:
            return key, raw
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MedclipError(f"--set {key}: {raw!r} is not a valid value ({reason})") from None
    if text_key and value is not None and not isinstance(value, str):
        return key, raw
    return key, value


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults) and apply `key.sub=value` overrides."""
    values: dict = {}
    if path is not None:
        path = resources.resolve("recipes", path)  # a shipped recipe's name works too
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MedclipError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(values, dict):
            raise MedclipError(f"recipe {path} must be a mapping of sections")
    for item in overrides or []:
        _set_path(values, *parse_override(item))
    return validate(build_section(Recipe, values))
