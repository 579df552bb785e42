"""`--config PATH --config.field=value` handling for ml_collections config files.

Overrides are parsed by the type of the field they replace (a tuple field accepts `2.5` or
`(2.0,2.5)`), and an unknown field is an error that lists the known ones — instead of the bare
AttributeError that absl's config flags give.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

import ml_collections

from bitsmoe_jax.run.config_schema import field_node


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} not found")
    spec = importlib.util.spec_from_file_location(f"_bitsmoe_config_{p.stem}", p)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise AttributeError(f"config file {p} defines no get_config()")
    return mod.get_config()


def _parse(raw: str, current: Any, field: str) -> Any:
    if isinstance(current, str):
        return raw
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # e.g. a bare word for a field that may also be a string ("auto")
    if isinstance(current, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise ValueError(f"--config.{field}: expected True or False, got {raw!r}")
    elif isinstance(current, tuple) and isinstance(value, (int, float)):
        return (value,)
    elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return tuple(value) if isinstance(value, list) else value


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: list[str]
) -> ml_collections.ConfigDict:
    """Apply `field=value` strings (the part after `--config.`)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--config.{item}: expected --config.field=value")
        key, raw = item.split("=", 1)
        # "distributed.auto" is field auto of the nested cfg.distributed
        node, name = field_node(cfg, key)
        value = _parse(raw, node[name], key)
        try:
            with node.unlocked():
                node[name] = value
        except TypeError as e:  # ml_collections refuses a value of another type than the field's
            raise ValueError(
                f"--config.{key}={raw!r}: expected a value of type {type(cfg[key]).__name__} ({e})"
            ) from None
    return cfg


def parse_config_args(argv: list[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(config, remaining args) from `--config PATH [--config.x=y ...]`."""
    path, overrides, rest = None, [], []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a == "--config":
            path = argv[i + 1] if i + 1 < len(argv) else None
            next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--config."):
            overrides.append(a[len("--config.") :])
        else:
            rest.append(a)
    if path is None:
        raise ValueError("missing --config PATH (e.g. --config configs/tiny.py)")
    return apply_overrides(load_config_file(path), overrides), rest
