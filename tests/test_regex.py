"""regex_dfa against Python's `re.fullmatch` on generated patterns and strings (non-ASCII
included), the Unicode class tables against the running Python, UTF-8 well-formedness,
the fixed INT/FLOAT patterns and the errors for unsupported constructs."""

from __future__ import annotations

import random
import re
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lmq.compiler import automaton as fa
from lmq.compiler import unicode_classes
from lmq.compiler.regex import FLOAT_PATTERN, INT_PATTERN, regex_dfa
from lmq.errors import ConstraintError

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
    if unicodedata.unidata_version != unicode_classes.UNICODE_VERSION:
        pytest.fail(f"regenerate lmq/compiler/unicode_classes.py for Unicode "
                    f"{unicodedata.unidata_version} (python -m lmq.compiler.unicode_classes)")
    for name, predicate in unicode_classes.PREDICATES.items():
        assert getattr(unicode_classes, name) == unicode_classes.code_point_ranges(predicate)


@pytest.mark.parametrize("pattern", [r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", ".", "[^a]",
                                     "(?a)\\w", "(?a)\\S", "(?s:.)"])
def test_classes_agree_with_re_on_sampled_code_points(pattern):
    dfa = regex_dfa(pattern)
    rng = random.Random(pattern)
    codes = {c for low, high in unicode_classes.WORD + unicode_classes.SPACE
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
