"""Code a recipe reaches by name: a registered name or `module:attribute` (as reward plugins are
named, rewards/api.py).

The trainer imports no data world, judge or model provider of its own accord: a recipe names them
(`data.generator`, `pretrain.provider`, `rewards.judge.backend`), and the module is imported when
the name is resolved. So a run on an image folder never imports the shapes world (rl/shapes/).

    resolve("shapes", {"shapes": "rl.shapes.source:ShapesWorld"}, "data.generator")  # the class
    resolve("my_pkg.worlds:make_world", {}, "data.generator")                       # any importable one
"""
from __future__ import annotations

import importlib
from typing import Any


class UnknownName(ValueError):
    """A name that is neither registered nor an importable `module:attribute`; names the field."""


def resolve(spec: str, registry: dict[str, str], field: str) -> Any:
    """The object `spec` names: `registry[spec]` (itself `module:attribute`) or `spec` as
    `module:attribute` (dotted attribute paths allowed). UnknownName naming `field` otherwise."""
    target = registry.get(spec, spec)
    known = f"registered: {', '.join(sorted(registry))}" if registry else "none registered"
    if not isinstance(target, str) or ":" not in target:
        raise UnknownName(f"{field}: {spec!r} is neither a registered name ({known}) nor `module:attribute`")
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownName(f"{field}: {spec!r}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownName(f"{field}: {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UnknownName(f"{field}: {spec!r} names {type(obj).__name__}, not something callable")
    return obj
