"""`medclip info`: versions, devices and registered models, for bug reports and sanity checks."""

from __future__ import annotations

import importlib.metadata
import platform

import torch

PACKAGES = ["torch", "torchvision", "open_clip_torch", "timm", "transformers", "webdataset", "scikit-learn",
            "safetensors", "numpy", "pydicom", "xformers"]


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def devices() -> list[str]:
    found = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


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
    parser = subparsers.add_parser("info", help="print versions, devices and registered models")
    parser.set_defaults(func=run)
