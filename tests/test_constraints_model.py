"""Every constraint of the spec's table (constraints.md) on the real SmolLM2 model through
llama.cpp: each query runs and its value satisfies the constraint, checked here in plain
Python."""

import json
import re
from dataclasses import dataclass

import pytest

import lmq

pytestmark = pytest.mark.model

INT_RE = r" ?-?(0|[1-9][0-9]*)"
FLOAT_RE = r" ?-?(0|[1-9][0-9]*)(\.[0-9]+)?"


@dataclass
class City:
    name: str
    population: int


fruits = [" apple", " banana split", " cherry"]

CASES = [
    # (query, check on the result's variables)
    ('"Is water wet? Answer:[X]" where X in [" yes", " no"]',
     lambda v: v["X"] in (" yes", " no")),
    ('"Pick a fruit:[X]" where X in fruits and len(TOKENS(X)) < 6',
     lambda v: v["X"] in (" apple", " banana split", " cherry")),
    ('"Say hello:[X]" where X == " hello world"', lambda v: v["X"] == " hello world"),
    ('"A colour:[X]" where X != " red" and len(TOKENS(X)) < 3', lambda v: v["X"] != " red"),
    ('"A colour:[X]" where X not in [" red", " blue"] and len(TOKENS(X)) < 3',
     lambda v: v["X"] not in (" red", " blue")),
    ('"An animal sentence:[X]" where "cat" in X and len(TOKENS(X)) < 12', lambda v: "cat" in v["X"]),
    ('"Write:[X]" where not "e" in X and len(TOKENS(X)) < 8', lambda v: "e" not in v["X"]),
    ('"Write:[X]" where "e" not in X and len(TOKENS(X)) < 8', lambda v: "e" not in v["X"]),
    ('"Write:[X]" where len(TOKENS(X)) == 4', None),
    ('"Write:[X]" where len(TOKENS(X)) > 3 and len(TOKENS(X)) <= 5', None),
    ('"Write:[X]" where len(TOKENS(X)) != 2 and len(TOKENS(X)) < 4', None),
    ('"Write a word:[X]" where len(X) < 6 and len(TOKENS(X)) < 6', lambda v: len(v["X"]) < 6),
    ('"Write a word:[X]" where len(X) >= 3 and len(TOKENS(X)) < 6', lambda v: len(v["X"]) >= 3),
    ('"Legs of a spider:[X]" where INT(X) and len(TOKENS(X)) < 4', lambda v: type(v["X"]) is int),
    ('"Legs of a spider: [X: int]" where len(TOKENS(X)) < 4', lambda v: type(v["X"]) is int),
    ('"Pi is about [X]" where FLOAT(X) and len(TOKENS(X)) < 6', lambda v: type(v["X"]) is float),
    ('"Pi is about [X: float]" where len(TOKENS(X)) < 6', lambda v: type(v["X"]) is float),
    ('"A date: [X]" where REGEX(X, r"[0-9]{4}-[0-9]{2}-[0-9]{2}")',
     lambda v: re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", v["X"])),
    ('"A date: [X: r\'[0-9]{2}/[0-9]{2}\']"', lambda v: re.fullmatch(r"[0-9]{2}/[0-9]{2}", v["X"])),
    ('"Q: Capital of France?\\nA:[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 20',
     lambda v: "." not in v["X"][:-1]),
    ('"Q: Capital of France?\\nA:[X]" where STOPS_BEFORE(X, [".", "\\n"]) and len(TOKENS(X)) < 20',
     lambda v: "." not in v["X"] and "\n" not in v["X"]),
    ('"Q: Capital of France?\\nA:[X]" where STOPS_AT(X, ".") and REGEX(X, r"[A-Za-z ]+\\.?") '
     'and len(TOKENS(X)) < 20', lambda v: re.fullmatch(r"[A-Za-z ]+\.?", v["X"])),
    ('"Count: [X]" where GRAMMAR(X, \'root ::= [0-9] ("," [0-9])*\') and len(TOKENS(X)) < 8',
     lambda v: re.fullmatch(r"[0-9](,[0-9])*", v["X"])),
    ('"A person: [X]" where JSON(X, {"type": "object", "properties": {"name": {"type": "string", '
     '"maxLength": 12}, "age": {"type": "integer"}}, "required": ["name", "age"]})',
     lambda v: set(v["X"]) == {"name", "age"} and isinstance(v["X"]["age"], int)),
    ('"A city: [X: City]"', lambda v: isinstance(v["X"], City) and isinstance(v["X"].population, int)),
    ('"Answer:[X]" where (X in [" yes", " no"] or INT(X)) and len(TOKENS(X)) < 4',
     lambda v: v["X"] in (" yes", " no") or re.fullmatch(INT_RE, v["X"])),
    ('"Answer:[X]" where not INT(X) and len(TOKENS(X)) < 4',
     lambda v: not re.fullmatch(INT_RE, v["X"])),
]


@pytest.mark.parametrize("query,check", CASES, ids=[c[0][:60] for c in CASES])
def test_spec_constraint_runs_on_smollm2(query, check):
    result = lmq.run_sync(query, decoder="argmax(max_len=400)")   # names from this module
    if check is not None:
        assert check(result.variables), result.variables
    if "TOKENS(X)) ==" in query:
        assert len(result.tokens["X"]) == 4
    if "> 3 and" in query:
        assert 4 <= len(result.tokens["X"]) <= 5
    if "!= 2" in query:
        assert len(result.tokens["X"]) in (0, 1, 3)


def test_a_python_check_is_applied_to_the_final_value():
    result = lmq.run_sync('"Answer:[X]" where len(X) < 40 and len(TOKENS(X)) < 4')
    assert len(result.variables["X"]) < 40
    with pytest.raises(lmq.ConstraintViolation, match=r"X\.upper\(\) == 'NEVER'"):
        lmq.run_sync('"Answer:[X]" where X.upper() == "NEVER" and len(TOKENS(X)) < 4')


def test_json_value_is_also_valid_json_text():
    result = lmq.run_sync('"Point: [P]" where JSON(P, {"type": "object", "properties": '
                          '{"x": {"type": "integer"}, "y": {"type": "integer"}}, '
                          '"required": ["x", "y"]})')
    text = result.prompt[len("Point: "):]
    assert json.loads(text) == result.variables["P"]


def test_a_forced_option_continues_byte_exactly_inside_a_character():
    """Issue 9: SmolLM2's first token for "日本語です" ends inside 日 (b"\\xe6"); the forced
    rest starts with continuation bytes and must reach the model as those bytes."""
    query = '"The Japanese phrase is:[X]" where X in ["日本語です", "x"]'
    model = lmq.model()
    table = model.backend().vocabulary.token_bytes
    runs = [lmq.run_sync(query, model=model)]
    runs += [lmq.run_sync(query, model=model, decoder="sample", temperature=1.5, seed=seed)
             for seed in range(4)]
    for result in runs:
        value, tokens = result.variables["X"], result.tokens["X"]
        assert value in ("日本語です", "x")
        assert b"".join(table[t] for t in tokens) == value.encode("utf-8")
    # a token did start inside a character (a continuation byte first)
    assert any(table[t][:1] and table[t][0] & 0xC0 == 0x80 for r in runs for t in r.tokens["X"])


def test_a_tight_token_budget_reaches_the_option_that_fits():
    query = '"Order:[X]" where X in [" café au lait", " tea"] and len(TOKENS(X)) < 5'
    model = lmq.model()
    for seed in range(4):
        result = lmq.run_sync(query, model=model, decoder="sample", temperature=1.5, seed=seed)
        assert result.variables["X"] in (" café au lait", " tea")
        assert len(result.tokens["X"]) < 5
