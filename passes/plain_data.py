"""Frozen records <-> plain JSON values, generically over dataclass fields.

Plans are saved as JSON, never pickle. The records a plan holds (``ShardingPlan``,
``Strategy``, the layouts ``S(d)`` / ``R`` / ``P``, ``Reshard`` ...) are frozen dataclasses,
so one encoder walks their fields instead of a hand-written ``to_dict`` per class: a new
layout or strategy kind (an expert-parallel layout, a table-wise embedding) serializes
without a special case, as long as its fields are made of the values below.

Encoding::

    dataclass      {"$type": "Shard", "dim": 1}        (init fields, by name)
    tuple / list   JSON list                           (decoded as a tuple: records are frozen)
    Mapping        JSON object with string keys        (decoded as a read-only mapping)
    torch.dtype    {"$dtype": "bfloat16"}
    enum member    {"$enum": "OpKind", "value": ...}
    inf / nan      {"$float": "inf"}                   (strict JSON has no Infinity)
    str, int, float, bool, None as themselves

Decoding instantiates only classes the caller lists (``types``): a plan file can name no
other class, so reading one never runs code it brings.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch

__all__ = ["PlainDataError", "from_plain", "record_types", "to_plain"]

_MARKERS = ("$type", "$dtype", "$enum", "$float")


class PlainDataError(ValueError):
    """A value that has no plain-JSON form, or plain data that names an unknown record."""


def to_plain(value: Any, where: str = "value") -> Any:
    """``value`` as JSON-ready data (see the module doc); ``where`` names it in errors."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return {"$enum": type(value).__name__, "value": to_plain(value.value, where)}
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(value)}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        encoded = {"$type": type(value).__name__}
        for f in dataclasses.fields(value):
            if f.init:
                encoded[f.name] = to_plain(getattr(value, f.name), f"{where}.{f.name}")
        return encoded
    if isinstance(value, Mapping):
        encoded = {}
        for key, item in value.items():
            if not isinstance(key, str) or key in _MARKERS:
                raise PlainDataError(f"{where}: mapping key {key!r} has no plain-JSON form (keys must be strings, not {_MARKERS})")
            encoded[key] = to_plain(item, f"{where}[{key!r}]")
        return encoded
    if isinstance(value, (tuple, list)):
        return [to_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise PlainDataError(f"{where}: a {type(value).__name__} has no plain-JSON form")


def from_plain(data: Any, types: Mapping[str, type], where: str = "value") -> Any:
    """The value :func:`to_plain` encoded; records only of the classes in ``types``."""
    if data is None or isinstance(data, (bool, str, int, float)):
        return data
    if isinstance(data, list):
        return tuple(from_plain(item, types, f"{where}[{i}]") for i, item in enumerate(data))
    if not isinstance(data, dict):
        raise PlainDataError(f"{where}: unexpected {type(data).__name__} in plain data")
    if "$type" in data:
        name = data["$type"]
        cls = types.get(name)
        if cls is None:
            raise PlainDataError(f"{where}: unknown record type {name!r} (this partc knows {', '.join(sorted(types))})")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        given = {k: v for k, v in data.items() if k != "$type"}
        unknown = set(given) - known
        if unknown:
            raise PlainDataError(f"{where}: {name} has no field(s) {sorted(unknown)}")
        try:
            return cls(**{k: from_plain(v, types, f"{where}.{k}") for k, v in given.items()})
        except TypeError as e:  # a required field is missing
            raise PlainDataError(f"{where}: cannot rebuild {name}: {e}") from e
    if "$dtype" in data:
        dtype = getattr(torch, str(data["$dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise PlainDataError(f"{where}: unknown dtype {data['$dtype']!r}")
        return dtype
    if "$enum" in data:
        cls = types.get(data["$enum"])
        if cls is None or not issubclass(cls, enum.Enum):
            raise PlainDataError(f"{where}: unknown enum {data['$enum']!r}")
        return cls(from_plain(data["value"], types, where))
    if "$float" in data:
        return float(data["$float"])
    return MappingProxyType({key: from_plain(item, types, f"{where}[{key!r}]") for key, item in data.items()})


def record_types(*modules: Any, extra: Iterable[type] = ()) -> dict[str, type]:
    """The public dataclasses and enums defined in or imported into ``modules``, by name:
    what :func:`from_plain` may rebuild. Read when called, so kinds added later count."""
    found: dict[str, type] = {}
    for module in modules:
        for name, obj in vars(module).items():
            if isinstance(obj, type) and not name.startswith("_") and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                found[obj.__name__] = obj
    for cls in extra:
        found[cls.__name__] = cls
    return found
