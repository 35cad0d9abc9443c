"""`medclip info` (versions, devices, what is shipped) and `medclip list recipes|suites|manifests|models|pretrained`."""

from __future__ import annotations

import importlib.metadata
import platform
from functools import partial

from medclip import resources
from medclip.errors import MedclipError

PACKAGES = ["torch", "torchvision", "open_clip_torch", "timm", "transformers", "webdataset", "scikit-learn",
            "safetensors", "numpy", "pydicom", "xformers", "tensorboard", "wandb"]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def devices() -> list[str]:
    import torch

    found = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


# ------------------------------------------------------------------ what `medclip list` shows

def _shipped_rows(kind: str, paths: bool = False) -> list[tuple[str, str]]:
    return [(name, str(path) if paths else resources.describe(path))
            for name, path in resources.shipped(kind).items()]


def _model_rows(paths: bool = False) -> list[tuple[str, str]]:
    import medclip

    return [(name, "") for name in medclip.list_models()]


def _pretrained_rows(paths: bool = False) -> list[tuple[str, str]]:
    from medclip.models.pretrained import ENTRIES

    return [(e.name, f"{e.title}, {e.url}{' (gated)' if e.gated else ''}, licence {e.licence}")
            for e in ENTRIES.values()]


SECTIONS = {
    "recipes": (partial(_shipped_rows, "recipes"), "pretraining recipes: medclip pretrain --config NAME"),
    "suites": (partial(_shipped_rows, "suites"), "evaluation suites: medclip eval suite NAME --model M"),
    "manifests": (partial(_shipped_rows, "manifests"), "dataset manifests: medclip data check NAME --root DIR"),
    "models": (_model_rows, "architectures: medclip.load(NAME) (random weights)"),
    "pretrained": (_pretrained_rows, "named pretrained checkpoints: medclip.load(NAME)"),
}


def format_rows(rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(name) for name, _ in rows), default=0)
    return [f"  {name:{width}s}  {text}".rstrip() for name, text in rows]


def run_list(args) -> int:
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        raise MedclipError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    for section in args.sections or list(SECTIONS):
        rows_of, title = SECTIONS[section]
        rows = rows_of(paths=args.paths)
        print(f"{section} ({title}):")
        print("\n".join(format_rows(rows)) if rows else "  (none)")
    return 0


def run(args) -> int:
    import medclip

    print(f"medclip {medclip.__version__} (python {platform.python_version()}, {platform.platform()})")
    for name, version in package_versions().items():
        print(f"  {name:16s} {version}")
    print("devices:")
    for device in devices():
        print(f"  {device}")
    print("registered models:")
    for name in medclip.list_models():
        print(f"  {name}")
    print("pretrained models (medclip.load(NAME); offline: medclip.load(NAME, checkpoint=PATH)):")
    for line in pretrained_lines():
        print(f"  {line}")
    for kind in ("recipes", "suites", "manifests"):
        folder = resources.shipped_dir(kind)
        print(f"shipped {kind} ({folder or 'none'}): {', '.join(resources.shipped(kind)) or 'none'}")
    return 0


def pretrained_lines() -> list[str]:
    from medclip.models.pretrained import ENTRIES

    lines = []
    for entry in ENTRIES.values():
        lines.append(f"{entry.name:32s} {entry.title}: {entry.architecture}")
        lines.append(f"{'':32s} {entry.url}{' (gated)' if entry.gated else ''} | licence: {entry.licence}")
        lines.append(f"{'':32s} cite: {entry.citation}")
        if entry.inferred:
            lines.append(f"{'':32s} inferred: {entry.inferred}")
    return lines


def register(subparsers) -> None:
    parser = subparsers.add_parser("info", help="print versions, devices, registered models and shipped files")
    parser.set_defaults(func=run)
    lister = subparsers.add_parser("list", help="list shipped recipes, suites, manifests, models, pretrained")
    lister.add_argument("sections", nargs="*", metavar="SECTION",
                        help=f"one or more of {', '.join(SECTIONS)} (default: all)")
    lister.add_argument("--paths", action="store_true", help="show where each shipped file is (to copy and edit it)")
    lister.set_defaults(func=run_list)
