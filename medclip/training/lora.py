"""LoRA adapters on an open_clip model through peft, and their merge into plain weights for the export.

Targets are found by structure, not by names: the linear (and, in convolutional towers, the ungrouped
convolution) layers inside each tower's repeated blocks, i.e. the elements of a layer list whose elements
are all of one type (open_clip's ``resblocks``, a BERT's ``encoder.layer``, timm's ``blocks`` and ResNet
stages). That is the attention and MLP projections of transformer towers; embeddings, the patch stem and
the projection heads stay as they are. open_clip's fused ``in_proj`` of nn.MultiheadAttention is a bare
parameter, not a layer, so in native ViT / text towers the attention's output projection is adapted and
its input projection is not.

Training checkpoints keep the adapters unmerged (resume continues them exactly); the export and the
evaluation use :func:`merged_for_export`, whose state dict has the plain model's keys.
"""

from __future__ import annotations

import re

from torch import nn

from medclip._deps import require
from medclip.errors import MedclipError
from medclip.training.attention import set_attention_backend
from medclip.training.config import LoraConfig

ADAPTER = "default"  # peft's adapter name: state-dict keys read ``<layer>.lora_A.default.weight``


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _block_prefixes(model: nn.Module) -> list[str]:
    """Names of the blocks of every layer list whose elements all have one type (and are not single layers)."""
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) > 0:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and not _adaptable(module[0]) and not isinstance(module[0], (nn.ModuleList, nn.Sequential)):
                prefixes += [f"{name}.{i}." if name else f"{i}." for i in range(len(module))]
    return prefixes


def default_targets(model: nn.Module) -> list[str]:
    """The adaptable layers inside the towers' repeated blocks (see the module doc), by module name."""
    prefixes = tuple(_block_prefixes(model))
    return [name for name, module in model.named_modules() if _adaptable(module) and name.startswith(prefixes)]


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Module names the adapters go on: ``patterns`` (each must match an adaptable layer), else the default."""
    if not patterns:
        found = default_targets(model)
        if not found:
            raise MedclipError("model.lora: this model has no linear or convolution layers inside repeated blocks; "
                               "name the layers to adapt in model.lora.targets")
        return found
    layers = [name for name, module in model.named_modules() if _adaptable(module)]
    chosen: list[str] = []
    for pattern in patterns:
        try:
            matched = [name for name in layers if re.fullmatch(pattern, name)]
        except re.error as exc:
            raise MedclipError(f"model.lora.targets: {pattern!r} is not a regular expression ({exc})") from None
        if not matched:
            examples = ", ".join(default_targets(model)[:3] or layers[:3])
            raise MedclipError(f"model.lora.targets: {pattern!r} matches no linear or convolution layer of "
                               f"this model (full match of module names such as {examples})")
        chosen += [name for name in matched if name not in chosen]
    return chosen


def _check_rank(model: nn.Module, names: list[str], rank: int) -> None:
    for name in names:
        layer = model.get_submodule(name)
        sizes = (layer.in_features, layer.out_features) if isinstance(layer, nn.Linear) else (
            layer.in_channels, layer.out_channels)
        if rank > min(sizes):
            raise MedclipError(f"model.lora.rank {rank} is larger than layer {name} ({sizes[0]} -> {sizes[1]}): "
                               f"choose a rank of at most {min(sizes)}, or leave that layer out of model.lora.targets")


def _out_proj_called(model: nn.Module, names: list[str]) -> None:
    """nn.MultiheadAttention reads ``out_proj.weight`` itself, so an adapter there would be skipped silently;
    medclip's KernelAttention (the training default) calls ``out_proj`` as a layer. A model still on plain
    attention is switched to it (same parameters and keys); attention that cannot switch is refused."""
    if any(type(m) is nn.MultiheadAttention for m in model.modules()):
        set_attention_backend(model, "sdpa")
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if type(parent) is nn.MultiheadAttention:
            raise MedclipError(f"model.lora.targets: {name} is the output projection of an attention medclip cannot "
                               f"run with adapters (cross-attention); leave it out of model.lora.targets")


def add_adapters(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Put LoRA adapters on ``model`` in place (only they train from then on); returns the adapted layers."""
    peft = require("peft", "LoRA fine-tuning (model.lora)")
    names = resolve_targets(model, cfg.targets)
    _check_rank(model, names, cfg.rank)
    _out_proj_called(model, names)
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                             bias="none")
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    return names


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and put the plain layer back (peft's merge); in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, module.get_base_layer())
    return model


def merged_for_export(model_cfg: dict, state_dict: dict, cfg: LoraConfig) -> dict:
    """The plain model's state dict for a trained state dict: adapters merged when ``cfg`` has them (the
    export and evaluation load it into open_clip's own modules); unchanged without adapters."""
    if cfg.rank <= 0:
        return state_dict
    from medclip.models.loading import build_model

    model = build_model(model_cfg, "cpu", "fp32")
    add_adapters(model, cfg)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return merge_adapters(model).state_dict()

