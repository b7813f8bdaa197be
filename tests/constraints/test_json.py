"""JSON constraints and typed holes: schemas and Python types → compact GBNF → llguidance
masks. Random walks through the automaton on real vocabularies (SmolLM2, qwen2,
llama-spm) always end in documents that `json.loads` reads, that validate against the
schema, that llama.cpp's GBNF engine accepts, and whose typed values round-trip."""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import pytest

from gbnf_check import GbnfOracle
from llama_grammar import LlamaGrammar, checked_walk
from lmq.backends import default_model_path
from lmq.backends.gguf import load_vocab_only
from lmq.constraints.gbnf import parse_gbnf
from lmq.constraints.grammar_automaton import GrammarTokenAutomaton
from lmq.constraints.json_schema import json_constraint, type_schema, typed_value
from lmq.errors import ConstraintError, UnsatisfiableConstraint
from vocab_paths import vocab

VOCABULARIES = {
    "smollm2": default_model_path(),
    "qwen2": vocab("qwen2"),
    "llama-spm": vocab("llama-spm"),
}


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass
class Point:
    x: int
    y: float


@dataclass
class Shape:
    name: str
    points: list[Point]
    color: Color
    kind: Literal["polygon", "curve"] = "polygon"
    label: Optional[str] = None
    weights: dict[str, float] = field(default_factory=dict)
    flags: tuple[bool, int] = (False, 0)


SCHEMAS = {
    "person": {"type": "object",
               "properties": {"name": {"type": "string", "maxLength": 12},
                              "age": {"type": "integer"},
                              "email": {"type": "string"},
                              "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
               "required": ["name", "age"], "additionalProperties": False},
    "mixed": {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "boolean"},
                                                   {"type": "null"}, {"enum": ["x", "y"]}]}},
    "map": {"type": "object", "additionalProperties": {"type": "integer"}},
}
TYPES = {"shape": Shape, "ints": list[int], "optional": Optional[float],
         "table": dict[str, list[bool]], "pair": tuple[str, Color], "union": Union[int, str]}


# --- a tiny validator for the schema subset used here -------------------------------------

def valid(schema: dict, data: Any) -> bool:
    if "anyOf" in schema:
        return any(valid(option, data) for option in schema["anyOf"])
    if "enum" in schema:
        return data in schema["enum"]
    kind = schema.get("type")
    checks = {"object": lambda: isinstance(data, dict), "array": lambda: isinstance(data, list),
              "string": lambda: isinstance(data, str), "boolean": lambda: isinstance(data, bool),
              "null": lambda: data is None,
              "integer": lambda: isinstance(data, int) and not isinstance(data, bool),
              "number": lambda: isinstance(data, (int, float)) and not isinstance(data, bool)}
    if kind is not None and not checks[kind]():
        return False
    if isinstance(data, str):
        return len(data) <= schema.get("maxLength", len(data))
    if isinstance(data, list):
        if len(data) > schema.get("maxItems", len(data)):
            return False
        if "prefixItems" in schema:
            return len(data) == len(schema["prefixItems"]) and all(
                valid(s, d) for s, d in zip(schema["prefixItems"], data))
        return all(valid(schema.get("items", {}), item) for item in data)
    if isinstance(data, dict):
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        if not set(schema.get("required", ())) <= set(data):
            return False
        for key, value in data.items():
            sub = properties.get(key, extra)
            if sub is False or (isinstance(sub, dict) and not valid(sub, value)):
                return False
    return True


def test_the_validator_can_fail():
    assert not valid(SCHEMAS["person"], {"name": "Al"})
    assert not valid(SCHEMAS["person"], {"name": "Al", "age": 3, "extra": 1})
    assert not valid(SCHEMAS["mixed"], ["z"])
    assert valid(SCHEMAS["mixed"], [1.5, None, "x", True])


# --- random walks -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocabularies():
    return {name: load_vocab_only(path).vocabulary() for name, path in VOCABULARIES.items()}


@pytest.fixture(scope="module")
def oracle():
    return GbnfOracle()


def _walk(automaton, vocabulary, rng, max_steps: int) -> bytes | None:
    """Random allowed tokens (mostly short ones) until the automaton accepts and the walk
    decides to stop; None if it ran out of steps."""
    lengths = np.array([len(data) for data in vocabulary.token_bytes])
    state = automaton.initial()
    text = b""
    for _ in range(max_steps):
        mask = automaton.mask(state)
        if automaton.accepts(state) and (mask.count == 0 or rng.random() < 0.4):
            return text
        choices = mask.allowed
        if rng.random() < 0.85:
            short = choices[lengths[choices] <= 1]
            choices = short if len(short) else choices
        token = int(choices[rng.integers(len(choices))])
        text += vocabulary.token_bytes[token]
        state = automaton.advance(state, token)
    return text if automaton.accepts(state) else None


def _documents(target, vocabulary, walks: int, max_steps: int = 120) -> list[bytes]:
    constraint = json_constraint(target)
    automaton = GrammarTokenAutomaton(parse_gbnf(constraint.gbnf, owner="JSON"), vocabulary,
                                      variable="X")
    found = [_walk(automaton, vocabulary, np.random.default_rng(seed), max_steps)
             for seed in range(walks)]
    documents = [text for text in found if text is not None]
    assert len(documents) >= walks // 3, "too few walks reached the end of a document"
    return documents


@pytest.mark.parametrize("vocab_name", list(VOCABULARIES))
@pytest.mark.parametrize("schema_name", list(SCHEMAS))
def test_walks_yield_valid_documents_for_schemas(vocabularies, oracle, vocab_name, schema_name):
    schema = SCHEMAS[schema_name]
    gbnf = json_constraint(schema).gbnf
    walks = 12 if vocab_name == "smollm2" else 4
    for text in _documents(schema, vocabularies[vocab_name], walks):
        data = json.loads(text)
        assert valid(schema, data), text
        assert oracle.accepts(gbnf, text), text
        assert json_constraint(schema).value(text.decode()) == data


@pytest.mark.parametrize("vocab_name", list(VOCABULARIES))
@pytest.mark.parametrize("type_name", list(TYPES))
def test_walks_yield_typed_values(vocabularies, oracle, vocab_name, type_name):
    target = TYPES[type_name]
    constraint = json_constraint(target)
    walks = 10 if vocab_name == "smollm2" else 3
    for text in _documents(target, vocabularies[vocab_name], walks, max_steps=200):
        data = json.loads(text)
        assert valid(constraint.schema, data), text
        assert oracle.accepts(constraint.gbnf, text), text
        value = constraint.value(text.decode())
        assert _plain(value, data) == data


def _plain(value: Any, data: Any) -> Any:
    """A typed value back in JSON's terms, shaped like the document `data` it came from
    (dataclass fields the document left out must hold their defaults)."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            if f.name not in data:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                assert getattr(value, f.name) == default
        return {key: _plain(getattr(value, key), item) for key, item in data.items()}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(item, part) for item, part in zip(value, data)] + ([None] * (len(data) - len(value)))
    if isinstance(value, dict):
        return {key: _plain(item, data[key]) for key, item in value.items()}
    return value


@pytest.mark.parametrize("target", [SCHEMAS["person"], SCHEMAS["mixed"], Shape],
                         ids=["person", "mixed", "shape"])
def test_json_masks_equal_llama_cpp_grammar_sampler(target):
    """Completeness too: each mask is exactly the token set llama.cpp's own sampler allows
    for the same GBNF (JSON grammars are read as a few large lexemes; see
    `lmq.constraints.llguidance_lark`)."""
    gguf = load_vocab_only(VOCABULARIES["smollm2"])
    gbnf = json_constraint(target).gbnf
    automaton = GrammarTokenAutomaton(parse_gbnf(gbnf), gguf.vocabulary(), variable="X")
    for seed in range(3):
        checked_walk(automaton, LlamaGrammar(gguf, gbnf), gguf.vocabulary(),
                     np.random.default_rng(seed), 25, [])


# --- typed conversions ----------------------------------------------------------------

def test_dataclass_round_trip_keeps_types_and_defaults():
    data = {"name": "tri", "points": [{"x": 1, "y": 2}, {"x": -3, "y": 0.5}], "color": "green",
            "flags": [True, 7]}
    shape = typed_value(data, Shape)
    assert shape == Shape("tri", [Point(1, 2.0), Point(-3, 0.5)], Color.GREEN, flags=(True, 7))
    assert isinstance(shape.points[0].y, float) and shape.label is None and shape.weights == {}


def test_schema_of_a_dataclass_names_fields_in_order_and_requires_those_without_default():
    schema = type_schema(Shape)
    assert list(schema["properties"]) == ["name", "points", "color", "kind", "label", "weights", "flags"]
    assert schema["required"] == ["name", "points", "color"]
    assert schema["properties"]["points"]["items"]["required"] == ["x", "y"]
    assert schema["additionalProperties"] is False


def test_documents_are_compact_so_keys_are_forced(vocabularies):
    constraint = json_constraint(Point)
    automaton = GrammarTokenAutomaton(parse_gbnf(constraint.gbnf), vocabularies["smollm2"], variable="P")
    assert automaton.forced(automaton.initial()) == b'{"x":'
    assert 'space ::= ""' in constraint.gbnf


def test_typing_values_are_checked():
    assert typed_value([1, "a"], list[Union[int, str]]) == [1, "a"]
    assert typed_value(None, Optional[int]) is None
    assert typed_value(3, float) == 3.0 and isinstance(typed_value(3, float), float)
    assert typed_value(["a", "red"], tuple[str, Color]) == ("a", Color.RED)
    for data, target in [("3", int), (True, int), ([1], tuple[int, int]), ("z", Literal["a"]),
                         ({"x": 1}, Point)]:
        with pytest.raises((TypeError, ValueError)):
            typed_value(data, target)


def test_pydantic_models_use_their_schema_and_validation(vocabularies, oracle):
    import pydantic

    class Item(pydantic.BaseModel):
        title: str
        count: int
        tags: list[str] = []

    constraint = json_constraint(Item)
    assert constraint.schema == Item.model_json_schema()
    for text in _documents(Item, vocabularies["smollm2"], 6, max_steps=160):
        item = constraint.value(text.decode())
        assert isinstance(item, Item) and item.model_dump(exclude_unset=True) == json.loads(text)
        assert oracle.accepts(constraint.gbnf, text)


@pytest.mark.parametrize("target,named", [(set[int], "set"), (dict[int, str], "non-string keys"),
                                          (bytes, "bytes"), (complex, "complex"),
                                          ([1, 2], "neither a JSON schema"), (3, "type 3")])
def test_unsupported_types_are_named(target, named):
    with pytest.raises(ConstraintError, match=named):
        json_constraint(target)


def test_recursive_dataclass_is_refused():
    @dataclass
    class Node:
        children: list["Node"]
    Node.__annotations__["children"] = list[Node]
    with pytest.raises(ConstraintError, match="Node contains itself"):
        json_constraint(Node)


@pytest.mark.parametrize("schema,named", [
    ({"enum": []}, "an empty enum"),
    ({"type": "object", "properties": {"a": {"anyOf": []}}}, "an empty anyOf"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 1}, "minItems 3 > maxItems 1"),
])
def test_contradictory_schemas_are_unsatisfiable(schema, named):
    with pytest.raises(UnsatisfiableConstraint, match=named):
        json_constraint(schema, owner="JSON(X)")


def test_bad_schemas_are_constraint_errors():
    with pytest.raises(ConstraintError, match="not JSON"):
        json_constraint({"enum": [object()]})
    with pytest.raises(ConstraintError, match="does not support"):
        json_constraint({"type": "decimal"})


# --- end to end on SmolLM2 -----------------------------------------------------------------

@pytest.mark.model
def test_json_hole_on_smollm2_binds_the_parsed_document():
    import lmq

    schema = SCHEMAS["person"]
    result = lmq.run_sync('"A person as JSON: [P]" where JSON(P, schema)', schema=schema)
    person = result.variables["P"]
    assert isinstance(person, dict) and valid(schema, person)
    assert json.loads(result.prompt[len("A person as JSON: "):]) == person
