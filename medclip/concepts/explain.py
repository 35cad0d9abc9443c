"""Concept explanations: per-patch concept maps, heatmap PNGs, ranked concepts, zero-shot annotation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from medclip._deps import require
from medclip.concepts.scoring import ConceptScorer
from medclip.errors import MedclipError
from medclip.imaging import load_image


@dataclass
class ConceptMaps:
    """Concept maps of one image.

    ``scores`` [C, gh, gw]: per-patch logits (method 'pc_align') or cosines ('cosine');
    ``image_scores`` [C]: one score per concept (max patch logit, or pooled image-text cosine);
    ``image``: the image as the model sees it (after resize and crop), which the grid covers;
    ``source_size``: (width, height) of the original image; ``crop``: (x0, y0, width, height) of
    the original-image region the grid covers.
    """

    concepts: list[str]
    scores: torch.Tensor
    image_scores: torch.Tensor
    image: Image.Image
    method: str
    source_size: tuple[int, int]
    crop: tuple[float, float, float, float]

    def ranked(self) -> list[tuple[str, float]]:
        order = torch.argsort(self.image_scores, descending=True).tolist()
        return [(self.concepts[i], float(self.image_scores[i])) for i in order]

    def heatmaps(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """[C, H, W] maps bilinearly upsampled to ``size`` = (width, height) (default: the model's view)."""
        width, height = size or self.image.size
        return F.interpolate(self.scores[None].float(), size=(height, width), mode="bilinear",
                             align_corners=False)[0]

    def source_heatmaps(self) -> torch.Tensor:
        """[C, H, W] maps in the original image's pixels; where the model saw nothing (cropped away),
        the map holds its own minimum, so that region never wins the pointing game."""
        width, height = self.source_size
        x0, y0, cw, ch = self.crop
        region = F.interpolate(self.scores[None].float(), size=(max(1, round(ch)), max(1, round(cw))),
                               mode="bilinear", align_corners=False)[0]
        floor = region.flatten(1).min(dim=1).values
        canvas = floor[:, None, None].expand(-1, height, width).clone()
        ox, oy = round(x0), round(y0)
        # Paste the region at (ox, oy), clipped to the canvas (a padded view extends past the image).
        sx, sy = max(0, -ox), max(0, -oy)
        dx, dy = max(0, ox), max(0, oy)
        w = min(region.shape[2] - sx, width - dx)
        h = min(region.shape[1] - sy, height - dy)
        if w > 0 and h > 0:
            canvas[:, dy:dy + h, dx:dx + w] = region[:, sy:sy + h, sx:sx + w]
        return canvas

    def save_png(self, path: str | Path, ranked: list[tuple[str, float]] | None = None, max_maps: int = 6) -> Path:
        return render_heatmaps(self, path, ranked, max_maps)


def view_region(source_size: tuple[int, int], preprocess_cfg: dict) -> tuple[float, float, float, float]:
    """(x0, y0, width, height) of the original image covered by the model's input (open_clip resize modes)."""
    width, height = source_size
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode == "squash":
        return 0.0, 0.0, float(width), float(height)
    side = max(width, height) if mode == "longest" else min(width, height)  # longest pads, shortest crops
    return (width - side) / 2.0, (height - side) / 2.0, float(side), float(side)


def _mean_std(preprocess_cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """([3], [3]) the normalization the encoder's preprocessing applies."""
    return (torch.tensor(preprocess_cfg.get("mean", (0.0, 0.0, 0.0)), dtype=torch.float32),
            torch.tensor(preprocess_cfg.get("std", (1.0, 1.0, 1.0)), dtype=torch.float32))


def model_view(tensor: torch.Tensor, preprocess_cfg: dict) -> Image.Image:
    """The preprocessed tensor [3, H, W] back to an RGB image (undo mean/std normalization)."""
    mean, std = _mean_std(preprocess_cfg)
    pixels = (tensor.float().cpu() * std[:, None, None] + mean[:, None, None]).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def explain(encoder, image, concepts: Sequence[str], scorer: ConceptScorer | None = None,
            stride: int | None = None) -> ConceptMaps:
    """Per-patch scores of ``concepts`` on one image (path, PIL image, DICOM path, array).

    ``stride`` (pixels of the model's input, dividing the patch): maps sampled every ``stride`` pixels instead
    of once per patch, by shift-and-stitch (``shifted_views``: (patch / stride)^2 forward passes). The image
    scores (and so the ranking) are the unshifted input's, whatever the stride.
    """
    scorer = scorer or ConceptScorer(encoder)
    names = [c.strip() for c in ([concepts] if isinstance(concepts, str) else concepts)]
    # The encoder's default intensity window applies to 16-bit and DICOM inputs, as in encode_image.
    window = getattr(encoder.preprocess, "window", None)
    source = load_image(image, window)  # PIL images too: upright (EXIF) and RGB, as encode_image sees them
    tensor = encoder.preprocess(source)
    steps, views = (1, 1), tensor[None]
    if stride is not None:  # only then must the grid tile the input (a CNN's grid may round up)
        patch = patch_pixels(encoder, tensor)
        steps = _shift_counts(patch, stride)
        views = torch.cat([views, shifted_views(tensor, patch, stride, black_pixel(encoder.preprocess_cfg))])
    image_scores, patch_scores = scorer.score(views, names)
    gh, gw = encoder.grid_size
    if patch_scores.shape[-1] != gh * gw:
        raise MedclipError(f"model returned {patch_scores.shape[-1]} patches for a {gh}x{gw} grid")
    maps = patch_scores[0] if steps == (1, 1) else stitch(patch_scores[1:], (gh, gw), steps)
    return ConceptMaps(names, maps.reshape(len(names), gh * steps[0], gw * steps[1]), image_scores[0],
                       model_view(tensor, encoder.preprocess_cfg), scorer.method, source.size,
                       view_region(source.size, encoder.preprocess_cfg))


def patch_pixels(encoder, tensor: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of input pixels per grid cell (a ViT's patch, a CNN's total stride)."""
    (gh, gw), (height, width) = encoder.grid_size, tensor.shape[-2:]
    if height % gh or width % gw:
        raise MedclipError(f"the {gh}x{gw} patch grid does not tile the {width}x{height} input")
    return height // gh, width // gw


def _shift_counts(patch: tuple[int, int], stride: int) -> tuple[int, int]:
    """Views per axis for maps every ``stride`` pixels."""
    if stride < 1 or patch[0] % stride or patch[1] % stride:
        raise MedclipError(f"stride must divide the model's {patch[1]}x{patch[0]}-pixel patch, got {stride}")
    return patch[0] // stride, patch[1] // stride


def black_pixel(preprocess_cfg: dict) -> torch.Tensor:
    """[3] the normalized value of a black pixel (what open_clip's letterbox padding fills)."""
    mean, std = _mean_std(preprocess_cfg)
    return -mean / std


def shifted_views(tensor: torch.Tensor, patch: tuple[int, int], stride: int, fill: torch.Tensor) -> torch.Tensor:
    """Shift-and-stitch (Long et al., FCN): [3, H, W] -> [n_rows * n_cols, 3, H, W], the input moved by whole
    pixels so that view (m_row, m_col) (row-major) has its grid cell i centred on input pixel
    ``stride * (n * i + m) + stride / 2`` on each axis (n = patch / stride; half a pixel further on, the same
    for every view, when patch - stride is odd). Pixels moved in from outside the input are ``fill``."""
    pad_y, pad_x = patch
    _, height, width = tensor.shape
    padded = fill.to(tensor)[:, None, None].expand(-1, height + 2 * pad_y, width + 2 * pad_x).clone()
    padded[:, pad_y:pad_y + height, pad_x:pad_x + width] = tensor
    # Floor, not round: Python rounds halves to even, which would give two views the same shift (stride 1).
    shifts = [[(p - stride) // 2 - m * stride for m in range(p // stride)] for p in patch]
    # Moving the content by (dy, dx): view[y, x] = input[y - dy, x - dx].
    return torch.stack([padded[:, pad_y - dy:pad_y - dy + height, pad_x - dx:pad_x - dx + width]
                        for dy in shifts[0] for dx in shifts[1]])


def stitch(view_scores: torch.Tensor, grid: tuple[int, int], steps: tuple[int, int]) -> torch.Tensor:
    """Scores of ``shifted_views`` [n_rows * n_cols, C, gh * gw] -> [C, gh * n_rows, gw * n_cols]: cell
    n * i + m of the fine grid is cell i of view m, on each axis."""
    (gh, gw), (n_rows, n_cols) = grid, steps
    concepts = view_scores.shape[1]
    cells = view_scores.reshape(n_rows, n_cols, concepts, gh, gw)
    return cells.permute(2, 3, 0, 4, 1).reshape(concepts, gh * n_rows, gw * n_cols)


def rank_concepts(encoder, image, vocabulary: Sequence[str], top_k: int = 10,
                  scorer: ConceptScorer | None = None) -> list[tuple[str, float]]:
    """The image's ``top_k`` concepts from ``vocabulary``, best first, with their scores."""
    scorer = scorer or ConceptScorer(encoder)
    scores, _ = scorer.score([image], list(vocabulary))
    values, index = scores[0].topk(min(top_k, scores.shape[1]))
    return [(vocabulary[i], float(v)) for v, i in zip(values.tolist(), index.tolist())]


def annotate_images(encoder, images: Sequence, concepts: Sequence[str], top_k: int = 5,
                    threshold: float | None = None, batch_size: int = 16) -> list[list[dict]]:
    """Zero-shot concept annotation: for each image, its concepts as ``{"name", "score"}`` best first.

    With PC-Align heads the score is a logit; ``threshold`` (e.g. 0.0, i.e. probability 0.5) keeps
    the concepts above it. Without heads scores are cosines and only ``top_k`` is meaningful.
    """
    scorer = ConceptScorer(encoder)
    names = list(concepts)
    concept_vecs = scorer.concept_vectors(names)
    out: list[list[dict]] = []
    for start in range(0, len(images), batch_size):  # patches of one batch at a time: bounded memory
        pooled, patches = scorer.image_features(list(images[start:start + batch_size]), batch_size)
        scores = scorer.image_scores(pooled, scorer.patch_scores(patches, concept_vecs), concept_vecs)
        for row in scores:
            order = torch.argsort(row, descending=True).tolist()
            picked = [{"name": names[i], "score": float(row[i])} for i in order
                      if threshold is None or float(row[i]) > threshold]
            out.append(picked[:top_k] if top_k else picked)
    return out


def render_heatmaps(maps: ConceptMaps, path: str | Path, ranked: list[tuple[str, float]] | None = None,
                    max_maps: int = 6, display_size: int = 256) -> Path:
    """PNG: the model's view of the image, each concept's map over it, and the ranked concepts."""
    matplotlib = require("matplotlib", "drawing concept heatmaps")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    shown = list(range(min(max_maps, len(maps.concepts))))
    panels = 1 + len(shown) + (1 if ranked else 0)
    cols = min(panels, 4)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    view = maps.image.resize((display_size, display_size), Image.BICUBIC)
    heat = maps.heatmaps((display_size, display_size)).numpy()
    lo, hi = float(heat.min()), float(heat.max())
    axes_flat = axes.ravel()
    axes_flat[0].imshow(view)
    axes_flat[0].set_title("image (model view)", fontsize=9)
    for slot, c in enumerate(shown, start=1):
        ax = axes_flat[slot]
        ax.imshow(view)
        im = ax.imshow(heat[c], cmap="jet", alpha=0.45, vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
        ax.set_title(f"{maps.concepts[c]}\n{maps.method} {float(maps.image_scores[c]):.3f}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    if ranked:
        ax = axes_flat[1 + len(shown)]
        lines = [f"{i + 1:2d}. {name}  {score:.3f}" for i, (name, score) in enumerate(ranked[:15])]
        ax.text(0.02, 0.98, "top concepts\n" + "\n".join(lines), va="top", ha="left", fontsize=8,
                family="monospace", transform=ax.transAxes)
    for ax in axes_flat:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
