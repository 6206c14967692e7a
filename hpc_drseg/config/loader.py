"""Loading the configuration: YAML files, dotted command-line overrides, type checks against the schema.

Precedence: dataclass defaults < YAML file < `key=value` overrides. The engine (`build_dataclass`, `read_yaml`,
`parse_overrides`) is generic over dataclass schemas, so the sweep spec loads by the same rules.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from hpc_drseg.atomic import atomic_write_text
from hpc_drseg.config.checks import ConfigError
from hpc_drseg.config.schema import RunConfig
from hpc_drseg.config.yamlio import load_yaml
from hpc_drseg.errors import MissingError


# ------------------------------------------------------------------------------------------- building from dicts
def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Checks `value` against the annotation `tp` and converts where lossless (int → float, list → nested)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and isinstance(choices[0], str):
            value = _unyaml_bool(value, choices)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{key}: got {value!r}; choose one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: got {value!r}; expected a list, e.g. {key}=[1,2]")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping, e.g. {key}: {{name: value}}")
        return dict(value)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: got {value!r}; expected a mapping of {_field_names(tp)}")
        return build_dataclass(tp, value, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}); expected {tp.__name__}")
    return value


# YAML 1.1 (PyYAML) reads these words as booleans, so `train.precision=no` or `precision: no` arrives as False.
_YAML_BOOL_WORDS = {True: ("yes", "true", "on"), False: ("no", "false", "off")}


def _unyaml_bool(value: bool, choices: tuple[str, ...]) -> Any:
    """The string choice that YAML turned into `value` (e.g. False -> 'no'); `value` unchanged when none fits."""
    matches = [c for c in choices if c.lower() in _YAML_BOOL_WORDS[value]]
    return matches[0] if len(matches) == 1 else value


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build_dataclass(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = _field_names(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys here: {', '.join(prefix + k for k in known)}")
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a __post_init__ of plain ValueError, or a wrong constructor call
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from exc


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['optim.lr=3e-4', 'model.cbam.sites=[aspp]'] → nested dict; values parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or key.startswith(".") or key.endswith("."):
            raise ConfigError(f"override '{item}' is not of the form section.key=value (e.g. optim.lr=3e-4)")
        try:
            value = load_yaml(raw, "value") if raw != "" else ""
        except ConfigError as exc:
            raise ConfigError(
                f"override '{item}': {exc}; quote strings and close brackets, e.g. model.cbam.sites=[aspp]"
            ) from exc
        if isinstance(value, str) and _looks_like_float(value):
            value = float(value)  # PyYAML 1.1 reads '3e-4' as a string
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[leaf] = value
    return nested


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")


def read_yaml(path: Path, schema: type) -> dict[str, Any]:
    """A YAML file's mapping (for the dataclass `schema`, named in errors), with YAML-1.1 float strings fixed."""
    if not path.is_file():
        raise MissingError(f"config file {path} does not exist; see configs/ for the shipped ones")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc}); save it as UTF-8 YAML") from exc
    loaded = load_yaml(text, str(path))
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping of {_field_names(schema)}")
    return fix_yaml_floats(loaded)


def fix_yaml_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: fix_yaml_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [fix_yaml_floats(v) for v in node]
    if isinstance(node, str) and _looks_like_float(node) and any(c in node for c in "eE."):
        return float(node)
    return node


# ------------------------------------------------------------------------------------------- the run config
def config_from_dict(values: dict[str, Any]) -> RunConfig:
    """Builds and validates a RunConfig from a (partial) nested dict."""
    return build_dataclass(RunConfig, values)


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Defaults < YAML file at `path` < dotted `overrides`. Raises ConfigError naming the bad key."""
    values: dict[str, Any] = {}
    if path is not None:
        values = read_yaml(Path(path), RunConfig)
        values.setdefault("name", Path(path).stem)
    values = merge(values, parse_overrides(list(overrides or [])))
    return config_from_dict(values)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Writes the resolved config atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    atomic_write_text(path, dump_config(cfg))
    return path


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, docstring) for every leaf field; used by `drseg config --list`."""
    docs = _field_docs(cls)
    rows: list[tuple[str, str, str]] = []
    instance = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if _is_dataclass_type(hints[f.name]):
            rows.extend(describe_fields(hints[f.name], key + "."))
        else:
            rows.append((key, repr(getattr(instance, f.name)), docs.get(f.name, "")))
    return rows


def _field_docs(cls: type) -> dict[str, str]:
    """Reads the string literal written after each field (the attribute-docstring convention)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = str(nxt.value.value).strip()  # type: ignore[union-attr]
    return docs
