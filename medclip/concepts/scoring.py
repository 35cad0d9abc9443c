"""Per-patch concept scores of images, from PC-Align's heads or from plain patch-text similarity.

With heads (a model trained with PC-Align): patch states -> patch head, the concept name's token
states (mean over its content tokens, as a caption span is pooled in training) -> concept head,
score = t_c * cos + b_c with t_c = exp(heads.logit_scale), b_c = heads.logit_bias: a logit whose
sigmoid is the probability that the concept is present at that patch.
Without heads: cosine between each patch projected into the joint space and the concept's text
embedding (uncalibrated; only its ranking means something).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medclip.concepts.tokens import embed_names, pad_token_id
from medclip.errors import MedclipError
from medclip.models import towers


def _clean_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str):
        names = [names]
    out = [str(n).strip() for n in names]
    if not out or any(not n for n in out):
        raise MedclipError("concept names must be non-empty strings")
    return out


class ConceptScorer:
    """Scores images against concept names with one encoder; concept vectors are cached."""

    def __init__(self, encoder, use_heads: bool | None = None):
        self.encoder = encoder
        if use_heads and encoder.heads is None:
            raise MedclipError("this model has no PC-Align heads (trained without PC-Align)")
        self.use_heads = encoder.heads is not None if use_heads is None else use_heads
        self._cache: dict[str, torch.Tensor] = {}

    @property
    def method(self) -> str:
        return "pc_align" if self.use_heads else "cosine"

    @torch.no_grad()
    def concept_vectors(self, names: Sequence[str]) -> torch.Tensor:
        """[C, D] normalized concept vectors (float32, CPU)."""
        names = _clean_names(names)
        missing = [n for n in dict.fromkeys(names) if n not in self._cache]
        if missing:
            enc = self.encoder
            if self.use_heads:
                ids = enc.tokenize(missing).to(enc.device)
                with enc._autocast():
                    vectors = embed_names(enc.model, enc.heads, ids, pad_token_id(enc.tokenizer)).float().cpu()
            else:
                vectors = enc.encode_text(missing, normalize=False)
            for name, vec in zip(missing, F.normalize(vectors, dim=-1)):
                self._cache[name] = vec
        return torch.stack([self._cache[n] for n in names])

    @torch.no_grad()
    def image_features(self, images, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalized pooled image embeddings [N, D], normalized patch vectors [N, P, D]), CPU float32."""
        enc = self.encoder
        pooled_out, patch_out = [], []
        for batch in enc.image_batches(images, batch_size):
            with enc._autocast():
                if self.use_heads:  # the patch states the heads were trained on
                    pooled, states = towers.image_tokens(enc.model, batch, enc.heads.config.patch_states)
                    patches = enc.heads.embed_patches(states, enc.grid_size)
                else:
                    pooled, states = towers.image_tokens(enc.model, batch)
                    patches = towers.project_patches(enc.model, states)
            pooled_out.append(F.normalize(pooled.float().cpu(), dim=-1))
            patch_out.append(F.normalize(patches.float().cpu(), dim=-1))
        return torch.cat(pooled_out), torch.cat(patch_out)

    def scale_bias(self) -> tuple[float, float]:
        if not self.use_heads:
            return 1.0, 0.0
        heads = self.encoder.heads
        return float(heads.logit_scale.detach().exp()), float(heads.logit_bias.detach())

    def patch_scores(self, patches: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """[N, P, D] x [C, D] -> [N, C, P] patch logits (heads) or cosines."""
        scale, bias = self.scale_bias()
        return scale * torch.einsum("npd,cd->ncp", patches, concepts) + bias

    def image_scores(self, pooled: torch.Tensor, patch_scores: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """[N, C] one score per image and concept: the max patch logit (heads, as PC-Align scores a
        pair) or the pooled image-text cosine (no heads)."""
        if self.use_heads:
            return patch_scores.max(dim=-1).values
        return pooled @ concepts.T

    def score(self, images, names: Sequence[str], batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """(image scores [N, C], patch scores [N, C, P])."""
        concepts = self.concept_vectors(names)
        pooled, patches = self.image_features(images, batch_size)
        patch = self.patch_scores(patches, concepts)
        return self.image_scores(pooled, patch, concepts), patch
