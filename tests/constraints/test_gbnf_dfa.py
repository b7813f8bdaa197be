"""Regular grammars as byte DFAs (`lmq.constraints.gbnf_dfa`): a JSON schema or GBNF
grammar without recursion is enforced by `DfaTokenAutomaton`, with exactly the language
of its GBNF. Checked against llguidance's matcher (the route it replaces: every mask of
random walks equal, documents of each route accepted by the other, near-miss strings
judged alike) and against llama.cpp's own GBNF engine (the near misses too); recursive
and oversized grammars still go to llguidance."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lmq
from bench.constraints import SCHEMA as BENCH_SCHEMA
from gbnf_check import GbnfOracle
from lmq.backends.gguf import load_vocab_only
from lmq.constraints import byte_dfa as fa
from lmq.constraints import gbnf_dfa
from lmq.constraints.gbnf import parse_gbnf
from lmq.constraints.gbnf_dfa import cached_grammar_dfa, grammar_dfa
from lmq.constraints.grammar_automaton import GrammarTokenAutomaton
from lmq.constraints.hole_plan import (HolePlan, attach_automaton, build_automaton,
                                       compile_constraint, plan_from_program)
from lmq.constraints.json_schema import json_constraint
from lmq.constraints.token_masks import DfaTokenAutomaton
from lmq.constraints.vocabulary_cache import clear_caches
from lmq.errors import ConstraintViolation
from vocab_paths import vocab

SCHEMAS = {
    "bench": BENCH_SCHEMA,
    "enums": {"type": "object", "properties": {
        "unit": {"enum": ["m", "km", "mm", "µm", None, 3, True]},
        "kind": {"const": "fixed"}}, "required": ["unit", "kind"]},
    "nested": {"type": "object", "properties": {
        "point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                  "required": ["x", "y"]},
        "flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
        "note": {"type": ["string", "null"], "minLength": 2, "maxLength": 5}},
        "required": ["point", "flags"]},
    "scalars": {"type": "array", "items": {"anyOf": [{"type": "number"}, {"type": "boolean"},
                                                     {"type": "null"}, {"type": "integer"}]},
                "maxItems": 5},
    "unicode": {"type": "object", "properties": {"名前": {"type": "string", "maxLength": 3},
                                                 "mark": {"enum": ["日本", "ü", "\u00e9\u0301"]}},
                "required": ["名前", "mark"]},
    "open": {"type": "object", "additionalProperties": {"type": "integer"}},
}
RECURSIVE = {"type": "object", "properties": {"value": {}}, "required": ["value"]}   # any JSON value


@pytest.fixture(scope="module")
def vocabulary():
    return load_vocab_only(vocab("qwen2")).vocabulary()


@pytest.fixture(scope="module")
def oracle():
    return GbnfOracle()


def _automata(schema, vocabulary) -> tuple[DfaTokenAutomaton, GrammarTokenAutomaton]:
    gbnf = json_constraint(schema).gbnf
    plan = HolePlan("X", grammar=gbnf)
    build_automaton(plan, vocabulary)
    assert isinstance(plan.automaton, DfaTokenAutomaton)
    return plan.automaton, GrammarTokenAutomaton(gbnf, vocabulary, variable="X")


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_regular_schemas_take_the_dfa_route_with_llguidances_masks(vocabulary, name):
    """At every step of random walks, the DFA route's mask, `accepts`, `forced` and
    `complete` equal llguidance's (same tokens allowed in both directions)."""
    dfa, grammar = _automata(SCHEMAS[name], vocabulary)
    lengths = np.array([len(data) for data in vocabulary.token_bytes])
    finished = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        state, matcher = dfa.initial(), grammar.initial()
        for _ in range(80):
            mask, expected = dfa.mask(state), grammar.mask(matcher)
            assert np.array_equal(mask.allowed, expected.allowed)
            assert dfa.accepts(state) == grammar.accepts(matcher)
            assert dfa.complete(state) == grammar.complete(matcher)
            assert dfa.forced(state) == grammar.forced(matcher)
            if mask.count == 0 or dfa.accepts(state) and rng.random() < 0.3:
                finished += dfa.accepts(state)
                break
            choices = mask.allowed
            if rng.random() < 0.8:
                short = choices[lengths[choices] <= 2]
                choices = short if len(short) else choices
            token = int(choices[rng.integers(len(choices))])
            state, matcher = dfa.advance(state, token), grammar.advance(matcher, token)
    assert finished >= 1


def _generated(schema, seeds: range) -> list[tuple[str, list[int]]]:
    documents = []
    for seed in seeds:
        model = lmq.model("random", vocab=vocab("qwen2"), seed=seed)
        result = lmq.run_sync('"Data: [X]" where JSON(X, schema)', model=model, schema=schema)
        documents.append((result.prompt[len("Data: "):], result.tokens["X"]))
    return documents


@pytest.mark.parametrize("name", ["bench", "nested", "unicode"])
def test_documents_of_each_route_are_accepted_by_the_other(vocabulary, cache_home, monkeypatch, name):
    schema = SCHEMAS[name]
    gbnf = json_constraint(schema).gbnf
    dfa = grammar_dfa(parse_gbnf(gbnf))
    by_dfa = _generated(schema, range(3))
    grammar = GrammarTokenAutomaton(gbnf, vocabulary, variable="X")
    for text, tokens in by_dfa:
        json.loads(text)
        state = grammar.initial()
        for token in tokens:
            state = grammar.advance(state, token)          # raises on a token it refuses
        assert grammar.accepts(state), text
    monkeypatch.setattr(gbnf_dfa, "MAX_DFA_STATES", 1)      # every grammar to llguidance
    clear_caches()
    plan = HolePlan("X", grammar=gbnf)
    build_automaton(plan, vocabulary)
    assert isinstance(plan.automaton, GrammarTokenAutomaton)
    by_grammar = _generated(schema, range(3, 6))
    for text, _ in by_grammar:
        assert fa.matches(dfa, text.encode("utf-8")), text
    assert {text for text, _ in by_dfa} != {text for text, _ in by_grammar}


def _near_misses(text: str, rng: np.random.Generator) -> set[str]:
    """Strings one edit away from `text`: characters deleted, doubled or replaced by JSON
    punctuation, escapes and digits."""
    out = set()
    pieces = ['"', "\\", ",", ":", "{", "}", "[", "]", "0", "-", ".", "e", " ", "\\u00e9", "\\x", "é", "\n"]
    for _ in range(60):
        at = int(rng.integers(len(text) + 1))
        kind = rng.integers(3)
        if kind == 0 and at < len(text):
            out.add(text[:at] + text[at + 1:])
        elif kind == 1 and at < len(text):
            out.add(text[:at] + text[at] + text[at:])
        else:
            out.add(text[:at] + pieces[int(rng.integers(len(pieces)))] + text[at + 1:])
    return out


def _llguidance_accepts(grammar: GrammarTokenAutomaton, byte_tokens: dict[int, int], data: bytes) -> bool:
    """llguidance's verdict on `data`, fed one single-byte token at a time."""
    state = grammar.initial()
    try:
        for byte in data:
            state = grammar.advance(state, byte_tokens[byte])
    except ConstraintViolation:
        return False
    return grammar.accepts(state)


@pytest.mark.parametrize("name", ["bench", "enums", "nested", "scalars", "unicode"])
def test_near_miss_strings_are_judged_alike_by_both_routes_and_llama_cpp(vocabulary, oracle, name):
    schema = SCHEMAS[name]
    gbnf = json_constraint(schema).gbnf
    dfa = grammar_dfa(parse_gbnf(gbnf))
    grammar = GrammarTokenAutomaton(gbnf, vocabulary, variable="X")
    byte_tokens = {data[0]: token for token, data in enumerate(vocabulary.token_bytes) if len(data) == 1}
    rng = np.random.default_rng(1)
    documents = [text for text, _ in _generated(schema, range(2))]
    rejected = 0
    for text in documents:
        assert fa.matches(dfa, text.encode()) and oracle.accepts(gbnf, text.encode())
        for miss in _near_misses(text, rng):
            ours = fa.matches(dfa, miss.encode())
            assert ours == _llguidance_accepts(grammar, byte_tokens, miss.encode()), miss
            assert ours == oracle.accepts(gbnf, miss.encode()), miss
            rejected += not ours
    assert rejected >= 20


def test_max_length_counts_characters_and_escapes_as_one():
    dfa = grammar_dfa(parse_gbnf(json_constraint({"type": "string", "maxLength": 3}).gbnf))
    for text, ok in [('"abc"', True), ('"abcd"', False), ('"éü😀"', True), ('"éü😀x"', False),
                     ('"\\u00e9\\n\\""', True), ('"\\u00e9\\n\\"a"', False), ('"\\x"', False),
                     ('"a\nb"', False), ('""', True), (b'"\xed\xa0\x80"', False), (b'"\xff"', False)]:
        assert fa.matches(dfa, text if isinstance(text, bytes) else text.encode()) == ok, text


def test_number_syntax_is_json_numbers():
    dfa = grammar_dfa(parse_gbnf(json_constraint({"type": "number"}).gbnf))
    for text in ["0", "-0", "12", "1.5", "-1.25e10", "3E-2", "0.0"]:
        assert fa.matches(dfa, text.encode()), text
    for text in ["01", "1.", ".5", "+1", "1e", "--1", "1.5.2", " 1"]:
        assert not fa.matches(dfa, text.encode()), text


def test_recursive_and_oversized_grammars_stay_with_llguidance(vocabulary):
    gbnf = json_constraint(RECURSIVE).gbnf
    assert grammar_dfa(parse_gbnf(gbnf)) is None
    plan = HolePlan("X", grammar=gbnf)
    build_automaton(plan, vocabulary)
    assert isinstance(plan.automaton, GrammarTokenAutomaton)
    model = lmq.model("random", vocab=vocab("qwen2"), seed=2)
    result = lmq.run_sync('"Data: [X]" where JSON(X, schema)', model=model, schema=RECURSIVE)
    assert set(result.variables["X"]) == {"value"}
    long = {"type": "array", "items": {"type": "string", "maxLength": 90}, "maxItems": 9}
    assert grammar_dfa(parse_gbnf(json_constraint(long).gbnf)) is None


def test_regular_gbnf_grammar_holes_take_the_dfa_route_too(vocabulary):
    plan = HolePlan("X", grammar='root ::= ("yes" | "no") " " [0-9]{1,3}\n')
    build_automaton(plan, vocabulary)
    assert isinstance(plan.automaton, DfaTokenAutomaton)
    model = lmq.model("random", vocab=vocab("qwen2"), seed=4)
    result = lmq.run_sync('"Answer: [X]" where GRAMMAR(X, g)', model=model,
                          g='root ::= ("yes" | "no") " " [0-9]{1,3}\n')
    word, number = result.variables["X"].split(" ")
    assert word in ("yes", "no") and 1 <= len(number) <= 3 and number.isdigit()


def test_a_dfa_is_kept_on_disk_and_read_back_without_building(cache_home, monkeypatch):
    gbnf = json_constraint(BENCH_SCHEMA).gbnf
    first = cached_grammar_dfa(gbnf, "JSON")
    assert cached_grammar_dfa(json_constraint(RECURSIVE).gbnf, "JSON") is None
    clear_caches()                                  # a new process: only the disk is left
    monkeypatch.setattr(gbnf_dfa, "_built", lambda text, parsed: pytest.fail("rebuilt"))
    again = cached_grammar_dfa(gbnf, "JSON")
    assert np.array_equal(again.transitions, first.transitions)
    assert np.array_equal(again.accepting, first.accepting)
    assert np.array_equal(again.byte_classes[1][:, again.byte_classes[0]], again.transitions)
    assert cached_grammar_dfa(json_constraint(RECURSIVE).gbnf, "JSON") is None


def test_the_dfa_is_trimmed_and_breadth_first_like_every_byte_dfa():
    dfa = grammar_dfa(parse_gbnf(json_constraint(SCHEMAS["nested"]).gbnf))
    assert dfa.initial == 1 and not dfa.exits.any()
    assert (dfa.transitions[0] == 0).all()
    table = dfa.transitions.tolist()
    order, seen = [1], {0, 1}
    for state in order:
        for target in table[state]:
            if target not in seen:
                seen.add(target)
                order.append(target)
    assert order == list(range(1, dfa.n_states))
    minimal = fa.complement(fa.complement(dfa))     # _finish minimizes
    assert minimal.n_states <= dfa.n_states <= minimal.n_states + 8


def test_servers_compile_a_regular_grammar_to_its_dfa(vocabulary):
    plan = HolePlan("X", grammar=json_constraint(SCHEMAS["nested"]).gbnf)
    compiled = compile_constraint(plan)
    assert compiled.dfa is not None and compiled.grammar is None
    attach_automaton(plan, compiled, vocabulary)
    assert isinstance(plan.automaton, DfaTokenAutomaton)
    assert plan.to_program()["grammar"] == plan.grammar
    received = plan_from_program(plan.to_program(), vocabulary)
    assert isinstance(received.automaton, DfaTokenAutomaton) and received.grammar == plan.grammar
    recursive = HolePlan("X", grammar=json_constraint(RECURSIVE).gbnf)
    assert compile_constraint(recursive).grammar is not None


def test_a_json_hole_on_the_dfa_route_ends_on_its_closing_brace_and_is_rechecked():
    model = lmq.model("random", vocab=vocab("qwen2"), seed=5)
    result = lmq.run_sync('"Data: [X] and more"  where JSON(X, schema)', model=model,
                          schema=SCHEMAS["nested"])
    text = result.prompt[len("Data: "):-len(" and more")]
    assert json.loads(text) == result.variables["X"] and text.endswith("}")
    gbnf = json_constraint(SCHEMAS["nested"]).gbnf
    plan = HolePlan("X", grammar=gbnf)
    build_automaton(plan, load_vocab_only(vocab("qwen2")).vocabulary())
    state = plan.automaton.initial()
    for token in result.tokens["X"]:
        state = plan.automaton.advance(state, token)
    assert plan.automaton.complete(state)


def test_a_refused_token_fails_the_soundness_recheck():
    from lmq.runtime.interpreter import _grammar_accepts
    from lmq.constraints.hole_plan import HoleOutput
    vocabulary = load_vocab_only(vocab("qwen2")).vocabulary()
    plan = HolePlan("X", grammar=json_constraint(SCHEMAS["nested"]).gbnf)
    build_automaton(plan, vocabulary)
    brace = vocabulary.token_bytes.index(b"}")
    assert not _grammar_accepts(plan, HoleOutput([brace], b"}", "end", 0.0))


def test_a_vocabulary_keeps_a_bounded_number_of_regular_grammar_automata(vocabulary, cache_home):
    """Each regular grammar's automaton may hold tens of MiB of dense masks, so a process
    meeting many schemas keeps only the most recently used ones; a schema met again while
    kept gets the same automaton (its masks already computed)."""
    from lmq.constraints.vocabulary_cache import GRAMMAR_AUTOMATA_SIZE, vocabulary_cache
    schemas = [{"type": "object", "properties": {f"field{k}": {"type": "integer"}},
                "required": [f"field{k}"]} for k in range(GRAMMAR_AUTOMATA_SIZE + 2)]

    def automaton(schema):
        plan = HolePlan("X", grammar=json_constraint(schema).gbnf)
        build_automaton(plan, vocabulary)
        assert isinstance(plan.automaton, DfaTokenAutomaton)
        return plan.automaton

    first = automaton(schemas[0])
    assert automaton(schemas[0]) is first
    for schema in schemas[1:]:
        automaton(schema)
    assert len(vocabulary_cache(vocabulary).grammar_automata) == GRAMMAR_AUTOMATA_SIZE
    assert automaton(schemas[-1]) is automaton(schemas[-1])
    assert automaton(schemas[0]) is not first          # dropped, then built again
