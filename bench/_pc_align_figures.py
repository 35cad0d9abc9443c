"""Figures of bench/pc_align_value.py: the README's heatmaps, drawn from ``medclip explain`` on held-out images."""

from __future__ import annotations

import math
from pathlib import Path

FINDING_FIGURE_COLUMNS = 3


def render_figure(run_dir: Path, path: Path) -> None:
    """One image, several concepts: ``medclip explain`` on the first held-out CT slice with a pleural effusion."""
    import medclip
    from medclip.concepts.explain import explain, rank_concepts
    from medclip.data.demo import CUIS, iter_demo_split

    sample = next(s for s in iter_demo_split(run_dir / "demo_data", "val")
                  if s.labels["modality"] == "CT" and s.labels["finding"] == "pleural effusion")
    encoder = medclip.load(str(run_dir / "export"), device="cpu")
    concepts = ["pleural effusion", "nodule", "mass", "cardiomegaly", "hemorrhage"]
    maps = explain(encoder, sample.image, concepts)
    maps.save_png(path, rank_concepts(encoder, sample.image, sorted(CUIS), top_k=9))
    print(f"figure: {path} (held-out {sample.key}: {sample.captions[0]})")


def first_per_finding(data_dir: Path) -> list[tuple]:
    """(sample, finding, box) for the first held-out sample (key order) of each boxed finding of a demo set,
    in the demo set's order of findings."""
    from medclip.data.demo import CUIS, iter_demo_split

    found = {}
    for sample in iter_demo_split(data_dir, "val"):
        for box in sample.boxes:
            found.setdefault(box["name"], (sample, box["name"], box["bbox"]))
    return [found[name] for name in CUIS if name in found]


def render_findings_figure(run_dir: Path, path: Path, stride: int | None = None) -> list[bool]:
    """One held-out image per finding with the run's map of that finding (``medclip explain``: the PC-Align
    heads when the export has them; every ``stride`` pixels, default one cell per patch), its box, the image-level score and whether the map's maximum lies in the
    box (pointing game, tolerance 0). Returns the hits, panel by panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    import medclip
    from medclip.concepts.explain import explain
    from medclip.concepts.grounding import pointing_game

    encoder = medclip.load(str(run_dir / "export"), device="cpu")
    panels = first_per_finding(run_dir / "demo_data")
    hits = []
    rows = math.ceil(len(panels) / FINDING_FIGURE_COLUMNS)
    fig, axes = plt.subplots(rows, FINDING_FIGURE_COLUMNS, figsize=(3.0 * FINDING_FIGURE_COLUMNS, 3.2 * rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (sample, name, bbox) in zip(axes.ravel(), panels):
        maps = explain(encoder, sample.image, [name], stride=stride)
        heat = maps.source_heatmaps()[0]
        hit = pointing_game(heat, bbox)
        hits.append(hit)
        ax.imshow(sample.image)
        ax.imshow(heat.numpy(), cmap="jet", alpha=0.45)
        # The pixels the pointing game counts (every pixel the box touches), and a maximum inside them on a hit.
        left, top, right, bottom = math.floor(bbox[0]), math.floor(bbox[1]), math.ceil(bbox[2]), math.ceil(bbox[3])
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False, edgecolor="white",
                               linewidth=1.5))
        peaks = (heat == heat.max()).nonzero().tolist()
        inside = [(r, c) for r, c in peaks if top <= r < bottom and left <= c < right]
        row, col = (inside if hit else peaks)[0]
        ax.plot([col], [row], marker="+", color="white", markersize=10, markeredgewidth=2)
        ax.set_title(f"{name} ({sample.labels['modality']})\nscore {float(maps.image_scores[0]):.2f}, "
                     f"{'hit' if hit else 'miss'}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"figure: {path} (first held-out image of each finding, {run_dir}, stride {stride}): "
          f"{sum(hits)}/{len(hits)} hits")
    return hits
