"""Tables of bench/pc_align_value.py: the pointing-game table (references and variants, mean ± sd over seeds)
and the per-concept table."""

from __future__ import annotations

import statistics

COLUMNS = [  # (key, header)
    ("pg0", "pointing game, tol 0"),
    ("pg1", "pointing game, tol 1 patch"),
    ("pg0_prior_missed", "tol 0, on boxes the prior misses"),
    ("energy", "energy in box"),
    ("concept_auc", "concept AUC"),
    ("modality_acc", "modality acc"),
    ("finding_bacc", "finding bal. acc"),
    ("image_r5", "image R@5"),
]

def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def table_rows(refs: list[dict], results: dict, variants: list[str]) -> list[tuple[str, dict[str, list[float]]]]:
    """(row label, {column: per-seed values}) in the table's order; ``refs``: each seed's reference_scores."""
    rows = []

    def collect(label, seed_results):
        values = {key: [] for key, _ in COLUMNS}
        for seed_result in seed_results:
            for key in values:
                if seed_result.get(key) is not None:
                    values[key].append(seed_result[key])
        rows.append((label, values))

    for kind, label in REFERENCE_ROWS.items():
        collect(label, [ref[kind] for ref in refs])
    for variant in variants:
        runs = results.get(variant, {}).values()
        for method in ("heads", "cosine"):
            if runs and all(method in r["scores"] for r in runs):
                label = f"{variant}: {'PC-Align heads' if method == 'heads' else 'patch-text cosine'}"
                collect(label, [{**r["scores"][method], **r["suite"]} for r in runs])
    return rows


REFERENCE_ROWS = {"random": "chance (uniformly random point)", "centre": "image centre",
                  "prior": "concept prior (its training boxes' coverage)"}


def print_table(rows, title: str) -> str:
    lines = [f"### {title}\n", "| row | seeds | " + " | ".join(h for _, h in COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for label, values in rows:
        seeds = max(len(v) for v in values.values())
        lines.append(f"| {label} | {seeds} | " + " | ".join(mean_sd(values[k]) for k, _ in COLUMNS) + " |")
    pg0 = {label: statistics.fmean(v["pg0"]) for label, v in rows if v["pg0"]}
    heads, it_only = pg0.get("pc_align: PC-Align heads"), pg0.get("it_only: patch-text cosine")
    chance, prior = pg0[REFERENCE_ROWS["random"]], pg0[REFERENCE_ROWS["prior"]]
    lines.append(f"\nconcept prior / chance at tolerance 0: {prior / chance:.2f}x")
    if heads is not None and it_only:
        lines.append(f"pointing game at tolerance 0, PC-Align heads / IT-only cosine: {heads / it_only:.2f}x; "
                     f"/ chance: {heads / chance:.2f}x; / concept prior: {heads / prior:.2f}x")
    text = "\n".join(lines)
    print(text)
    return text


def per_concept_table(refs: list[dict], results: dict) -> str:
    """Pointing game at tolerance 0 per concept (mean over seeds): where the heads beat the prior and where not.
    Each seed draws its own data; the box counts are the first seed's."""
    counts = refs[0]["prior"]["per_concept_n"]
    columns = [("chance", [ref["random"] for ref in refs]), ("concept prior", [ref["prior"] for ref in refs])]
    for header, variant, method in (("PC-Align heads", "pc_align", "heads"), ("IT-only cosine", "it_only", "cosine")):
        if results.get(variant):
            columns.append((header, [r["scores"][method] for r in results[variant].values()]))
    lines = ["| concept (boxes, first seed) | " + " | ".join(c[0] for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for concept in sorted(counts):
        cells = [mean_sd([s["per_concept_pg0"][concept] for s in seeds if concept in s["per_concept_pg0"]])
                 for _, seeds in columns]
        lines.append(f"| {concept} ({counts[concept]}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    return text
