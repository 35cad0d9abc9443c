"""PC-Align projection heads: patch states and concept-span states into a shared concept space.

Kept outside the open_clip model so exported checkpoints stay loadable by plain open_clip;
medclip saves them beside the model (``medclip_heads.safetensors``) and loads them back.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medclip.errors import MedclipError

# Which image-token states the patch head reads: 'last' = the image tower's last block (ConceptCLIP);
# 'embed' = the patch embeddings before the first block, where a patch has seen only its own pixels
# (after attention every token can carry the whole image, and max pooling then rewards whichever
# position gathers it, not the patch that shows the concept); 'block<N>' = the tokens after the N-th
# block (1-based), in between: a patch compared with its surroundings but still mostly itself
# (localised worse than 'embed' on the demo set's random split, one seed: docs/grounding.md).
# 'stem' = the patch stem's output alone, before the positional embedding is added (through ln_pre): what a
# patch shows, not where it is, so a head reading it cannot learn where a finding usually sits.
PATCH_STATES = ("last", "embed", "stem")  # and 'block<N>' (patch_block)
# The patch head's form. 'mlp': each patch's k x k neighbourhood -> hidden -> concept space (one
# non-linearity; ConceptCLIP's MLP when k = 1). 'conv': the same k x k layer as a convolution over the
# grid, then a 3x3 convolution and a 1x1 projection (two non-linearities, k + 2 patches seen): a small
# detector that can compare a patch with its surroundings, e.g. a dark spot against brighter tissue
# (localised worse than 'mlp' on the demo set's random split, one seed: docs/grounding.md).
PATCH_HEADS = ("mlp", "conv")


def patch_block(patch_states: str) -> int | None:
    """N of 'block<N>' (N >= 1); None for 'last' and 'embed'; an error for anything else."""
    if patch_states in PATCH_STATES:
        return None
    match = re.fullmatch(r"block([1-9][0-9]*)", patch_states)
    if match is None:
        raise MedclipError(f"patch_states must be {', '.join(map(repr, PATCH_STATES))} or 'block<N>' (N >= 1), "
                           f"got {patch_states!r}")
    return int(match.group(1))


@dataclass
class ConceptHeadsConfig:
    image_width: int
    text_width: int
    embed_dim: int
    hidden_dim: int | None = None  # defaults to embed_dim
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = -10.0
    # ConceptCLIP's form: the concept head maps every token state, then a span's vectors are averaged
    # (its `text_proj` before span pooling). False: average the span's states, then the head.
    concept_head_on_tokens: bool = False
    patch_states: str = "last"  # see PATCH_STATES
    # The patch head reads each patch together with its k x k neighbours on the grid (zero beyond the
    # edge), odd k; 1 = the patch alone. Context for local states ('embed'), which see one patch only.
    patch_context: int = 1
    patch_head: str = "mlp"  # see PATCH_HEADS

    def __post_init__(self):
        patch_block(self.patch_states)
        if self.patch_head not in PATCH_HEADS:
            raise MedclipError(f"patch_head must be one of {PATCH_HEADS}, got {self.patch_head!r}")
        if self.patch_context < 1 or self.patch_context % 2 == 0:
            raise MedclipError(f"patch_context must be an odd number >= 1, got {self.patch_context}")

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden, bias=False), nn.GELU(), nn.Linear(hidden, out_dim, bias=False))


def _conv_head(in_dim: int, hidden: int, out_dim: int, context: int) -> nn.Sequential:
    # No biases, zero padding: at the grid's edge a patch sees zeros, as the 'mlp' head's neighbourhood does.
    return nn.Sequential(nn.Conv2d(in_dim, hidden, context, padding=context // 2, bias=False), nn.GELU(),
                         nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.GELU(),
                         nn.Conv2d(hidden, out_dim, 1, bias=False))


class ConceptHeads(nn.Module):
    """Patch head, concept head, and PC-Align's own learnable scale t_c and bias b_c."""

    def __init__(self, config: ConceptHeadsConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_dim or config.embed_dim
        if config.patch_head == "conv":
            self.patch_head = _conv_head(config.image_width, hidden, config.embed_dim, config.patch_context)
        else:
            self.patch_head = _mlp(config.image_width * config.patch_context ** 2, hidden, config.embed_dim)
        self.concept_head = _mlp(config.text_width, hidden, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.init_logit_bias)))

    def embed_patches(self, patch_states: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """[B, P, Wv] -> [B, P, D] (not normalized); ``grid`` (rows, columns) with P = rows x columns
        is needed when ``patch_context`` > 1 or the head is 'conv'."""
        if self.config.patch_head == "conv":
            maps = self._as_maps(patch_states, grid)
            return self.patch_head(maps).flatten(2).transpose(1, 2)
        return self.patch_head(self._with_context(patch_states, grid))

    def _as_maps(self, states: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """[B, P, W] -> [B, W, rows, columns]."""
        if grid is None or grid[0] * grid[1] != states.shape[1]:
            raise MedclipError(f"the {self.config.patch_head} patch head with context {self.config.patch_context} "
                               f"needs the patch grid of the {states.shape[1]} patches, got {grid}")
        return states.transpose(1, 2).reshape(states.shape[0], states.shape[2], *grid)

    def _with_context(self, states: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
        """[B, P, W] -> [B, P, W k^2]: each patch's k x k neighbourhood, in F.unfold's channel order."""
        k = self.config.patch_context
        if k == 1:
            return states
        return F.unfold(self._as_maps(states, grid), k, padding=k // 2).transpose(1, 2)

    def embed_spans(self, token_states: torch.Tensor, span_mask: torch.Tensor) -> torch.Tensor:
        """Mean of token states over each concept span, then the concept head (or the reverse order
        with ``concept_head_on_tokens``, as ConceptCLIP does).

        token_states [B, L, Wt]; span_mask [B, C, L] (1 on the span's tokens) -> [B, C, D].
        Empty spans (padding) give zero vectors and must be masked out by the caller.
        """
        mask = span_mask.to(token_states.dtype)
        counts = mask.sum(-1, keepdim=True).clamp_min(1.0)
        if self.config.concept_head_on_tokens:
            return torch.einsum("bcl,bld->bcd", mask, self.concept_head(token_states)) / counts
        pooled = torch.einsum("bcl,blw->bcw", mask, token_states) / counts
        return self.concept_head(pooled)

    def embed_names(self, token_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """A concept given by name: its tokens' states [N, L, Wt] and mask [N, L] (1 on the name's
        own tokens) -> [N, D], pooled the way caption spans are (see ``concept_head_on_tokens``)."""
        return self.embed_spans(token_states, token_mask[:, None, :])[:, 0]

    def embed_pooled_text(self, text_states: torch.Tensor) -> torch.Tensor:
        """A concept given by name: pooled token states [N, Wt] -> [N, D]."""
        return self.concept_head(text_states)
