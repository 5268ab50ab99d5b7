"""YAML with line numbers for the typed config: plain data for pydantic, and its errors back to lines.

The YAML is composed (``yaml.compose``) so every node keeps its mark; it is turned into plain
data while the line of every key and value is recorded by key path. A pydantic ``ValidationError``
is then mapped back: its ``loc`` is walked through the data (skipping the union tags pydantic adds)
to the YAML line, and its type becomes one plain sentence, so an operator reads
``line.yaml:14: recipes[0].fps: must be a number between 0.01 and 1000, got 'fast'``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from anomalygpt_edge.runtime.values import FieldError

Loc = tuple[str | int, ...]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names file, line, key path and the problem."""


@dataclass
class Marks:
    """1-based YAML lines by key path: of each value, and of each mapping key."""

    origin: str
    values: dict[Loc, int] = field(default_factory=dict)
    keys: dict[Loc, int] = field(default_factory=dict)

    def fail(self, loc: Loc, problem: str, at_key: bool = False) -> ConfigError:
        """A ConfigError for ``loc``, at the line of its key (``at_key``) or of the nearest value."""
        line = self.keys.get(loc) if at_key else None
        probe = loc
        while line is None and probe:
            line = self.values.get(probe)
            probe = probe[:-1]
        line = line if line is not None else self.values.get(())
        where = f":{line}" if line is not None else ""
        return ConfigError(f"{self.origin}{where}: {dotted(loc)}: {problem}")


def dotted(loc: Loc) -> str:
    """``('recipes', 0, 'fps')`` as ``recipes[0].fps``; the root as ``<top>``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top>"


def read_yaml(text: str, origin: str) -> tuple[Any, Marks]:
    """The document as plain data, and the line of every key path; ConfigError for unreadable YAML."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{origin}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if root is None:
        raise ConfigError(f"{origin}: the config file is empty")
    marks = Marks(origin)
    return _Plain(marks).node(root, ()), marks


class _Plain:
    """Turns composed nodes into dicts, lists and scalars, recording marks and refusing what YAML
    lets through but a config must not have (duplicate keys, non-text keys, self-referring aliases)."""

    def __init__(self, marks: Marks):
        self.marks = marks
        self.constructor = yaml.SafeLoader("")
        self.open: set[int] = set()

    def node(self, node: yaml.Node, loc: Loc) -> Any:
        """Any node as plain data, its line recorded at ``loc``."""
        self.marks.values[loc] = node.start_mark.line + 1
        if id(node) in self.open:
            raise self.marks.fail(loc, "a YAML alias that contains itself")
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, loc)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.node(item, (*loc, i)) for i, item in enumerate(node.value)]
            return self.mapping(node, loc)
        finally:
            self.open.discard(id(node))

    def mapping(self, node: yaml.Node, loc: Loc) -> dict[str, Any]:
        """A mapping node as a dict of text keys (each key's line recorded too)."""
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                # The path in a variable, not `values[(*loc, "?")]`: 3.11's parser reads that subscript
                # as `values[*loc, "?"]`, which 3.10 lacks, so mypy (targeting 3.10) cannot tell them apart.
                odd_key: Loc = (*loc, "?")
                self.marks.values[odd_key] = key_node.start_mark.line + 1
                raise self.marks.fail(odd_key, "keys must be plain strings")
            key = str(key_node.value)
            key_loc: Loc = (*loc, key)
            self.marks.keys[key_loc] = key_node.start_mark.line + 1
            if key in out:
                raise self.marks.fail(key_loc, "duplicate key", at_key=True)
            out[key] = self.node(value_node, key_loc)
        return out

    def scalar(self, node: yaml.ScalarNode, loc: Loc) -> Any:
        """A scalar as YAML 1.1 reads it (``5`` an int, ``true`` a bool, ``null`` None)."""
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as exc:  # "!!int abc", an unknown "!tag"
            raise self.marks.fail(loc, f"unreadable value: {getattr(exc, 'problem', None) or exc}") from None


# --- pydantic errors back to lines ----------------------------------------------------------------


def config_error(exc: ValidationError, data: Any, marks: Marks, model: type[BaseModel]) -> ConfigError:
    """One of pydantic's errors as one ConfigError line: an unknown key first (a typo explains the
    missing key it was meant to be), else the first in document order of fields."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    raw: Loc = tuple(error["loc"])
    blamed = error.get("ctx", {}).get("error")
    if isinstance(blamed, FieldError):
        raw = (*raw, *blamed.loc)
    loc, is_key = _data_loc(raw, data)
    return _explain(error, loc, is_key, raw, marks, model)


def _data_loc(raw: Loc, data: Any) -> tuple[Loc, bool]:
    """``raw`` without the parts pydantic adds (union tags, validator names); whether it names a key."""
    loc: list[str | int] = []
    here = data
    for part in raw:
        if part == "[key]":
            return tuple(loc), True
        inside_list = isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here)
        if inside_list or isinstance(here, dict) and part in here:
            here = here[part]
        elif isinstance(part, str) and ("[" in part or isinstance(here, dict) and here.get("type") == part):
            continue  # the tag of a discriminated union, or a validator's name
        else:
            here = None  # a missing or unknown key: nothing below it in the data
        loc.append(part)
    return tuple(loc), False


def _explain(
    error: ErrorDetails, loc: Loc, is_key: bool, raw: Loc, marks: Marks, model: type[BaseModel]
) -> ConfigError:
    kind, ctx, value = error["type"], error.get("ctx", {}), error.get("input")
    if "error" in ctx:  # our validators' own sentences
        return marks.fail(loc, str(ctx["error"]), at_key=is_key)
    if kind == "missing":
        what = "section" if len(loc) == 1 else "key"
        return marks.fail(loc[:-1], f"missing required {what} '{loc[-1]}'")
    if kind == "extra_forbidden":
        return marks.fail(loc, _unknown_key(loc, raw, model), at_key=True)
    if kind == "literal_error":
        return marks.fail(loc, f"must be one of {_listed(ctx.get('expected', ''))}, got {value!r}")
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(ctx.get("discriminator", "type")).strip("'")
        if kind == "union_tag_not_found":
            return marks.fail(loc, f"missing required key '{tag}'")
        got = value.get(tag) if isinstance(value, dict) else value
        return marks.fail((*loc, tag), f"must be one of {_listed(str(ctx.get('expected_tags', '')))}, got {got!r}")
    if kind in ("model_type", "model_attributes_type", "dict_type", "dataclass_type"):
        return marks.fail(loc, "must be a mapping of keys to values")
    if kind in ("list_type", "tuple_type"):
        return marks.fail(loc, "must be a list")
    return marks.fail(loc, f"{error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}")


def _unknown_key(loc: Loc, raw: Loc, model: type[BaseModel]) -> str:
    from anomalygpt_edge.runtime.secrets import SECRET_KEYS, env_var_name

    key, path = str(loc[-1]), dotted(loc)
    if path == "mqtt.password":  # the one secret every broker setup has: say exactly what to write
        return (
            "not accepted in clear; use password_file: PATH or the environment variable ANOMALYGPT_EDGE_MQTT_PASSWORD"
        )
    if key in SECRET_KEYS:  # say how to give a secret rather than just "unknown key"
        hint = f"use {key}_file: PATH or the environment variable {env_var_name(path)}"
        return f"secrets are not accepted in clear in the YAML; {hint}"
    allowed = _fields_at(model, raw[:-1])
    return f"unknown key; allowed here: {', '.join(sorted(allowed))}" if allowed else "unknown key"


def _listed(expected: str) -> str:
    """pydantic's ``'a', 'b' or 'c'`` as ``a, b, c``."""
    return expected.replace("'", "").replace(" or ", ", ")


def _fields_at(model: type[BaseModel], raw: Loc) -> list[str]:
    """The keys the model accepts at ``raw`` (pydantic's own loc, union tags included)."""
    here: Any = model
    for part in raw:
        here = _unwrap(here)
        if isinstance(here, type) and issubclass(here, BaseModel):
            info = here.model_fields.get(str(part))
            if info is None:
                return []
            here = info.annotation
        elif get_origin(here) is dict:
            here = get_args(here)[1]
        elif get_origin(here) in (list, tuple):
            here = get_args(here)[0]
        elif get_origin(here) in (Union, types.UnionType):
            here = next((m for m in get_args(here) if _tag(m) == part), None)
        else:
            return []
    here = _unwrap(here)
    return (
        [n for n in here.model_fields if n != "name"] if isinstance(here, type) and issubclass(here, BaseModel) else []
    )


def _unwrap(kind: Any) -> Any:
    """``Annotated[X, ...]`` as ``X``; ``X | None`` as ``X``."""
    while True:
        if get_origin(kind) is Annotated:
            kind = get_args(kind)[0]
            continue
        if get_origin(kind) in (Union, types.UnionType):
            members = [m for m in get_args(kind) if m is not type(None)]
            if len(members) == 1:
                kind = members[0]
                continue
        return kind


def _tag(member: Any) -> str | None:
    member = _unwrap(member)
    if isinstance(member, type) and issubclass(member, BaseModel) and "type" in member.model_fields:
        choices = get_args(member.model_fields["type"].annotation)
        return str(choices[0]) if choices else None
    return None


__all__ = ["ConfigError", "Marks", "config_error", "dotted", "read_yaml"]
