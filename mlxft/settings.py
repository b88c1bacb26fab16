"""Typed settings from YAML: a tree of dataclasses built from nested dicts, each value checked
against its field's annotation and the range or choices the field declares (`setting(...)`).

mlxft.config holds mlxft's settings; this module is how any such tree is read: recipes and run
config.yaml files (read_yaml), --set values (Given: YAML, except that a text setting keeps the
text as typed), and the checks, so a typo or an out-of-range number is one line before anything
is loaded or written.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml

from mlxft.errors import UserError


def setting(default, *, low=None, high=None, above=None, below=None, choices=None):
    """A field with the range or choices its values must keep; checked whenever a config is built.

    low/high are inclusive bounds, above/below exclusive ones. Floats must also be finite."""
    rules = {k: v for k, v in dict(low=low, high=high, above=above, below=below, choices=choices).items() if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=rules)
    return field(default=default, metadata=rules)


def read_yaml(path: Path, what: str) -> dict:
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if values is None:
        return {}
    acyclic(values, f"{what} {path}")
    if not isinstance(values, dict):
        raise UserError(f"{what} {path}: expected sections of settings (model:, data:, train:, ...), not {type(values).__name__}")
    return values


class Given:
    """A --set value as typed. It is read as YAML (numbers, lists, null), except where the setting
    is text: there the typed text is kept when YAML would make something else of it, so a
    template such as 'Features: {features}' is a template, not a YAML mapping."""

    def __init__(self, raw: str):
        self.raw = raw

    def value(self, hint, key: str):
        options = options_of(hint)
        if not self.raw.strip():
            return None
        try:
            parsed, error = yaml.safe_load(self.raw), None
        except yaml.YAMLError as e:
            parsed, error = None, str(e).splitlines()[0]
        takes_list = isinstance(parsed, list) and any(typing.get_origin(o) is list for o in options)  # str | list[str]
        if str in options and not (isinstance(parsed, str) and error is None or parsed is None and type(None) in options
                                   or takes_list):
            return self.raw
        if error is not None:
            raise UserError(f"--set {key}={self.raw!r}: not valid YAML ({error})")
        return acyclic(parsed, f"--set {key}")


def acyclic(value, where: str, seen=()):
    """YAML's anchors can make a list that holds itself (&a [*a]); no setting is one."""
    if isinstance(value, (list, dict)):
        if id(value) in seen:
            raise UserError(f"{where}: a YAML alias refers to itself")
        for item in value.values() if isinstance(value, dict) else value:
            acyclic(item, where, (*seen, id(value)))
    return value


def options_of(hint) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def check_key(root, keys: list[str], item: str) -> None:
    """A --set key names one setting of `root` (a dataclass): every part exists, and it ends on a
    value, not a section. A dict field (builtin_model) takes only whole "section.key" values."""
    cls = root
    for depth, key in enumerate(keys):
        prefix = ".".join(keys[:depth])
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if key not in fields:
            raise UserError(f"unknown setting '{prefix + '.' if prefix else ''}{key}'; known in this section: "
                            f"{', '.join(sorted(fields))}")
        hint = typing.get_type_hints(cls)[key]
        last = depth == len(keys) - 1
        if dataclasses.is_dataclass(hint):
            if last:
                example = next(iter(f.name for f in dataclasses.fields(hint)))
                raise UserError(f"--set {item!r}: '{'.'.join(keys)}' must be a section of keys, not a value; "
                                f"set one of its keys, like {'.'.join(keys)}.{example}=...")
            cls = hint
        elif hint is dict:
            if not last:  # builtin_model holds "section.key" names; --set names the setting itself
                raise UserError(f"--set {item!r}: builtin_model's settings are a recipe's; on the command line "
                                f"set the setting itself, like --set {'.'.join(keys[1:])}=...")
            return
        elif not last and any(typing.get_origin(o) is dict for o in options_of(hint)):
            raise UserError(f"--set {item!r}: '{'.'.join(keys[:depth + 1])}' is one mapping; set it whole, like "
                            f"--set '{'.'.join(keys[:depth + 1])}={{{keys[depth + 1]}: ...}}'")
        elif not last:
            raise UserError(f"--set {item!r}: '{'.'.join(keys[:depth + 1])}' is a value, not a section")


def set_path(values: dict, keys: list[str], value) -> None:
    node = values
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):  # a recipe's scalar where a section belongs is replaced, and reported by build
            child = node[key] = {} if child is None else child
            if not isinstance(child, dict):
                raise UserError(f"setting '{key}' must be a section of keys, not {child!r}")
        node = child
    node[keys[-1]] = value


def build(cls, values, prefix: str):
    if not isinstance(values, dict):
        raise UserError(f"'{prefix.rstrip('.')}' must be a section of keys, not {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise UserError(f"unknown setting '{prefix}{unknown[0]}'; known in this section: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(value, Given):
            value = value.value(hint, f"{prefix}{name}")
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, hint, f"{prefix}{name}")
    built = cls(**kwargs)
    check_ranges(built, prefix)
    if hasattr(built, "check"):
        built.check()
    return built


BOUNDS = [("low", lambda x, b: x >= b, "at least"), ("high", lambda x, b: x <= b, "at most"),
          ("above", lambda x, b: x > b, "above"), ("below", lambda x, b: x < b, "below")]


def check_ranges(section, prefix: str) -> None:
    """Each setting within the range or among the choices its field declares; floats finite."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise UserError(f"setting '{prefix}{f.name}' must be a finite number, got {item}")
            if item is None or isinstance(item, (bool, str, dict)) and "choices" not in f.metadata:
                continue
            rules = f.metadata
            for name, holds, words in BOUNDS:
                if name in rules and not holds(item, rules[name]):
                    raise UserError(f"setting '{prefix}{f.name}' must be {words} {rules[name]:g}, got {item!r}")
            if "choices" in rules and item not in rules["choices"]:
                raise UserError(f"setting '{prefix}{f.name}' must be one of {', '.join(map(str, rules['choices']))}, "
                                f"got {item!r}")


def coerce(value, hint, key: str):
    """Check a YAML value against a field's annotation; ints are accepted where floats are."""
    value = yaml11_float(value)
    options = options_of(hint)
    if value is None:
        if type(None) in options:
            return None
        raise UserError(f"setting '{key}' cannot be empty")
    for option in options:
        origin = typing.get_origin(option)
        if origin is list:
            (item_type,) = typing.get_args(option)
            items = value if isinstance(value, list) else [value]
            if all(fits(v, item_type) for v in items):
                return [as_float(v, key) if item_type is float else v for v in items]
        elif origin is dict:
            key_type, value_type = typing.get_args(option)
            if isinstance(value, dict) and all(fits(k, key_type) and fits(v, value_type) for k, v in value.items()):
                return dict(value)
        elif option is not type(None) and fits(value, option):
            return as_float(value, key) if option is float else value
    expected = " or ".join("a mapping of names" if typing.get_origin(o) is dict else getattr(o, "__name__", str(o))
                           for o in options if o is not type(None))
    raise UserError(f"setting '{key}' must be {expected}, got {value!r}")


def as_float(value, key: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer of 400 digits
        raise UserError(f"setting '{key}' must be a finite number, got an integer of {len(str(value))} digits") from None


def yaml11_float(value):
    # YAML 1.1 reads "1e-3" (no dot) as a string; everyone writes learning rates that way.
    if isinstance(value, str):
        try:
            return float(value) if any(c.isdigit() for c in value) and "e" in value.lower() else value
        except ValueError:
            return value
    if isinstance(value, list):
        return [yaml11_float(v) for v in value]
    return value


def fits(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)
