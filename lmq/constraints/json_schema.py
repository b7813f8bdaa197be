"""JSON constraints: a schema or a Python type → the GBNF grammar of its JSON documents,
and a parsed document → a value of the type.

`JSON(X, schema)` takes a JSON-schema dict; `JSON(X, T)` and `[X: T]` take a dataclass, a
pydantic model (if pydantic is installed; lmq does not depend on it) or a typing type
(int, float, str, bool, None, list[...], tuple[...], dict[str, ...], Optional/Union,
Literal, Enum, Any, nested dataclasses). The grammar comes from llama-cpp-python's
schema converter, with two rules replaced:

- `space` matches nothing: documents are compact, so keys and punctuation are forced
  (fast-forwarded by the decoder) instead of sampled around optional whitespace;
- `char` excludes the control characters U+0000–U+001F, which the converter lets
  through unescaped although JSON forbids them in strings (`json.loads` rejects them).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import re
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Callable

from llama_cpp.llama_grammar import SchemaConverter

from lmq.constraints import grammar_cache
from lmq.errors import ConstraintError, ConstraintViolation, UnsatisfiableConstraint

_COMPACT_SPACE = 'space ::= ""'
_JSON_CHAR = r'char ::= [^"\\\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_SCALARS: dict[Any, dict] = {int: {"type": "integer"}, float: {"type": "number"},
                             str: {"type": "string"}, bool: {"type": "boolean"},
                             type(None): {"type": "null"}, None: {"type": "null"}}
_ANY = {"type": ["object", "array", "string", "number", "boolean", "null"]}


@dataclass(frozen=True)
class JsonConstraint:
    """A JSON constraint: its schema, its GBNF grammar and the conversion of a parsed
    document to the program value."""

    schema: dict
    gbnf: str
    convert: Callable[[Any], Any]

    def value(self, text: str) -> Any:
        """The program value of a generated document (the grammar made it valid)."""
        try:
            return self.convert(json.loads(text))
        except (ValueError, TypeError) as e:
            raise ConstraintViolation(f"the generated JSON {text!r} does not fit its schema: {e}") from None


def json_constraint(target: Any, *, owner: str = "JSON") -> JsonConstraint:
    """The constraint of `JSON(X, target)` / `[X: target]`: `target` is a schema dict or
    a type (see the module docstring). Unsupported types and schemas are
    ConstraintErrors naming them."""
    if isinstance(target, dict):
        return JsonConstraint(target, schema_to_gbnf(target, owner=owner), lambda data: data)
    schema = type_schema(target, owner=owner)
    return JsonConstraint(schema, schema_to_gbnf(schema, owner=owner),
                          lambda data: typed_value(data, target))


def schema_to_gbnf(schema: dict, *, owner: str = "JSON") -> str:
    """GBNF of the compact JSON documents valid against `schema` (root rule `root`)."""
    try:
        text = json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{owner}: the schema is not JSON: {e}") from None
    contradiction = _contradiction(schema)
    if contradiction:
        raise UnsatisfiableConstraint(f"{owner}: no JSON value satisfies the schema ({contradiction})")
    return _converted(text, owner)


def _contradiction(schema: Any) -> str | None:
    """An empty choice or crossed bounds anywhere in the schema (the converter would
    silently emit a broken grammar or ignore the maximum)."""
    if isinstance(schema, list):
        return next(filter(None, map(_contradiction, schema)), None)
    if not isinstance(schema, dict):
        return None
    for key in ("enum", "anyOf", "oneOf"):
        if schema.get(key) == []:
            return f"an empty {key}"
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength"),
                      ("minProperties", "maxProperties")):
        if isinstance(schema.get(low), int) and isinstance(schema.get(high), int) \
                and schema[low] > schema[high]:
            return f"{low} {schema[low]} > {high} {schema[high]}"
    return next(filter(None, map(_contradiction, schema.values())), None)


@functools.lru_cache(maxsize=256)
def _converted(schema_text: str, owner: str) -> str:
    """The GBNF of a schema (its JSON text: property order is kept, it orders the
    document's keys), from the grammar cache on disk when it was converted before."""
    return grammar_cache.cached("json-schema", schema_text, lambda: _convert(schema_text, owner))


def _convert(schema_text: str, owner: str) -> str:
    try:
        converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        converter.visit(converter.resolve_refs(json.loads(schema_text), "input"), "")
        grammar = converter.format_grammar()
    except (AssertionError, KeyError, AttributeError, TypeError, ValueError, RecursionError) as e:
        raise ConstraintError(f"{owner}: llama.cpp's schema converter does not support this "
                              f"schema ({type(e).__name__}: {e}): {_short(schema_text)}") from None
    grammar = re.sub(r"(?m)^space ::= .*$", lambda _: _COMPACT_SPACE, grammar)
    return re.sub(r"(?m)^char ::= .*$", lambda _: _JSON_CHAR, grammar)


def type_schema(target: Any, *, owner: str = "JSON") -> dict:
    """The JSON schema of a Python type."""
    return _schema(target, owner, ())


def _schema(target: Any, owner: str, enclosing: tuple) -> dict:
    if not isinstance(target, Hashable):
        raise ConstraintError(f"{owner}: {_short(repr(target))} is neither a JSON schema (a dict) nor a type")
    if target in _SCALARS:
        return dict(_SCALARS[target])
    if target is Any:
        return dict(_ANY)
    if _is_pydantic(target):
        return target.model_json_schema()
    if isinstance(target, type) and issubclass(target, enum.Enum):
        return {"enum": [member.value for member in target]}
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        if target in enclosing:
            raise ConstraintError(f"{owner}: the dataclass {target.__name__} contains itself; "
                                  "recursive types are not supported")
        hints = typing.get_type_hints(target)
        fields = [f for f in dataclasses.fields(target) if f.init]
        return {"type": "object",
                "properties": {f.name: _schema(hints[f.name], owner, enclosing + (target,)) for f in fields},
                "required": [f.name for f in fields if f.default is dataclasses.MISSING
                             and f.default_factory is dataclasses.MISSING],
                "additionalProperties": False}
    origin, args = typing.get_origin(target), typing.get_args(target)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_schema(arg, owner, enclosing) for arg in args]}
    if target is list or origin is list:
        return {"type": "array", **({"items": _schema(args[0], owner, enclosing)} if args else {})}
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": "array", "items": _schema(args[0], owner, enclosing)}
        if args and args != ((),):
            return {"type": "array", "prefixItems": [_schema(arg, owner, enclosing) for arg in args]}
    if target is dict or origin is dict:
        if args and args[0] is not str:
            raise ConstraintError(f"{owner}: {_name(target)} has non-string keys; JSON object keys "
                                  "are strings (use dict[str, ...])")
        values = _schema(args[1], owner, enclosing) if args else True
        return {"type": "object", "additionalProperties": values}
    raise ConstraintError(f"{owner}: the type {_name(target)} has no JSON schema (supported: "
                          "int, float, str, bool, None, list, tuple, dict[str, ...], Optional/Union, "
                          "Literal, Enum, Any, dataclasses, pydantic models)")


def typed_value(data: Any, target: Any) -> Any:
    """`data` (parsed JSON) as a value of `target`; TypeError/ValueError when it is not one."""
    if target is Any:
        return data
    if target in (None, type(None)):
        if data is not None:
            raise ValueError(f"{data!r} is not null")
        return None
    if target is bool or target is str:
        if not isinstance(data, target):
            raise TypeError(f"{data!r} is not a {target.__name__}")
        return data
    if target is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise TypeError(f"{data!r} is not an int")
        return data
    if target is float:
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise TypeError(f"{data!r} is not a number")
        return float(data)
    if _is_pydantic(target):
        try:
            return target.model_validate(data)
        except Exception as e:   # pydantic's ValidationError, without importing pydantic
            raise ValueError(str(e)) from None
    if isinstance(target, type) and issubclass(target, enum.Enum):
        return target(data)
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        if not isinstance(data, dict):
            raise TypeError(f"{data!r} is not an object")
        hints = typing.get_type_hints(target)
        return target(**{name: typed_value(item, hints[name]) for name, item in data.items()})
    origin, args = typing.get_origin(target), typing.get_args(target)
    if origin is typing.Literal:
        if data not in args:
            raise ValueError(f"{data!r} is not one of {args}")
        return data
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return typed_value(data, arg)
            except (TypeError, ValueError):
                continue
        raise TypeError(f"{data!r} is none of {_name(target)}")
    if target in (list, tuple, dict) or origin in (list, tuple, dict):
        return _container(data, origin or target, args)
    raise TypeError(f"{_name(target)} is not a supported type")


def _container(data: Any, kind: type, args: tuple) -> Any:
    if kind is dict:
        if not isinstance(data, dict):
            raise TypeError(f"{data!r} is not an object")
        return {key: typed_value(item, args[1]) for key, item in data.items()} if args else data
    if not isinstance(data, list):
        raise TypeError(f"{data!r} is not an array")
    if kind is list:
        return [typed_value(item, args[0]) for item in data] if args else data
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(typed_value(item, args[0]) for item in data)
    if args and len(args) != len(data):
        raise ValueError(f"{data!r} does not have {len(args)} items")
    return tuple(typed_value(item, arg) for item, arg in zip(data, args)) if args else tuple(data)


def _is_pydantic(target: Any) -> bool:
    return isinstance(target, type) and hasattr(target, "model_json_schema") and hasattr(target, "model_validate")


def _name(target: Any) -> str:
    return getattr(target, "__name__", None) if isinstance(target, type) else repr(target)


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."
