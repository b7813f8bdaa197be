"""regex_dfa against Python's `re.fullmatch` on generated patterns and strings (non-ASCII
included), and exhaustively on every short string of a tiny alphabet; the Unicode class
tables against the running Python, UTF-8 well-formedness, the fixed INT/FLOAT patterns,
the errors for unsupported constructs and the size limits.

`LMQ_LONG_PROPERTIES=1` runs the exhaustive comparison on 5,000 patterns and strings up
to six characters (about a minute) instead of 300 patterns and five characters."""

from __future__ import annotations

import itertools
import os
import random
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmq.constraints import byte_dfa as fa
from lmq.constraints import limits, unicode_classes, unicode_tables
from lmq.constraints.regex import FLOAT_PATTERN, INT_PATTERN, regex_dfa
from lmq.errors import ConstraintError, ConstraintTooLarge

from dfa_samples import samples

# Characters the generated patterns and strings draw on: ASCII, Latin-1, a 3-byte and a
# 4-byte character, an Arabic-Indic digit (\d), a Cyrillic letter (\w), an em space (\s).
ALPHABET = ["a", "b", "c", "0", "7", "_", " ", "\n", ".", "-", "é", "€", "😀", "٣", "ж",
            "\u2003"]
ATOMS = [re.escape(c) for c in ALPHABET] + [
    ".", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", "[ab]", "[^a]", "[a-c0-9]", "[^\\d\\s]",
    "[é-ж]", "[^€😀]", r"\u00e9", r"\x41", "[\\w.]", "(?s:.)"]

text = st.lists(st.sampled_from(ALPHABET), max_size=6).map("".join)


def _quantified(inner: st.SearchStrategy) -> st.SearchStrategy:
    quantifiers = st.sampled_from(["*", "+", "?", "{2}", "{1,}", "{0,2}", "{1,3}", "*?",
                                   "+?", "??", "{1,2}?"])
    return st.tuples(inner, quantifiers).map(lambda p: f"(?:{p[0]}){p[1]}")


patterns = st.recursive(
    st.sampled_from(ATOMS),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        _quantified(inner),
        inner.map(lambda p: f"({p})"),
    ),
    max_leaves=6)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patterns, st.lists(text, min_size=15, max_size=15))
def test_regex_dfa_agrees_with_re_fullmatch(pattern, strings):
    dfa = regex_dfa(pattern)
    for string in strings:
        assert fa.matches(dfa, string.encode()) == (re.fullmatch(pattern, string) is not None), \
            (pattern, string)
    for data in samples(dfa, random.Random(0), 8):       # walks through the automaton
        assert re.fullmatch(pattern, data.decode("utf-8")), (pattern, data)


def test_unicode_tables_are_those_of_this_python():
    for name, predicate in unicode_classes.PREDICATES.items():
        assert unicode_classes.class_ranges(name) == unicode_classes.code_point_ranges(predicate)


def test_generated_tables_cover_the_supported_pythons():
    """Python 3.10 to 3.13 (Unicode 13.0 to 15.1) use a generated table, not a scan."""
    assert {"13.0.0", "14.0.0", "15.0.0", "15.1.0"} <= set(unicode_tables.TABLES)


@pytest.mark.parametrize("pattern", [r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", ".", "[^a]",
                                     "(?a)\\w", "(?a)\\S", "(?s:.)"])
def test_classes_agree_with_re_on_sampled_code_points(pattern):
    dfa = regex_dfa(pattern)
    rng = random.Random(pattern)
    codes = {c for low, high in unicode_classes.class_ranges("WORD") + unicode_classes.class_ranges("SPACE")
             for c in (low - 1, low, high, high + 1)}
    codes |= {rng.randrange(0x110000) for _ in range(3000)} | set(range(0x300))
    for code in sorted(codes):
        if 0 <= code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
            char = chr(code)
            assert fa.matches(dfa, char.encode()) == bool(re.fullmatch(pattern, char)), hex(code)


def test_negated_classes_and_dot_accept_only_well_formed_utf8():
    for pattern in [".", "[^a]", r"\W", "(?s).*"]:
        dfa = regex_dfa(pattern)
        for bad in [b"\x80", b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xed\xa0\x80",
                    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\xc3"]:
            assert not fa.matches(dfa, bad), (pattern, bad)
        for data in samples(dfa, random.Random(1), 200):
            data.decode("utf-8")                         # raises on malformed bytes
    assert fa.matches(fa.valid_utf8(), "a€😀".encode())
    assert not fa.matches(fa.valid_utf8(), b"a\xed\xa0\x80")


def test_int_and_float_patterns():
    integer, number = regex_dfa(INT_PATTERN), regex_dfa(FLOAT_PATTERN)
    for good in ["0", "7", "-12", " 42", " -0", "1234567890"]:
        assert fa.matches(integer, good.encode()) and fa.matches(number, good.encode())
    for bad in ["", "01", "+1", "  1", "1 ", "-", "1.5", "1e3", "٣"]:
        assert not fa.matches(integer, bad.encode()), bad
    for good in ["0.5", "-3.25", " 10.0"]:
        assert fa.matches(number, good.encode())
    for bad in ["1.", ".5", "00.1", "1.2.3"]:
        assert not fa.matches(number, bad.encode()), bad
    assert fa.forced_bytes(integer, fa.run(integer, integer.initial, b"-")) == b""


@pytest.mark.parametrize("pattern, construct", [
    ("^a", "^"), ("a$", "$"), (r"\bword", r"\b"), (r"\Aa", r"\A"), ("a(?=b)", "lookaround"),
    ("(?<!a)b", "negative lookaround"), (r"(a)\1", "backreference"), ("(?i)abc", "IGNORECASE"),
    ("a*+", "possessive"), ("(?>a)", "atomic group"), ("(?i:a)b", "IGNORECASE"),
    ("(a)?(?(1)b|c)", "conditional")])
def test_unsupported_constructs_are_named(pattern, construct):
    with pytest.raises(ConstraintError) as error:
        regex_dfa(pattern)
    assert construct in str(error.value) and repr(pattern) in str(error.value)


@pytest.mark.parametrize("pattern", ["(", "a{2,1}", "[b-a]", "*a", "\\"])
def test_invalid_regexes_are_constraint_errors(pattern):
    with pytest.raises(ConstraintError, match="invalid regex"):
        regex_dfa(pattern)


def test_flags_and_groups_that_are_supported():
    assert fa.matches(regex_dfa("(?s)a.b"), b"a\nb") and not fa.matches(regex_dfa("a.b"), b"a\nb")
    assert fa.matches(regex_dfa("(?x) a  b # comment"), b"ab")
    assert not fa.matches(regex_dfa(r"(?a)\w"), "é".encode())
    assert fa.matches(regex_dfa(r"(?P<year>\d{4})-(?P<month>\d\d)"), b"2024-05")
    assert fa.matches(regex_dfa(""), b"") and fa.is_empty(regex_dfa("[^\\s\\S]"))


# --- exhaustive comparison on a tiny alphabet -------------------------------------------------

LONG = os.environ.get("LMQ_LONG_PROPERTIES") == "1"
TINY = "abé"                       # é: a two-byte character, so byte-level slips show
TINY_LENGTH = 6 if LONG else 5
TINY_STRINGS = ["".join(letters) for n in range(TINY_LENGTH + 1)
                for letters in itertools.product(TINY, repeat=n)]
TINY_ATOMS = ["a", "b", "é", "[ab]", "[^a]", ".", "[a-é]", "[^ab]", "(?:)", r"\w"]
TINY_QUANTIFIERS = ["*", "+", "?", "{2}", "{0,2}", "{1,3}", "{2,}", "*?", "+?", "{1,2}?"]

tiny_patterns = st.recursive(
    st.sampled_from(TINY_ATOMS),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        st.tuples(inner, st.sampled_from(TINY_QUANTIFIERS)).map(lambda p: f"({p[0]}){p[1]}"),
        st.tuples(inner, st.sampled_from(TINY_QUANTIFIERS)).map(lambda p: f"(?:{p[0]}){p[1]}"),
    ),
    max_leaves=7)


@settings(max_examples=5000 if LONG else 300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(tiny_patterns)
def test_regex_dfa_agrees_with_re_on_every_short_string(pattern):
    """Every string of up to five (six) characters over a, b, é: nothing a generated
    pattern's automaton decides can differ from Python's `re.fullmatch`."""
    dfa = regex_dfa(pattern)
    compiled = re.compile(pattern)
    wrong = [s for s in TINY_STRINGS
             if fa.matches(dfa, s.encode()) != (compiled.fullmatch(s) is not None)]
    assert not wrong, (pattern, wrong[:5])


@pytest.mark.parametrize("pattern, wrongly_accepted", [
    ("(ab+)*", ["b", "bb", "bab", "abba"]),
    ("(ab*)*", ["b", "bb", "bab"]),
    ("(a[bc]+)*", ["b", "c", "bc", "abcb" + "a"]),
    (r"(,[0-9]+)*", ["1", ",1,", "1,2"]),
    (r"(\.[0-9]+)*", ["1", ".1.", "12"]),
    (r"(-\d+)*", ["1", "-1-", "1-2"]),
    ("(ab+)*c", ["bc", "bbc", "abbcc"]),
    ("(a(bc)*)+", ["bc", "abcc"]),
    ("((ab)+c?)*", ["b", "c", "abcc"]),
])
def test_star_over_a_body_ending_in_a_loop(pattern, wrongly_accepted):
    """The reported unsound cases: a star over a group whose body ends in a loop."""
    dfa = regex_dfa(pattern)
    for string in wrongly_accepted:
        assert re.fullmatch(pattern, string) is None, string
        assert not fa.matches(dfa, string.encode()), (pattern, string)
    for data in samples(dfa, random.Random(0), 50):
        assert re.fullmatch(pattern, data.decode("utf-8")), (pattern, data)


# --- size limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", [r"(a|b)*a(a|b){20}", r".*a.{40}", r"\w{1000}",
                                     "(a{1000}){1000}", "a{40000000}", "x{2,4294967294}"])
def test_blow_ups_are_refused_at_once(pattern):
    """Exponential determinization or huge counters: a `ConstraintTooLarge` naming the
    regex and the limit, within a generous time bound (they took minutes and gigabytes)."""
    started = time.monotonic()
    with pytest.raises(ConstraintTooLarge, match=r"constraint too large: .* the limit is") as error:
        regex_dfa(pattern)
    assert time.monotonic() - started < 5
    assert repr(pattern)[:40] in str(error.value) and f"{limits.MAX_STATES:,}" in str(error.value)


def test_the_state_limit_is_a_setting(monkeypatch):
    assert regex_dfa.__wrapped__(r"[ab]{1,3000}").n_states > 3000
    monkeypatch.setattr(limits, "MAX_STATES", 1000)
    with pytest.raises(ConstraintTooLarge, match="the limit is 1,000"):
        regex_dfa.__wrapped__(r"[ab]{1,3000}")


@pytest.mark.parametrize("pattern", ["a{2," + str(10 ** 30) + "}", "a{" + str(10 ** 30) + "}"])
def test_repetition_counts_beyond_python_are_constraint_errors(pattern):
    with pytest.raises(ConstraintError, match="repetition number is too large"):
        regex_dfa(pattern)
