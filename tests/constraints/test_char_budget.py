"""`len(X) < n` as a character budget the decoder counts: its masks equal those of the
exact product automaton (value language ∩ at most n characters) on the five shared
vocabularies, the vocabulary walk equals a per-token walk, a budget of 10**9 costs
nothing, and a value that cannot fit is unsatisfiable before decoding."""

from __future__ import annotations

import glob
import os
import random

import numpy as np
import pytest

import lmq
from lmq.backends.gguf import load_vocab_only
from lmq.compiler.codegen import compile_query
from lmq.constraints import byte_dfa as fa
from lmq.constraints.char_budget import CharBudgetAutomaton, token_characters, walk_vocabulary
from lmq.constraints.gbnf import parse_gbnf
from lmq.constraints.languages import stopped_dfa
from lmq.constraints.token_budget import TokenWindow
from lmq.constraints.token_masks import DfaTokenAutomaton
from lmq.constraints.vocabulary_index import vocabulary_index
from lmq.runtime.hole import lower_hole

VOCABULARIES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared",
                                             "vocab", "*.gguf")))
LANGUAGES = [("regex", r"[a-z ]+"), ("regex", r"(ab+)*c?"), ("regex", r" ?-?(0|[1-9][0-9]*)"),
             ("regex", r"[^a-z]{3,}é"), ("in", (b" yes", b" no", "日本語".encode(), b"x" * 9)),
             ("not", ("contains", b"e")), ("chars", ">=", 0)]
STOPS = [(), ((b"\n\n", True), (b"e", True))]


@pytest.fixture(scope="module", params=VOCABULARIES, ids=os.path.basename)
def vocabulary(request):
    return load_vocab_only(request.param).vocabulary()


def _characters(data: bytes) -> int:
    return sum(1 for byte in data if not 0x80 <= byte <= 0xBF)


def test_vocabulary_walk_equals_a_per_token_walk(vocabulary):
    index = vocabulary_index(vocabulary)
    table = vocabulary.token_bytes
    chars = token_characters(index, table)
    assert chars.tolist() == [_characters(data) for data in table]
    dfa = stopped_dfa(("regex", r"[a-z é]+"), ((b"e ", True),))
    rng = random.Random(0)
    for state in range(1, dfa.n_states):
        ends, read = walk_vocabulary(index, dfa.transitions, dfa.exits, state)
        for token in rng.sample(range(len(table)), 3000):
            here, count = state, 0
            for byte in table[token]:
                if here == fa.DEAD or dfa.exits[here]:
                    break
                count += not 0x80 <= byte <= 0xBF
                here = int(dfa.transitions[here, byte])
            if not table[token]:
                here = fa.DEAD
            assert ends[token] == here, token
            assert here == fa.DEAD or read[token] == count, token


WINDOWS = (TokenWindow.of(1, 1), TokenWindow.of(0, 3), TokenWindow.of(3, None))


@pytest.mark.parametrize("stops", STOPS, ids=["no stops", "two STOPS_AT"])
def test_budget_masks_equal_the_exact_product(vocabulary, stops):
    """Random walks through both automata, in step: the same tokens are allowed, the same
    states accept, and the last-token masks agree, for limits from 0 to 14 characters."""
    index = vocabulary_index(vocabulary)
    table = vocabulary.token_bytes
    rng = random.Random(f"budget-{len(table)}-{len(stops)}")
    for key in LANGUAGES:
        base = DfaTokenAutomaton(stopped_dfa(key, stops), index, table)
        for limit in rng.sample(range(15), 2):
            product = stopped_dfa(("and", (key, ("chars", "<=", limit))), stops)
            exact = DfaTokenAutomaton(product, index, table)
            budget = CharBudgetAutomaton(base, limit)
            state, counted = exact.initial(), budget.initial()
            for _ in range(6):
                mask = exact.mask(state)
                assert np.array_equal(budget.mask(counted).allowed, mask.allowed), (key, limit)
                assert budget.accepts(counted) == exact.accepts(state)
                for window in WINDOWS:             # the last token; at most 3; at least 3
                    assert np.array_equal(budget.budget_mask(counted, window).allowed,
                                          exact.budget_mask(state, window).allowed), (key, limit, window)
                if not mask.count or exact.is_exit(state):
                    break
                token = int(mask.allowed[rng.randrange(mask.count)])
                state, counted = exact.advance(state, token), budget.advance(counted, token)
                assert counted[1] <= limit


def test_stops_before_inside_a_token_is_never_unsound(vocabulary):
    """A STOPS_BEFORE phrase counts toward the budget when a token completes it (the
    automaton cannot tell which phrase fired): the budget allows a subset of the exact
    product's tokens, never more."""
    index = vocabulary_index(vocabulary)
    stops = ((b"e", False),)
    base = DfaTokenAutomaton(stopped_dfa(("regex", r"[a-z ]+"), stops), index,
                             vocabulary.token_bytes)
    for limit in (1, 3, 6):
        exact = DfaTokenAutomaton(stopped_dfa(("and", (("regex", r"[a-z ]+"),
                                                       ("chars", "<=", limit))), stops),
                                  index, vocabulary.token_bytes)
        budget = CharBudgetAutomaton(base, limit)
        allowed = set(budget.mask(budget.initial()).allowed.tolist())
        assert allowed and allowed <= set(exact.mask(exact.initial()).allowed.tolist())


def test_a_billion_characters_is_a_budget_not_states(random_model):
    for seed in range(5):
        result = lmq.run_sync('"[X]" where len(X) < 10**9 and len(TOKENS(X)) < 40',
                              model=random_model(seed, end_probability=0))
        assert len(result.tokens["X"]) == 39
    result = lmq.run_sync('"[X]" where REGEX(X, r"[a-z]+( [a-z]+)*") and len(X) <= 100000 '
                          'and len(TOKENS(X)) < 30', model=random_model(1, end_probability=0))
    assert result.variables["X"] and len(result.tokens["X"]) == 29


@pytest.mark.parametrize("bound", [5, 17, 300, 2000])
def test_values_respect_the_character_bound_exactly(bound, random_model):
    """No end tokens: the model keeps writing until the budget forces the end, and the
    value uses the budget up to its last character (tokens that would exceed it are
    masked, tokens that fit are not)."""
    for seed in range(8):
        result = lmq.run_sync(f'"[X]" where len(X) <= {bound} and REGEX(X, r"[^\\n]+")',
                              model=random_model(seed, end_probability=0))
        assert len(result.variables["X"]) == bound, (seed, result.variables["X"])


def test_a_value_that_cannot_fit_is_unsatisfiable_before_decoding(random_model):
    with pytest.raises(lmq.UnsatisfiableConstraint, match=r"\bX\b"):
        lmq.run_sync('"[X]" where len(X) < 300 and X == "a" * 400', model=random_model())
    with pytest.raises(lmq.UnsatisfiableConstraint, match=r"\bX\b"):
        lmq.run_sync('"[X]" where len(X) <= 1000 and REGEX(X, "a{1001,}")', model=random_model())


def test_gbnf_export_spells_out_small_budgets_and_notes_large_ones():
    def grammar(clause: str) -> str:
        spec = compile_query(f'"[X]" where {clause}').holes[0]
        return lower_hole("X", spec.where, {}).gbnf()

    small = grammar('len(X) < 3 and REGEX(X, "[ab]+")')
    assert not small.startswith("#") and "root" in small
    assert parse_gbnf(small)
    large = grammar('len(X) < 10**9 and REGEX(X, "[ab]+")')
    assert large.startswith("# and at most 999999999 characters")
    assert parse_gbnf(large) and large.split("\n", 1)[1] == grammar('REGEX(X, "[ab]+")')
