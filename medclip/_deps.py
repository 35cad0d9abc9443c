"""Optional dependencies: the packages of ``pip install 'medclip-torch[train]'``.

The core install loads models, embeds and runs zero-shot classification and retrieval. Training,
shard building, concept annotation and plots import their packages through :func:`require`, so a
core-only install that reaches them gets one line naming the extra instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medclip.errors import MedclipError

EXTRA = "train"
# import name -> distribution name, for the modules of the extra
DISTRIBUTIONS = {
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "matplotlib": "matplotlib",
    "ahocorasick": "pyahocorasick",
    "imagehash": "imagehash",
    "peft": "peft",
}


def missing_extra(module: str, purpose: str) -> MedclipError:
    """The one-line error for a module of the extra that is not installed."""
    top = module.split(".")[0]
    return MedclipError(f"{purpose} needs {DISTRIBUTIONS.get(top, top)}, which is not installed: "
                        f"pip install 'medclip-torch[{EXTRA}]'")


def require(module: str, purpose: str) -> ModuleType:
    """``import module``; a missing module of the extra is a MedclipError naming the extra.

    ``purpose`` says what needs it ("reading shards"). An import failing inside the package itself
    (it is installed but broken) is re-raised as is.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise
        raise missing_extra(module, purpose) from None
