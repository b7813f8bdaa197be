"""The compiled route of regular grammars (`_kernel_dfa.h`, through
`gbnf_dfa._built`): on every grammar it decides, the identical `ByteDfa` the Python
route builds (state numbering, tables, byte classes, accepting states, disk entry, "too
large"); every
grammar it cannot vouch for (an error to name, recursion) is left to the Python route."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmq.constraints import gbnf_dfa, limits, token_choice
from lmq.constraints.byte_dfa import ByteDfa
from lmq.constraints.gbnf import parse_gbnf
from lmq.constraints.json_schema import json_constraint
from lmq.errors import ConstraintError
from test_gbnf_dfa import RECURSIVE, SCHEMAS

needs_kernel = pytest.mark.skipif(not token_choice.KERNEL_BUILT,
                                  reason="checked by test_the_kernel_is_built_in_this_install")

DECIDED = {
    **{f"schema {name}": json_constraint(schema).gbnf for name, schema in SCHEMAS.items()},
    "past MAX_DFA_STATES": json_constraint({"type": "array", "maxItems": 9,
                                            "items": {"type": "string", "maxLength": 90}}).gbnf,
    "an empty class to trim": 'root ::= "a" [^\\x00-\\U0010FFFF] "b" | "c" x\nx ::= [^\\x00-\\U0010FFFF]? "d"\n',
    "only an empty class": 'root ::= "a" [^\\x00-\\U0010FFFF]\n',
    "overlapping ranges": 'root ::= [a-m] "x" | [h-z] "y" | "hz" | [^a-z] .\n',
    "classes past ASCII": 'root ::= [α-ω]+ "," [^\\u0080-\\uFFFF]* . [\\U0001F600-\\U0001F64F\\t]{2,}\n',
    "rules used in many places": 'root ::= a "-" a ("|" b)* b?\na ::= "x" | "xy" | b\nb ::= [0-9]{0,3} ""\n',
    "layout and escapes": ('# comment\r\nroot   ::= ( "\\x41\\u00e9\\"" | [\\]\\-\\[] # c\r\n'
                           '   "q" {2} | "r"{1,} "s"{0,2} ) [a-]\r\n\n'),
    "an empty-item loop after a character": 'root ::= "x" ("")* ()\n',
    "rules deeper than MAX_GRAMMAR_DEPTH": "".join(
        f"r{i} ::= \"a\" r{i + 1}\n" for i in range(limits.MAX_GRAMMAR_DEPTH + 1)).replace("r0 ", "root ", 1)
        + f"r{limits.MAX_GRAMMAR_DEPTH + 1} ::= \"b\"\n",
}
LEFT_TO_PYTHON = {
    "recursive": json_constraint(RECURSIVE).gbnf,
    "recursive, unreachable from root": 'root ::= "a"\nx ::= "(" x ")" | "b"\n',
    "left-recursive": 'root ::= root "a" | "b"\n',
    "a syntax error": 'root ::= "a" |\n)',
    "an undefined rule": 'root ::= x\n',
    "no root": 'x ::= "a"\n',
    "an empty class": 'root ::= []\n',
    "an empty loop": 'root ::= ("" | "a")*\n',
    "a token reference": 'root ::= <foo>\n',
    "a repetition over 2000": 'root ::= "a"{2001}\n',
    "a bad escape": 'root ::= "\\q"\n',
    "a surrogate": 'root ::= "\ud800"\n',
}


def _answer(text: str, kernel, strict: bool = False) -> object:
    """`gbnf_dfa._built`'s answer for `text` (DFA or None, cells or None), or the error
    message, with `kernel` in use (None: the Python route); `strict`: the kernel must
    decide alone (a grammar it leaves to Python fails the test)."""
    saved = token_choice.KERNEL
    token_choice.KERNEL = kernel
    try:
        return gbnf_dfa._built(text, (lambda: pytest.fail("left to Python")) if strict else
                               (lambda: parse_gbnf(text)))
    except ConstraintError as error:
        return str(error)
    finally:
        token_choice.KERNEL = saved


def _kernel_answer(text: str) -> object:
    from lmq.constraints import _kernel
    bound = min(gbnf_dfa.MAX_DFA_STATES, limits.MAX_STATES)
    return _kernel.grammar_dfa(text, bound, 4 * bound, limits.MAX_GRAMMAR_RULES, limits.MAX_GRAMMAR_DEPTH,
                               gbnf_dfa.character_utf8)


def _assert_identical(compiled, python) -> None:
    """The same answer; a DFA also the same disk entry, and the same once read back."""
    if isinstance(compiled, str) or isinstance(python, str):
        assert compiled == python
        return
    (dfa, cells), (expected, _) = compiled, python
    if dfa is None or expected is None:
        assert dfa is expected
        return
    entry = gbnf_dfa._encoded(dfa, cells)
    assert entry == gbnf_dfa._encoded(expected)
    for got in (dfa, gbnf_dfa._decoded(entry)):
        assert_same_automaton(got, expected)


def assert_same_automaton(got: ByteDfa, expected: ByteDfa) -> None:
    """Every array the same, dtypes included, and the same initial state."""
    for array, expected_array in ((got.transitions, expected.transitions), (got.accepting, expected.accepting),
                                  (got.exits, expected.exits), *zip(got.byte_classes, expected.byte_classes)):
        assert array.dtype == expected_array.dtype and np.array_equal(array, expected_array)
    assert got.initial == expected.initial


@needs_kernel
@pytest.mark.parametrize("name", list(DECIDED))
def test_the_kernel_builds_the_python_routes_dfa(name):
    from lmq.constraints import _kernel
    compiled = _answer(DECIDED[name], _kernel, strict=True)
    _assert_identical(compiled, _answer(DECIDED[name], None))
    if name in ("past MAX_DFA_STATES", "only an empty class", "rules deeper than MAX_GRAMMAR_DEPTH"):
        assert compiled == (None, None)
    else:
        assert compiled[0].n_states > 2 and compiled[1] is not None


@needs_kernel
@pytest.mark.parametrize("name", list(LEFT_TO_PYTHON))
def test_grammars_the_kernel_cannot_vouch_for_are_left_to_python(name):
    from lmq.constraints import _kernel
    text = LEFT_TO_PYTHON[name]
    assert _kernel_answer(text) is NotImplemented
    _assert_identical(_answer(text, _kernel), _answer(text, None))


def _random_grammar(rng: random.Random) -> str:
    """A small GBNF grammar: acyclic rules of literals, classes, groups and repetitions,
    with now and then a slip that makes it an error or recursive."""
    n_rules = rng.randint(1, 4)

    def item(rule: int, depth: int) -> str:
        kind = rng.choice("llccgrr.e" if depth < 3 else "llcc.")
        if kind == "l":
            return '"' + "".join(rng.choice(["a", "b", "\\n", "é", "\\\"", "ab"]) for _ in range(rng.randint(0, 3))) + '"'
        if kind == "c":
            ranges = "".join(rng.choice(["a-c", "b", "0-9", "\\x00-\\x7f", "é-ü", "\\u4e00-\\u4e0f", "x-z", "z-x"])
                             for _ in range(rng.randint(1, 3)))
            return f"[{rng.choice(['', '', '^'])}{ranges}]"
        if kind == "g":
            return "(" + alternatives(rule, depth + 1) + ")" + rng.choice(["", "?", "*", "+", "{2}", "{0,2}", "{1,}"])
        if kind == "r":
            later = list(range(rule + 1, n_rules)) or [rule if rng.random() < 0.1 else None]
            target = rng.choice(later)
            return "x" if target is None else f"r{target}" + rng.choice(["", "?", "{0,2}"])
        return "." if kind == "." else '""'

    def alternatives(rule: int, depth: int) -> str:
        return " | ".join(" ".join(item(rule, depth) for _ in range(rng.randint(1, 3)))
                          for _ in range(rng.randint(1, 3)))

    rules = [f"r{i} ::= {alternatives(i, 0)}" for i in range(n_rules)]
    rules.append('x ::= "q"')
    return "\n".join(rules).replace("r0 ::=", "root ::=", 1).replace("r0", "root") + "\n"


@needs_kernel
def test_random_grammars_get_the_same_answer_from_both_routes():
    from lmq.constraints import _kernel
    rng = random.Random(7)
    decided = 0
    for _ in range(200):
        text = _random_grammar(rng)
        _assert_identical(_answer(text, _kernel), _answer(text, None))
        decided += _kernel_answer(text) not in (None, NotImplemented)
    assert decided > 100


@needs_kernel
def test_mutated_grammars_get_the_same_answer_from_both_routes():
    """Characters of the named grammars inserted, deleted or replaced: mostly errors,
    which the kernel must leave to Python, the rest the same DFA."""
    from lmq.constraints import _kernel
    pieces = list('"[]()|*+?{},-^.#:=\\ \t\r\nabz09é') + ["::=", "\\x41", "\\u00e9", "{2,3}", "\nr1 ::= "]
    grammars = [text for text in [*DECIDED.values(), *LEFT_TO_PYTHON.values()] if len(text) < 3000]
    rng = random.Random(11)
    for _ in range(400):
        text = rng.choice(grammars)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            text = text[:at] + rng.choice(["", rng.choice(pieces)]) + text[at + rng.randint(0, 2):]
        _assert_identical(_answer(text, _kernel), _answer(text, None))
