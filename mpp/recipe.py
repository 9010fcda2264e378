"""The recipe loader: YAML recipes checked against dataclass schemas (the stages' own are in mpp/config.py).

A recipe may name `_base_:` (a path relative to the recipe, or a list of them) whose keys
it overrides; command-line `dotted.key=value` pairs override the result. Every key is
checked against the schema: an unknown key fails naming the closest valid key, a value of
the wrong type fails naming the key and the type it needs.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message says how to fix it."""


def read_recipe(path: str | Path, _seen: tuple = ()) -> dict:
    """Load a YAML recipe, merging the `_base_` chain beneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} not found")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {str(path)!r} inherits from itself through _base_")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise yaml_error(f"recipe {str(path)!r}", err) from None
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a mapping of keys to values")
    bases = data.pop("_base_", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_recipe(path.parent / base, _seen + (path.resolve(),)))
    return deep_merge(merged, data)


def yaml_error(where: str, err: yaml.YAMLError) -> ConfigError:
    """One line for YAML that does not parse: where (line, column), what is wrong, and in what."""
    mark, context_mark = getattr(err, "problem_mark", None), getattr(err, "context_mark", None)
    place = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
    context = getattr(err, "context", None)
    if context:
        what += f" ({context}" + (f" from line {context_mark.line + 1}, column {context_mark.column + 1}"
                                  if context_mark else "") + ")"
    return ConfigError(f"{where}{place}: {what}; fix the YAML there")


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings; values are parsed as YAML (so `1e-4`, `true`, `[1, 2]` work)."""
    data = dict(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.base_lr=1e-4)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        try:
            node[leaf] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise yaml_error(f"override {item!r}: its value", err) from None
    return data


def from_dict(schema: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `schema` from `data`, checking every key and type."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for key, value in data.items():
        name = prefix + key
        if key not in fields:
            valid = [prefix + k for k in fields] + _nested_keys(schema, prefix)
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(sorted(prefix + k for k in fields))}"
            raise ConfigError(f"unknown config key {name!r}{hint}")
        kwargs[key] = _check(hints[key], value, name)
        _check_range(name, kwargs[key])
    cfg = schema(**kwargs)
    if hasattr(cfg, "validate"):  # checks across keys, e.g. combinations that cannot be built
        cfg.validate(prefix)
    return cfg


# Least values of count keys whose out-of-range values would otherwise do nothing, or fail far from the key:
# "section.key" (the key in any section of that name: data.num_workers is also knn.data.num_workers) ->
# (least value, what the key means). The schemas register theirs (mpp/config.py).
LIMITS: dict[str, tuple[int, str]] = {}


def _check_range(name: str, value) -> None:
    section_key = ".".join(name.split(".")[-2:])
    if section_key in LIMITS and isinstance(value, (int, float)) and not isinstance(value, bool):
        least, meaning = LIMITS[section_key]
        if value < least:
            raise ConfigError(f"config key {name!r} must be at least {least} ({meaning}), got {value!r}")


def _nested_keys(schema: type, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(schema):
        sub = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(sub):
            keys += [f"{prefix}{f.name}.{g.name}" for g in dataclasses.fields(sub)]
    return keys


def _union_args(tp) -> tuple | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else None


def _type_name(tp) -> str:
    if _union_args(tp):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in _union_args(tp))
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _check(tp, value, name: str):
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a mapping (section {tp.__name__}), got {value!r}")
        return from_dict(tp, value, name + ".")
    if _union_args(tp):
        if value is None and type(None) in _union_args(tp):
            return None
        for alternative in (a for a in _union_args(tp) if a is not type(None)):
            try:
                return _check(alternative, value, name)
            except ConfigError:
                continue
        raise ConfigError(f"config key {name!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if not value else "yes") in choices:
            return "no" if not value else "yes"  # YAML 1.1 reads a bare `no` as false
        if value in choices:
            return value
        raise ConfigError(f"config key {name!r} expects one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r} expects {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check(item, v, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        # PyYAML reads `1e-4` (no dot) as a string: accept any number spelled as text.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"config key {name!r} expects {_type_name(tp)}, got {type(value).__name__} {value!r}")


def load_config(schema: type, recipe: str | Path, overrides: list[str] = ()) -> Any:
    """Recipe file + overrides -> validated config; `output_dir` defaults to runs/<recipe name>."""
    data = apply_overrides(read_recipe(recipe), list(overrides))
    cfg = from_dict(schema, data)
    if hasattr(cfg, "output_dir") and cfg.output_dir is None:
        cfg.output_dir = str(Path("runs") / Path(recipe).stem)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)
