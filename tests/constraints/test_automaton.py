"""ByteDfa constructors and operations against their set definitions, on random languages
and random byte strings; the normal-form invariants; with_stops against a direct model of
stop phrases; minimality against an independent table-filling algorithm."""

from __future__ import annotations

import operator
import os
import random
import re
import timeit

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmq.constraints import byte_dfa as fa
from lmq.constraints.regex import regex_dfa
from lmq.errors import ConstraintError

from dfa_samples import samples

SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Pieces of test strings: ASCII, a whole two-byte character, and its bytes apart.
PIECES = [b"a", b"b", b".", b"\n", "é".encode(), b"\xc3", b"\xa9", b"ab"]
byte_strings = st.lists(st.sampled_from(PIECES), max_size=7).map(b"".join)
OPS = {"<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
       ">": operator.gt, ">=": operator.ge}


def characters(data: bytes) -> int:
    return sum(1 for byte in data if not 0x80 <= byte <= 0xBF)


def regex_holds(pattern: str, data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return re.fullmatch(pattern, text) is not None


# A language: (automaton, membership predicate written directly from the definition).
leaf_languages = st.one_of(
    st.lists(byte_strings, max_size=4).map(
        lambda items: (fa.options(items), lambda s, items=frozenset(items): s in items)),
    byte_strings.map(lambda sub: (fa.contains(sub), lambda s, sub=sub: sub in s)),
    st.tuples(st.sampled_from(sorted(OPS)), st.integers(-1, 4)).map(
        lambda c: (fa.char_count(*c), lambda s, c=c: OPS[c[0]](characters(s), c[1]))),
    st.sampled_from([r"a*b", r"(ab|\.)+", r"[^a]?é*", r".\n?", r"(a|b)*\.(a|b)*", r""]).map(
        lambda p: (regex_dfa(p), lambda s, p=p: regex_holds(p, s))),
    st.just((fa.any_bytes(), lambda s: True)),
    st.just((fa.empty(), lambda s: False)),
)


def _combine(children):
    pair = st.tuples(children, children)
    return st.one_of(
        pair.map(lambda p: (fa.intersect(p[0][0], p[1][0]),
                            lambda s, p=p: p[0][1](s) and p[1][1](s))),
        pair.map(lambda p: (fa.union(p[0][0], p[1][0]),
                            lambda s, p=p: p[0][1](s) or p[1][1](s))),
        children.map(lambda c: (fa.complement(c[0]), lambda s, c=c: not c[1](s))),
        pair.map(lambda p: (fa.concat(p[0][0], p[1][0]),
                            lambda s, p=p: any(p[0][1](s[:i]) and p[1][1](s[i:])
                                               for i in range(len(s) + 1)))),
    )


languages = st.recursive(leaf_languages, _combine, max_leaves=4)


def check_normal_form(dfa: fa.ByteDfa) -> None:
    """The invariants every ByteDfa handed out must have."""
    table = dfa.transitions
    assert table.dtype == np.int32 and table.shape == (dfa.n_states, 256)
    assert (table[0] == 0).all() and not dfa.accepting[0] and not dfa.exits[0]
    assert not (dfa.accepting & dfa.exits).any()
    byte_class, classed = dfa.byte_classes      # what the mask engine walks: coarsest classes
    assert (classed[:, byte_class] == table).all()
    assert classed.shape[1] == np.unique(table, axis=1).shape[1]
    for state in np.flatnonzero(dfa.exits):
        assert (table[state] == state).all()
    if dfa.initial == 0:
        assert dfa.n_states == 1
        return
    reached = {dfa.initial}
    frontier = [dfa.initial]
    while frontier:
        frontier = [int(t) for s in frontier for t in set(table[s].tolist()) if t not in reached]
        reached.update(frontier)
    assert reached | {0} == set(range(dfa.n_states))     # every state is reachable
    live = set(np.flatnonzero(dfa.accepting | dfa.exits).tolist())
    while True:
        grown = live | {s for s in range(dfa.n_states) if set(table[s].tolist()) & live}
        if grown == live:
            break
        live = grown
    assert live == set(range(1, dfa.n_states))          # every state but 0 is live


def equivalent_pairs(dfa: fa.ByteDfa) -> set[tuple[int, int]]:
    """Pairs of distinct states with the same future (table filling, independent of the
    library's partition refinement); empty for a minimal automaton."""
    n, table = dfa.n_states, dfa.transitions
    kind = [(bool(dfa.accepting[s]), bool(dfa.exits[s])) for s in range(n)]
    distinct = {(p, q) for p in range(n) for q in range(p + 1, n) if kind[p] != kind[q]}
    changed = True
    while changed:
        changed = False
        for p in range(n):
            for q in range(p + 1, n):
                if (p, q) in distinct:
                    continue
                for byte in range(256):
                    a, b = sorted((int(table[p, byte]), int(table[q, byte])))
                    if a != b and (a, b) in distinct:
                        distinct.add((p, q))
                        changed = True
                        break
    return {(p, q) for p in range(n) for q in range(p + 1, n)} - distinct


@SETTINGS
@given(languages, st.lists(byte_strings, min_size=10, max_size=10))
def test_operations_match_their_set_definitions(language, strings):
    dfa, holds = language
    check_normal_form(dfa)
    for data in strings:
        assert fa.matches(dfa, data) == holds(data), data
    for data in samples(dfa, random.Random(len(strings)), 5):
        assert holds(data), data


@settings(max_examples=40, deadline=None)
@given(languages)
def test_automata_are_minimal(language):
    dfa, _ = language
    if dfa.n_states <= 40:
        assert equivalent_pairs(dfa) == set()


def test_constructors_on_examples():
    yes_no = fa.options([b"no", b"nope", b"yes"])
    assert [fa.matches(yes_no, s) for s in (b"no", b"nop", b"nope", b"yes", b"")] == \
        [True, False, True, True, False]
    assert fa.forced_bytes(yes_no, fa.run(yes_no, yes_no.initial, b"y")) == b"es"
    assert fa.forced_bytes(yes_no, fa.run(yes_no, yes_no.initial, b"n")) == b"o"
    assert fa.is_empty(fa.options([])) and fa.is_empty(fa.empty())
    assert fa.is_empty(fa.intersect(fa.literal(b"a"), fa.literal(b"b")))
    three = fa.char_count("==", 3)
    assert fa.matches(three, "héé".encode()) and not fa.matches(three, "hé".encode())
    assert fa.matches(fa.char_count("!=", 0), b"x") and not fa.matches(fa.char_count("<", 0), b"")
    assert fa.contains(b"").n_states == 2 and fa.any_bytes().n_states == 2


@SETTINGS
@given(st.lists(st.lists(st.sampled_from(b"ab\xc3"), max_size=5).map(bytes), min_size=1,
                max_size=5))
def test_forced_bytes_is_the_common_prefix_of_options(items):
    dfa = fa.options(items)
    assert fa.forced_bytes(dfa, dfa.initial) == os.path.commonprefix(items)


@SETTINGS
@given(st.lists(st.lists(st.sampled_from(PIECES), max_size=9).map(b"".join), max_size=9))
def test_options_is_the_automaton_of_the_subset_construction(items):
    """The radix-tree construction of `options` gives the very automaton (same states,
    numbering and table) as determinizing the options' NFA and minimizing it."""
    nfa = fa.Nfa()
    start, final = nfa.state(), nfa.state()
    for data in items:
        here = start
        for byte in data:
            here, previous = nfa.state(), here
            nfa.edge(previous, byte, byte, here)
        nfa.epsilon(here, final)
    expected = nfa.determinize(start, {final}, set())
    dfa = fa.options(items)
    assert dfa.initial == expected.initial
    assert np.array_equal(dfa.transitions, expected.transitions)
    assert np.array_equal(dfa.accepting, expected.accepting)
    assert not dfa.exits.any()


# ---------------------------------------------------------------- stop phrases


def stop_reference(holds, phrases, stream: bytes):
    """What generation of `stream` does under stop phrases: ("stop", index, ok) at the
    first completed phrase (earliest end; then the longest; then the first listed), or
    ("end", None, ok) when no phrase occurs; `ok`: the resulting value is valid."""
    for end in range(1, len(stream) + 1):
        done = [i for i, (p, _) in enumerate(phrases) if stream[:end].endswith(p)]
        if done:
            index = min(done, key=lambda i: (-len(phrases[i][0]), i))
            phrase, keep = phrases[index]
            value = stream[:end] if keep else stream[:end - len(phrase)]
            return "stop", end, holds(value)
    return "end", None, holds(stream)


phrase_lists = st.lists(st.tuples(st.sampled_from([b".", b"\n", b"ab", b"b.", b"b", "é".encode()]),
                                  st.booleans()), min_size=1, max_size=3)


@SETTINGS
@given(leaf_languages, phrase_lists, st.lists(byte_strings, min_size=12, max_size=12))
def test_with_stops_matches_the_stop_rule(language, phrases, streams):
    base, holds = language
    dfa = fa.with_stops(base, phrases)
    check_normal_form(dfa)
    values = fa.stop_values(base, phrases)
    check_normal_form(values)
    assert not values.exits.any()
    streams += samples(dfa, random.Random(7), 6)
    for stream in streams:
        kind, end, ok = stop_reference(holds, phrases, stream)
        if kind == "stop":
            after = fa.run(dfa, dfa.initial, stream[:end])
            assert bool(dfa.exits[after]) == ok and (ok or after == 0), stream
            assert not any(dfa.exits[fa.run(dfa, dfa.initial, stream[:i])]
                           for i in range(end)), stream
            index = min((i for i, (p, _) in enumerate(phrases) if stream[:end].endswith(p)),
                        key=lambda i: (-len(phrases[i][0]), i))
            phrase, keep = phrases[index]
            value = stream[:end] if keep else stream[:end - len(phrase)]
            assert fa.matches(values, value) == ok, stream
        else:
            state = fa.run(dfa, dfa.initial, stream)
            assert not dfa.exits[state]
            assert bool(dfa.accepting[state]) == ok, stream
            assert fa.matches(values, stream) == ok, stream


def test_with_stops_examples():
    sentence = fa.with_stops(fa.any_bytes(), [(b".", True)])
    state = fa.run(sentence, sentence.initial, b"Paris.")
    assert sentence.exits[state] and fa.run(sentence, state, b" more") == state
    # STOPS_BEFORE: the value before the phrase must be in the language
    word = fa.with_stops(regex_dfa("[a-z]+"), [(b"\n", False)])
    assert word.exits[fa.run(word, word.initial, b"abc\n")]
    assert fa.run(word, word.initial, b"\n") == 0         # the empty value is no word
    # the earliest-ending phrase wins, and among equal ends the longest
    both = fa.with_stops(fa.literal(b"xab"), [(b"ab", True), (b"b", False)])
    assert both.exits[fa.run(both, both.initial, b"xab")]
    assert fa.stop_values(fa.any_bytes(), [(b".", False)]).n_states == 2


def test_stop_and_operation_errors_are_constraint_errors():
    stops = fa.with_stops(fa.any_bytes(), [(b".", True)])
    for call in (lambda: fa.complement(stops), lambda: fa.intersect(stops, stops),
                 lambda: fa.concat(stops, stops), lambda: fa.with_stops(stops, [(b"x", True)]),
                 lambda: fa.with_stops(fa.any_bytes(), [(b"", True)]),
                 lambda: fa.char_count("~", 3), lambda: fa.char_count("<", "3"),
                 lambda: fa.options(["text"])):
        with pytest.raises(ConstraintError):
            call()
    either = fa.union(stops, fa.literal(b"no"))        # each side's stop fires on its own
    assert either.exits[fa.run(either, either.initial, b"a.")]
    assert fa.matches(either, b"no") and fa.matches(either, b"abc")


def test_building_small_automata_is_fast():
    """Cold construction of LMQL-style constraints stays far below a millisecond
    (generous bound: the machine is shared; the report gives the measured figures)."""
    cases = [lambda: fa.options([b"yes", b"no", b"maybe", b"never", b"always"]),
             lambda: regex_dfa.__wrapped__(r" ?-?(0|[1-9][0-9]*)"),
             lambda: regex_dfa.__wrapped__(r"[a-z ]+")]
    for case in cases:
        best = min(timeit.repeat(case, number=20, repeat=3)) / 20
        assert best < 0.01, best
