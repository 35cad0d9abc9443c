"""Token-level forward passes shared by the encoder, the losses and the trainer.

open_clip returns pooled features; PC-Align and heatmaps also need the per-patch states of the
image tower and the per-position states of the text tower. These functions produce both in a
single pass, for open_clip's native towers, timm image towers and HF text towers.

For a convolutional timm trunk (ResNet, ConvNeXt, ...) the "patches" are the cells of its last
feature map, in row-major order, as in local image-text alignment with CNN encoders (GLoRIA):
[B, C, H, W] -> [B, H*W, C], and the grid is the input size over the trunk's total stride.
"""

from __future__ import annotations

import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import PatchDropout, VisionTransformer

from medclip.errors import MedclipError
from medclip.models.heads import patch_block


def image_width(model) -> int:
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        return visual.proj.shape[0] if visual.proj is not None else visual.transformer.width
    if isinstance(visual, TimmModel):
        return visual.trunk.num_features
    raise MedclipError(f"{type(visual).__name__} image tower: no per-patch states (supported: open_clip ViT, timm towers)")


def text_width(model) -> int:
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "config"):  # HF tower
        return text.config.hidden_size
    tower = text if text is not None else model
    return tower.transformer.width


def grid_size(model) -> tuple[int, int]:
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        return tuple(visual.grid_size)
    patch_embed = getattr(visual.trunk, "patch_embed", None)
    if patch_embed is not None:
        return tuple(patch_embed.grid_size)
    stride = visual.trunk.feature_info[-1]["reduction"]  # convolutional trunk: its last map's stride
    height, width = visual.image_size
    return -(-height // stride), -(-width // stride)


def image_tokens(model, images: torch.Tensor, patch_states: str = "last") -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled image features [B, D] unnormalized, patch states [B, P, W] before projection).

    ``patch_states`` (models.heads.PATCH_STATES): 'last' = the last block's tokens; 'embed' = the patch
    embeddings the first block receives (open_clip ViT: after the positional embedding and ln_pre);
    'block<N>' = the tokens after the N-th block through ln_post (open_clip ViT); 'stem' = the patch stem's
    output through ln_pre, without the positional embedding (open_clip ViT). One forward pass.
    """
    block = check_patch_states(model, patch_states)
    visual = model.visual
    if patch_states == "embed":
        return _vit_embeddings(visual, images)
    if patch_states == "stem":
        return _vit_stem(visual, images)
    if isinstance(visual, VisionTransformer):
        return _vit_tokens(visual, images, -1 if block is None else block - 1)
    feats = visual.trunk.forward_features(images)
    pooled = visual.head(visual.trunk.forward_head(feats))
    if feats.ndim == 4:  # convolutional trunk: feature-map cells are the patches
        return pooled, feats.flatten(2).transpose(1, 2)
    return pooled, feats[:, getattr(visual.trunk, "num_prefix_tokens", 0):]


def check_patch_states(model, patch_states: str, training: bool | None = None) -> int | None:
    """N of 'block<N>' (None otherwise), or one line when the image tower cannot give ``patch_states`` (checked
    when PC-Align's heads are built, for training, and by every ``image_tokens``; ``training`` None: the tower's
    own mode)."""
    visual = model.visual
    if not isinstance(visual, (VisionTransformer, TimmModel)):
        raise MedclipError(f"{type(visual).__name__} image tower: no per-patch states (supported: open_clip ViT, "
                           "timm towers)")
    block = patch_block(patch_states)
    if isinstance(visual, VisionTransformer):
        _check_vit_layout(visual)
    if patch_states == "last":
        return None
    if not isinstance(visual, VisionTransformer):
        raise MedclipError(f"patch states {patch_states!r} need an open_clip ViT image tower, not "
                           f"{type(visual).__name__} (use 'last')")
    depth = len(visual.transformer.resblocks)
    if block is not None and block > depth:
        raise MedclipError(f"patch states {patch_states!r}: the image tower has {depth} blocks")
    # Patch dropout (active in training only) would hand the grid-reading heads a random subset of the grid.
    dropout = visual.patch_dropout
    if (visual.training if training is None else training) and isinstance(dropout, PatchDropout) and dropout.prob > 0:
        raise MedclipError(f"patch states {patch_states!r} need the whole patch grid: turn the image tower's "
                           f"patch dropout off (vision_cfg patch_dropout {dropout.prob})")
    return block


def _check_vit_layout(visual: VisionTransformer) -> None:
    # The plain layout only (ln_post on every token, no attention pooler): other layouts have no per-patch
    # states in the joint space.
    if visual.attn_pool is not None or visual.final_ln_after_pool:
        raise MedclipError("per-patch states need a ViT with token or average pooling and ln_post before "
                           "pooling (no attentional pooler, final_ln_after_pool false)")


def _vit_tokens(visual: VisionTransformer, images: torch.Tensor, block: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    # open_clip's public forward_intermediates: one block's tokens (0-based index; -1 the last) through
    # ln_post, class token split off, and the pooled projected features, in one pass (grad checkpointing
    # honoured). The last block's tokens equal the forward's own only for the plain layout (ln_post on
    # every token, no attention pooler: image_tokens checked it); other layouts have no per-patch states in
    # the joint space.
    indices = 1 if block == -1 else [block]
    out = visual.forward_intermediates(images, indices=indices, normalize_intermediates=True, output_fmt="NLC")
    return out["image_features"], out["image_intermediates"][-1]


def _vit_pass_keeping(visual: VisionTransformer, images: torch.Tensor, module, what: str):
    """(pooled features, ``module``'s output) from one forward pass: a forward hook (public nn.Module API)
    keeps the output of one stem module from the pass that also gives the pooled features."""
    captured = []
    handle = module.register_forward_hook(lambda mod, args, output: captured.append(output))
    try:
        pooled, _ = _vit_tokens(visual, images)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise MedclipError(f"could not read the ViT's {what} (it ran {len(captured)} time(s))")
    return pooled, captured[0]


def _vit_embeddings(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # ln_pre's output is the first block's input (open_clip applies it last in the embedding stem).
    pooled, embedded = _vit_pass_keeping(visual, images, visual.ln_pre, "patch embeddings")
    patches = int(visual.grid_size[0] * visual.grid_size[1])
    if embedded.shape[1] != patches + 1:
        raise MedclipError(f"could not read the ViT's patch embeddings ({embedded.shape[1]} tokens for "
                           f"{patches} patches and a class token; patch dropout must be off)")
    return pooled, embedded[:, 1:]  # open_clip ViTs have one class token, first


def _vit_stem(visual: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # conv1's output is the patch content before the class token and positional embedding join it; ln_pre
    # (the tower's own norm of its first block's input) puts it on the scale 'embed' states have.
    pooled, stem = _vit_pass_keeping(visual, images, visual.conv1, "patch stem")
    return pooled, visual.ln_pre(stem.flatten(2).transpose(1, 2))


def set_grad_checkpointing(model, enable: bool = True) -> None:
    """Activation checkpointing on both towers through each library's current public API.

    open_clip's ``set_grad_checkpointing`` reaches transformers' ``gradient_checkpointing_enable``,
    deprecated in transformers 5 (removed in v6); HF text towers use ``activation_checkpointing_*``
    where it exists, the older name otherwise. open_clip's own towers keep open_clip's call.
    """
    text = getattr(model, "text", None)
    if text is None or not hasattr(text, "config"):  # no HF tower: open_clip's call covers both towers
        model.set_grad_checkpointing(enable)
        return
    model.visual.set_grad_checkpointing(enable)
    hf = text.transformer
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5
        hf.activation_checkpointing_enable() if enable else hf.activation_checkpointing_disable()
    else:
        hf.gradient_checkpointing_enable() if enable else hf.gradient_checkpointing_disable()


def is_grad_checkpointing(model) -> bool:
    """Whether the text tower checkpoints activations (HF towers through their current API)."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "config"):
        hf = text.transformer
        if hasattr(type(hf), "is_activation_checkpointing"):  # transformers >= 5
            return bool(hf.is_activation_checkpointing)
        return bool(hf.is_gradient_checkpointing)
    tower = text if text is not None else model
    return bool(tower.transformer.grad_checkpointing)


def project_patches(model, tokens: torch.Tensor) -> torch.Tensor:
    """Patch states into the joint embedding space through the tower's own projection."""
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        return tokens @ visual.proj if visual.proj is not None else tokens
    return visual.head(tokens)


def text_tokens(model, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled text features [B, D] unnormalized, states [B, L, W] aligned with token_ids positions)."""
    text = getattr(model, "text", None)
    if text is not None and hasattr(text, "config"):  # open_clip HFTextEncoder
        mask = (token_ids != text.config.pad_token_id).long()
        out = text.transformer(input_ids=token_ids, attention_mask=mask)
        pooled = text.proj(text.pooler(out, mask))
        return pooled, out.last_hidden_state
    # Native towers have a fixed context (positional table, causal mask): pad shorter ids (names)
    # with the pad id 0; causal attention leaves the states of the real positions unchanged.
    length = token_ids.shape[1]
    context = (text if text is not None else model).positional_embedding.shape[0]
    if length < context:
        token_ids = torch.nn.functional.pad(token_ids, (0, context - length))
    pooled, states = _native_text_tokens(model, text, token_ids)
    return pooled, states[:, :length]


def _native_text_tokens(model, text, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # open_clip's public forward_intermediates, as for images: the last block's states through ln_final
    # (the tokens of open_clip's own forward) and the pooled, projected features, from one pass.
    # CLIP keeps its text modules on the model itself, CustomTextCLIP on its TextTransformer.
    if text is None:
        out = model.forward_intermediates(text=token_ids, text_indices=1, normalize=False,
                                          normalize_intermediates=True)
    else:
        out = text.forward_intermediates(token_ids, indices=1, normalize_intermediates=True, output_fmt="NLC")
    return out["text_features"], out["text_intermediates"][-1]
