"""What a run checks before it builds anything: every name, path, package and byte it will need.

A run that would otherwise stop on a misspelt suite after its last step, or on a full disk at its
first checkpoint, stops here instead with one line listing every problem found. The checks are
cheap (file lookups, one model built on the ``meta`` device to count its parameters), and they
do not replace the errors raised later; they move them before the first step.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path

from medclip._deps import require
from medclip.errors import MedclipError, os_error_line

braceexpand = require("braceexpand", "expanding shard URL patterns")

log = logging.getLogger(__name__)

# Bytes per parameter of one checkpoint plus the export written beside it: fp32 weights (4) and
# AdamW's two moments (8) in the checkpoint, the weights again (4) in the export.
BYTES_PER_PARAMETER = 16
SPACE_MARGIN = 1.1

# Recipe switches that need a package installed: (is it on?, package, how to get it or turn it off).
OPTIONAL_PACKAGES = [
    (lambda r: r.run.wandb, "wandb", "pip install wandb, or set run.wandb: false"),
    (lambda r: r.model.attention == "xformers", "xformers",
     "pip install 'medclip-torch[gpu]', or set model.attention: sdpa"),
    (lambda r: r.model.lora.rank > 0, "peft", "pip install 'medclip-torch[train]', or set model.lora.rank: 0"),
]


def check(recipe, is_main: bool = True) -> None:
    """Raise one MedclipError listing everything the run would fail on later; return if all is well.

    Evaluation data the run writes itself (the demo set under the output directory) is checked by
    :func:`check_made_data` once the run has prepared its data, still before the first step.
    """
    problems: list[str] = []
    problems += check_packages(recipe)
    problems += check_start_weights(recipe)
    problems += check_manifests(recipe)
    problems += check_eval_data(recipe, made_by_run=False)
    if is_main:  # only rank 0 writes the run's files
        output_problems = check_output_dir(recipe.output_dir)
        problems += output_problems or check_disk_space(recipe)
    _raise(problems)


def check_made_data(recipe) -> None:
    """After data preparation: the evaluation data the run was to write itself is there, and no training
    image is a copy of an evaluation image (``data.leakage_check``)."""
    problems = check_eval_data(recipe, made_by_run=True)
    _raise(problems or check_leakage(recipe))


def _raise(problems: list[str]) -> None:
    if problems:
        raise MedclipError(f"the run cannot start: {'; '.join(problems)}")


def _expand(text: str | None, output_dir: Path) -> str | None:
    return text.replace("{output_dir}", str(output_dir)) if text else text


# ------------------------------------------------------------------ packages

def check_packages(recipe) -> list[str]:
    return [f"{package} is not installed ({fix})" for enabled, package, fix in OPTIONAL_PACKAGES
            if enabled(recipe) and importlib.util.find_spec(package) is None]


def check_start_weights(recipe) -> list[str]:
    """model.checkpoint names something on disk (a file or directory, or the PATH of a zoo model's NAME=PATH), or
    a zoo model by name alone (medclip.load finds its snapshot in the Hugging Face cache, or downloads it)."""
    from medclip.models import pretrained

    spec = recipe.model.checkpoint
    if not spec or pretrained.get(spec) is not None:
        return []
    name, sep, path = spec.partition("=")
    where = path if sep and pretrained.get(name) is not None else spec
    if Path(where).exists():
        return []
    return [f"model.checkpoint {where} does not exist (set model.checkpoint to a medclip export directory, a "
            f"weights file, a zoo model's name (medclip.list_pretrained()), or NAME=PATH for its local snapshot)"]


# ------------------------------------------------------------------ training data

def check_manifests(recipe) -> list[str]:
    """Every source's manifest resolves and parses, and some of its local shards exist."""
    from medclip.data.manifest import is_local, load_manifest

    problems = []
    for source in recipe.data.sources:
        try:
            manifest = load_manifest(_expand(source.manifest, recipe.output_dir),
                                     root=_expand(source.root, recipe.output_dir))
        except MedclipError as exc:
            problems.append(str(exc))
            continue
        local = [u for u in manifest.urls if is_local(u)]
        if local and len(local) == len(manifest.urls) and not any(Path(u).is_file() for u in local):
            problems.append(f"manifest {manifest.name}: none of its {len(local)} shards exist (first: {local[0]}); "
                            f"set the data root (the source's `root`, or MEDCLIP_DATA_ROOT)")
    for spec in recipe.data.build:
        table = _expand(spec.input, recipe.output_dir)
        if not Path(table).is_file():
            problems.append(f"data.build {spec.name}: input table not found: {table}")
    return problems


# ------------------------------------------------------------------ evaluation data

def _made_by_the_run(recipe, root: Path) -> bool:
    """Evaluation data under the output directory is written by the run itself (demo set, built shards)."""
    inside = Path(recipe.output_dir).resolve() in root.resolve().parents or root.resolve() == Path(
        recipe.output_dir).resolve()
    return inside and (recipe.data.demo or bool(recipe.data.build))


def _matches(pattern: Path) -> bool:
    return any(glob.glob(p) or os.path.exists(p) for p in braceexpand.braceexpand(str(pattern)))


def check_eval_data(recipe, made_by_run: bool) -> list[str]:
    """Every suite resolves, has a data root, and every dataset's files are there.

    ``made_by_run`` selects the suites whose data root the run writes itself (else the others).
    """
    from medclip.evaluation.suites import load_suite

    problems = []
    root_text = _expand(recipe.eval.root, recipe.output_dir)
    for name in recipe.eval.suites:
        try:
            suite = load_suite(name)
        except MedclipError as exc:
            if not made_by_run:
                problems.append(str(exc))
            continue
        root = Path(root_text) if root_text else suite.root
        if root is None:
            if not made_by_run:
                problems.append(f"suite {suite.name} has no data root: set eval.root to the folder holding its data")
            continue
        if _made_by_the_run(recipe, root) != made_by_run:
            continue
        if not root.is_dir():
            problems.append(f"suite {suite.name}: data root {root} does not exist (set eval.root)")
            continue
        missing = [(spec.name, root / path) for spec in suite.datasets
                   for source in (spec.source, spec.train, spec.val) if source is not None
                   for path in [(source.args or {}).get("path")] if path and not _matches(root / path)]
        if missing:
            names = list(dict.fromkeys(name for name, _ in missing))  # in suite order
            problems.append(f"suite {suite.name}: no data for {len(names)} of its {len(suite.datasets)} datasets "
                            f"under {root} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}; first "
                            f"missing: {missing[0][1]}); set eval.root to the folder holding them")
    return problems


# ------------------------------------------------------------------ leakage

def training_manifests(recipe) -> list[str]:
    """The manifests the run trains on, once its data is prepared (built tables, the demo set, sources)."""
    from medclip.training.components import demo_dir

    out = Path(recipe.output_dir)
    paths = [str(demo_dir(out) / "demo-train.yaml")] if recipe.data.demo else []
    paths += [str(out / "shards" / spec.name / f"{spec.name}.yaml") for spec in recipe.data.build]
    return paths + [_expand(source.manifest, out) for source in recipe.data.sources]


def check_leakage(recipe) -> list[str]:
    """``data.leakage_check``: the training images against its evaluation sides; a problem unless allowed."""
    from medclip.data.leakage import check_leakage as run_check
    from medclip.data.leakage_sources import open_side

    cfg = recipe.data.leakage_check
    if not cfg.against:
        return []
    out = Path(recipe.output_dir)
    roots = {_expand(source.manifest, out): _expand(source.root, out) for source in recipe.data.sources}
    train = [open_side(m, roots.get(m), recipe.data.allow_pipe) for m in training_manifests(recipe)]
    against = [open_side(_expand(a, out), _expand(recipe.eval.root, out)) for a in cfg.against]
    report = run_check(train, against, cfg.max_distance, workers=min(2, os.cpu_count() or 1))
    log.info("leakage check: %s", report.summary())
    if not report.findings:
        return []
    first = report.findings[0].line().removeprefix("LEAK ")
    if cfg.allow_leakage:
        log.warning("leakage check: %d training images match evaluation images (first: %s); training anyway "
                    "(data.leakage_check.allow_leakage)", len(report.findings), first)
        return []
    return [f"{len(report.findings)} training images match evaluation images (first: {first}); list them with "
            f"`medclip data leakage`, or set data.leakage_check.allow_leakage: true to train anyway"]


# ------------------------------------------------------------------ output directory and disk

def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _missing_parents(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    existing = _nearest_existing(folder)
    return [p for p in (folder, *folder.parents) if existing in p.parents]


def check_output_dir(output_dir: Path) -> list[str]:
    """The output directory can be created and written (probed with a small file, then tidied away)."""
    output_dir = Path(output_dir)
    created = _missing_parents(output_dir)
    probe = output_dir / f".medclip-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [f"run.output_dir {output_dir} is not writable: {os_error_line(exc) or exc}"]
    finally:  # a run stopped by another check leaves no empty folders behind
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
    return []


def count_parameters(recipe) -> int:
    """Parameters of the recipe's model, counted on the ``meta`` device (no memory, no weights)."""
    import torch

    from medclip.models.loading import build_model, resolve_config

    cfg = resolve_config(recipe.model.name, recipe.model.hf_text_dir)
    with torch.device("meta"):
        model = build_model(cfg, device="meta")
    return sum(p.numel() for p in model.parameters())


def check_disk_space(recipe) -> list[str]:
    """Room for one checkpoint and the export, estimated from the model's parameter count."""
    try:
        parameters = count_parameters(recipe)
    except MedclipError as exc:
        return [str(exc)]
    except Exception as exc:  # an architecture that cannot be built on `meta`: the real build decides
        log.debug("cannot count parameters on the meta device (%s); disk space not checked", exc)
        return []
    need = int(parameters * BYTES_PER_PARAMETER * SPACE_MARGIN)
    free = shutil.disk_usage(_nearest_existing(Path(recipe.output_dir))).free
    if free < need:
        return [f"not enough disk space in {recipe.output_dir}: a checkpoint and the export of "
                f"{recipe.model.name} ({parameters / 1e6:.1f}M parameters) need about {_gb(need)}, "
                f"{_gb(free)} is free (free space or choose another run.output_dir)"]
    return []


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"
