"""Lazy package namespaces (PEP 562): a package's public names are imported on first access.

Keeps ``import medclip`` and the command-line parser free of torch. A package lists its public
names as ordinary imports under ``if TYPE_CHECKING:`` (so type checkers and readers see them), then
calls :func:`attach`; at run time those imports are read from the package's source and each name
is imported from its module when first used. Any submodule is reachable as an attribute too.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path


class LazyPackage(types.ModuleType):
    """Module type of a package whose public names load on first access."""

    _lazy_names: dict[str, tuple[str, str]]

    def __getattr__(self, name: str):  # called only when normal lookup fails
        names = self.__dict__.get("_lazy_names", {})
        if name in names:
            module, attribute = names[name]
            value = getattr(importlib.import_module(module), attribute)
        elif not name.startswith("__") and importlib.util.find_spec(f"{self.__name__}.{name}") is not None:
            value = importlib.import_module(f"{self.__name__}.{name}")
        else:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        types.ModuleType.__setattr__(self, name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        # Importing submodule `retrieval` binds it on the package; an eager
        # `from .retrieval import retrieval` would have rebound the name to the function. Keep the function.
        names = self.__dict__.get("_lazy_names", {})
        if isinstance(value, types.ModuleType) and name in names and value.__name__ == f"{self.__name__}.{name}":
            return
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_lazy_names", {})))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def type_checking_imports(source: str) -> dict[str, tuple[str, str]]:
    """``{name: (module, attribute)}`` for the absolute from-imports under ``if TYPE_CHECKING:``."""
    names: dict[str, tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.level == 0 and statement.module:
                    for alias in statement.names:
                        names[alias.asname or alias.name] = (statement.module, alias.name)
    return names


def attach(package_name: str) -> None:
    """Make the names the package imports under ``if TYPE_CHECKING:`` lazy attributes of it."""
    package = sys.modules[package_name]
    names = type_checking_imports(Path(package.__file__).read_text(encoding="utf-8"))
    package.__class__ = LazyPackage
    package._lazy_names = names
    if not hasattr(package, "__all__"):
        package.__all__ = sorted(names)
