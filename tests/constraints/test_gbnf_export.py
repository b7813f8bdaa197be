"""dfa_to_gbnf cross-checked with llama.cpp's own GBNF engine (through llama-cpp-python):
strings sampled from each automaton are accepted by the exported grammar, and on random
and mutated strings the grammar accepts exactly what the automaton's value language holds."""

from __future__ import annotations

import random

import pytest

from lmq.constraints import byte_dfa as fa
from lmq.constraints.gbnf_export import dfa_to_gbnf
from lmq.constraints.regex import FLOAT_PATTERN, INT_PATTERN, regex_dfa
from lmq.errors import ConstraintError

from dfa_samples import samples
from gbnf_check import GbnfOracle

ALPHABET = ["a", "b", "c", "y", "e", "s", "n", "o", "p", "0", "1", "9", "-", " ", ".", "\n",
            "é", "€", "😀", "٣", "ж"]

CASES = {
    "INT": lambda: regex_dfa(INT_PATTERN),
    "FLOAT": lambda: regex_dfa(FLOAT_PATTERN),
    "in list": lambda: fa.options([b"yes", b"no", b"nope", "née".encode(), "😀".encode()]),
    "regex classes": lambda: regex_dfa(r"[^a]\w{1,3}(é|€)*"),
    "unicode digits": lambda: regex_dfa(r"\d+"),
    "contains": lambda: fa.contains(b"ab"),
    "not in": lambda: fa.complement(fa.options([b"no", b"yes", b""])),
    "len and regex": lambda: fa.intersect(fa.char_count("<", 4), regex_dfa("[a-cé ]*")),
    "len == 2": lambda: fa.char_count("==", 2),
    "or": lambda: fa.union(regex_dfa("[0-9]+"), fa.literal("né".encode())),
    "STOPS_AT": lambda: fa.with_stops(fa.any_bytes(), [(b".", True)]),
    "STOPS_BEFORE": lambda: fa.with_stops(regex_dfa("[a-z ]+"), [(b"\n", False), (b"no", True)]),
    "stop values": lambda: fa.stop_values(regex_dfa("[a-z ]+"), [(b"\n", False), (b"no", True)]),
}


@pytest.fixture(scope="module")
def oracle() -> GbnfOracle:
    return GbnfOracle()


def in_grammar_language(dfa: fa.ByteDfa, data: bytes) -> bool:
    """What the exported grammar must accept: well-formed UTF-8 that ends at an accepting
    state or exactly at the byte that reaches an exit."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    state = fa.run(dfa, dfa.initial, data)
    if dfa.accepting[state]:
        return True
    return bool(dfa.exits[state]) and data != b"" and \
        not dfa.exits[fa.run(dfa, dfa.initial, data[:-1])]


def mutations(data: bytes, rng: random.Random) -> list[bytes]:
    text = data.decode("utf-8")
    out = []
    for _ in range(3):
        position = rng.randrange(len(text) + 1)
        char = rng.choice(ALPHABET)
        out += [text[:position] + char + text[position:],
                text[:position] + char + text[position + 1:],
                text[:position] + text[position + 1:]]
    return [item.encode() for item in out]


@pytest.mark.parametrize("name", sorted(CASES))
def test_exported_grammar_accepts_exactly_the_language(name, oracle):
    dfa = CASES[name]()
    grammar = dfa_to_gbnf(dfa)
    rng = random.Random(name)
    sampled = samples(dfa, rng, 12, utf8=True)
    assert sampled, name
    for data in sampled:
        assert in_grammar_language(dfa, data), data
        assert oracle.accepts(grammar, data), (name, data, grammar)
    others = [data for item in sampled for data in mutations(item, rng)]
    others += ["".join(rng.choice(ALPHABET) for _ in range(rng.randrange(6))).encode()
               for _ in range(20)]
    for data in others:
        assert oracle.accepts(grammar, data) == in_grammar_language(dfa, data), \
            (name, data, grammar)


def test_stops_before_grammar_ends_with_the_phrase(oracle):
    stream = CASES["STOPS_BEFORE"]()
    grammar = dfa_to_gbnf(stream)
    assert oracle.accepts(grammar, b"an apple\n")           # the engine generates the phrase
    assert not oracle.accepts(grammar, b"an apple\nmore")   # … and must end right there
    assert oracle.accepts(grammar, b"say no")               # STOPS_AT keeps its phrase
    values = dfa_to_gbnf(CASES["stop values"]())
    assert oracle.accepts(values, b"an apple") and not oracle.accepts(values, b"an apple\n")


def test_grammars_are_compact_and_readable():
    assert dfa_to_gbnf(fa.literal(b"hello world")) == 'root ::= "hello world"\n'
    assert dfa_to_gbnf(regex_dfa("[a-z]+")) == "root ::= [a-z] s1\ns1 ::= [a-z] s1 | \"\"\n"
    assert len(dfa_to_gbnf(regex_dfa(r"\w+")).splitlines()) == 2


def test_empty_language_has_no_grammar():
    for dfa in (fa.empty(), fa.intersect(fa.literal(b"a"), fa.literal(b"b")),
                fa.literal(b"\xff")):
        with pytest.raises(ConstraintError, match="no GBNF grammar"):
            dfa_to_gbnf(dfa)
