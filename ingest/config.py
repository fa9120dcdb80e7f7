"""Typed job configuration: a dataclass, filled from a YAML file and `key=value` overrides.

Every job (`python -m ingest.consume`, `python -m training.dpo`, ...) declares one dataclass and calls
`parse_config(MyConfig, argv)`. Unknown keys are an error, not ignored, so a renamed field cannot
silently fall back to its default. Nested dataclasses are addressed with dots (`lora.r=16`).

This lives in `ingest/` because ingest is the lowest layer of the import graph (docs/architecture.md): every
other package may import it, and it imports none of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override that does not fit the job's config class."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{where}.")
    if origin in (list, tuple, dict):
        return _coerce_container(value, tp, origin, where)
    return _coerce_scalar(value, tp, where)


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    """The first member type that accepts the value (None only where the union holds None)."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError("; ".join(errors))


def _coerce_container(value: Any, tp: Any, origin: type, where: str) -> Any:
    """list / tuple (a CLI string is split on commas) and dict, item by item."""
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    (item_tp, *_) = typing.get_args(tp) or (Any,)
    if isinstance(value, str):
        value = [v for v in value.split(",") if v] if value else []
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    return items if origin is list else tuple(items)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """bool (true/false/1/0/yes/no/on/off), int and float (no bools, no lossy floats as ints), str, Path."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Path:
        return Path(value)
    return value


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)} for {cls.__name__}; "
            f"known: {', '.join(prefix + k for k in types_)}"
        )
    kwargs = {k: _coerce(v, types_[k], prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{cls.__name__}: {e}") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[leaf] = value


def _as_tree(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from defaults, then the YAML file at `path`, then `key=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        tree.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        # YAML parsing gives numbers, booleans, lists ([a, b]) and null their natural types.
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # A mapping or list only when written as one ({...} / [...]): "reason=judge: none" is a sentence.
        if isinstance(value, dict | list) and not raw.lstrip().startswith(("{", "[")):
            value = raw
        _set_dotted(tree, key.strip(), value)
    return _build(cls, _merge_nested(cls, tree))


def _merge_nested(cls: type, tree: dict[str, Any]) -> dict[str, Any]:
    """Let a partial mapping for a nested dataclass keep the nested defaults it does not name."""
    types_ = _field_types(cls)
    out = dict(tree)
    defaults = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in tree.items():
        tp = types_.get(name)
        if tp is not None and dataclasses.is_dataclass(tp) and isinstance(value, dict):
            f = defaults[name]
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                base = _as_tree(f.default_factory())  # type: ignore[misc]
                base.update(_merge_nested(tp, value))
                out[name] = base
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (paths as strings), for logging to MLflow."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def parse_config(cls: type[T], argv: list[str] | None = None, description: str | None = None) -> T:
    """Parse `[--config FILE] [key=value ...]` for a job; `--help` lists every key with its default."""
    lines = []
    for f in dataclasses.fields(cls):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")  # type: ignore[misc]
        )
        if dataclasses.is_dataclass(default):
            default = json.dumps(to_dict(default))
        lines.append(f"  {f.name} = {default}")
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None,
        epilog="config keys (override with key=value; nested keys with dots):\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with config keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, applied after --config")
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.error(str(e))
        raise  # unreachable: parser.error exits
