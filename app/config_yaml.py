"""Reading config YAML into an OmegaConf structured config, key by key, with one-line errors
naming the key or file (used by `app.config.load_config`)."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError


def read_yaml(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ValueError(f"config file '{path}': cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file '{path}': invalid YAML ({yaml_problem(e)})") from None
    if data is None:  # an empty file changes nothing
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file '{path}': expected a mapping of config keys, got {type(data).__name__}"
        )
    return data


def assign(root: type, conf: DictConfig, key: str, value: Any, source: str) -> None:
    """Set dotted `key` (a leaf, or a section given a mapping) in `conf`, the structured config
    of the dataclass `root`, checking its type."""
    target: Any = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = field_types(target) if dataclasses.is_dataclass(target) else {}
        if part not in fields:
            prefix = ".".join(parts[:i])
            known = [f"{prefix}.{name}" if prefix else name for name in fields]
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown config key '{key}' (from {source}){hint}")
        target = fields[part]
    if dataclasses.is_dataclass(target):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of {key}.* keys, got {value!r}")
        for sub_key, sub_value in value.items():
            assign(root, conf, f"{key}.{sub_key}", sub_value, source)
        return
    # OmegaConf turns any int or string like 'yes' into a bool; only YAML booleans are meant.
    if target is bool and not isinstance(value, bool) and not _is_interpolation(value):
        raise ValueError(f"{key}: expected {_type_name(target)}, got {value!r}")
    try:
        OmegaConf.update(conf, key, value, merge=False)
    except ValidationError:
        raise ValueError(f"{key}: expected {_type_name(target)}, got {value!r}") from None


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    if type(None) in args:
        return " or ".join(_type_name(a) if a is not type(None) else "null" for a in args)
    return tp.__name__


def _is_interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's messages span several lines; keep the problem and where it is."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).split("\n")[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
