"""Registers medclip's model configs with open_clip the moment open_clip is imported.

``import medclip`` must stay free of torch (the CLI's start-up time), yet open_clip users rely on
``import medclip`` making ``open_clip.create_model("medclip-tiny")`` work. So registration waits
for open_clip: at once if it is already imported, else right after its first import, through a
one-shot import hook (the standard post-import-hook pattern on :data:`sys.meta_path`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "open_clip"


def _register_now() -> None:
    from medclip.models.registry import register_model_configs

    register_model_configs()


class _RegisterAfterExec(importlib.abc.Loader):
    """Wraps open_clip's loader: execute the module, then register medclip's configs."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register_now()

    def __getattr__(self, name):  # resource readers and the rest of the loader protocol
        return getattr(self._loader, name)


class _OpenClipImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET:
            return None
        uninstall()
        spec = importlib.util.find_spec(fullname)  # the remaining finders, as the import would
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_hook = _OpenClipImportHook()


def install() -> None:
    """Register now if open_clip is loaded, else once it is."""
    if TARGET in sys.modules:
        _register_now()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def uninstall() -> None:
    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
