"""Malformed queries give LmqSyntaxError with the right line, a column and a caret."""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import lmq
from lmq.compiler.codegen import compile_query
from lmq.compiler.parser import parse_query

MALFORMED = [
    ('"ok"\n"unterminated\n', 2, "unterminated string"),
    ('"ok"\nif x:\n"not indented"\n', 3, "unexpected"),
    ('"a"\n"b [X"\n', 2, "unclosed '['"),
    ('"a"\n"b"\n"c [1x]"\n', 3, "not a variable name"),
    ('"a ] b"\n', 1, "single ']'"),
    ('"a"\n"b } c"\n', 2, "single '}'"),
    ('"a"\n"[X]" where len(TOKENS(X)) <\n', 2, "unexpected"),
    ('"a"\n"[X]" where not STOPS_AT(X, ".")\n', 2, "cannot be negated"),
    ('argmax\n    "a [X]"\nfrom\n    "m"\n    "n"\n', 5, "one expression"),
    ('"a"\n"[X]" where\n', 2, "unexpected end of line"),
    ('"a"\n"[X]" where TOKENS(X) < 3\n', 2, "len(TOKENS(X))"),
    ('"a"\nfor i in range(3):\n    "[X]"\n  "bad dedent"\n', 4, "indentation"),
    ('"ok"\nbreak\n', 2, "outside loop"),
    ('"a {} b"\n', 1, "empty interpolation"),
    ('"[X: ]"\n', 1, "empty annotation"),
]


@pytest.mark.parametrize("source,line,message", MALFORMED)
def test_malformed_query_reports_line(source, line, message):
    with pytest.raises(lmq.LmqSyntaxError) as info:
        compile_query(source, "q.lmq")
    error = info.value
    assert error.line == line
    assert message in error.message
    assert error.column >= 1
    rendered = str(error)
    assert f"q.lmq, line {line}" in rendered
    assert source.split("\n")[line - 1].strip() in rendered
    assert rendered.rstrip().endswith("^")


def test_column_points_at_the_bad_hole():
    with pytest.raises(lmq.LmqSyntaxError) as info:
        compile_query('x = 1\n"Answer [yes/no]:"\n')
    assert (info.value.line, info.value.column) == (2, 9)


def test_queries_parsed_on_many_threads_at_once_parse_as_alone():
    """One parser serves every thread (a server compiles each request on its own): its
    indenter's bracket and indent levels must not leak between parses."""
    sources = [path.read_text() for path in
               sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.lmq"))]
    alone = [parse_query(source, "q.lmq") for source in sources]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                 # threads interleave inside each parse
    try:
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda source: parse_query(source, "q.lmq"), sources * 30))
    finally:
        sys.setswitchinterval(interval)
    assert together == alone * 30
