"""Recipe values: YAML or ``--set`` text checked and converted to the declared types of the recipe's dataclasses,
with a one-line error naming the key for a value of the wrong kind."""

from __future__ import annotations

import dataclasses
import types
import typing

import yaml

from medclip.errors import MedclipError


def _is_optional(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def coerce_value(value, tp, where: str):
    """Check/convert one YAML or command-line value to the field's declared type."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MedclipError(f"recipe key {where}: expected a mapping, got {value!r}")
        return build_section(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise MedclipError(f"recipe key {where}: expected a list, got {value!r}")
        return [coerce_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        return _coerce_mapping(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise MedclipError(f"recipe key {where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise MedclipError(f"recipe key {where}: expected a number, got {value!r}")
        try:
            number = float(value)
            if tp is int and number != int(number):
                raise ValueError
            return tp(int(number)) if tp is int else number
        except (TypeError, ValueError, OverflowError):  # int(inf) overflows, int(nan) is a ValueError
            raise MedclipError(f"recipe key {where}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise MedclipError(f"recipe key {where}: expected a string, got {value!r}")
        return str(value)
    raise MedclipError(f"recipe key {where}: unsupported type {tp}")


def _coerce_mapping(value, tp, where: str) -> dict:
    """A ``dict[str, ...]`` recipe value; keys YAML reads as booleans, null or dates (yes, no, null, 2020-01-01)
    would silently match no string, so they stop with one line."""
    _, value_tp = typing.get_args(tp)
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise MedclipError(f"recipe key {where}: not a YAML mapping: {' '.join(str(exc).split())}") from None
    if not isinstance(value, dict):
        raise MedclipError(f"recipe key {where}: expected a mapping, got {value!r}")
    for key in value:
        if isinstance(key, bool) or not isinstance(key, (str, int, float)):
            raise MedclipError(f"recipe key {where}: key {key!r} is not text (YAML reads yes/no/on/off/null and "
                               f"dates as other types): quote it, e.g. \"yes\": ...")
    return {str(k): coerce_value(v, value_tp, f"{where}.{k}") for k, v in value.items()}


def build_section(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise MedclipError(f"unknown recipe key {where}{unknown[0]} (valid keys here: {', '.join(sorted(names))})")
    kwargs = {k: coerce_value(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MedclipError(f"recipe section {prefix or 'top level'}: {exc}") from exc
