"""Malformed queries: `lmq.LmqSyntaxError` with the right line, a column that points at the
offending construct, and a message that shows the offending line with a caret under it —
never a Python traceback from inside the compiler."""

import pytest

import lmq
from lmq.compiler.codegen import compile_query

# (query, line, column, a fragment of the message)
MALFORMED = [
    pytest.param('"ok"\n"unterminated\n', 2, 1, "unterminated string", id="unterminated-string"),
    pytest.param("'ok'\nx = 'abc\n", 2, 5, "unterminated string", id="unterminated-in-assignment"),
    pytest.param('x = 1\n"""never closed\n\n', 2, 1, "unterminated string",
                 id="unterminated-triple-quote"),
    pytest.param('"a"\nx = 1\n    y = 2\n', 3, 5, "unexpected indentation", id="unexpected-indent"),
    pytest.param('"ok"\nif x:\n"not indented"\n', 3, 1, "unexpected", id="missing-indent"),
    pytest.param('for i in range(2):\n    "a"\n  "b"\n', 3, 3, "inconsistent indentation",
                 id="inconsistent-dedent"),
    pytest.param('"a"\n"b [X"\n', 2, 4, "unclosed '['", id="unclosed-hole"),
    pytest.param('"a"\n"b [X: f(3)"\n', 2, 4, "unclosed '['", id="unclosed-annotated-hole"),
    pytest.param('"a"\n"b"\n"c [1x]"\n', 3, 4, "not a variable name", id="non-name-hole"),
    pytest.param('x = 1\n"c [a b]"\n', 2, 4, "not a variable name", id="two-word-hole"),
    pytest.param('"a"\n"x [for] y"\n', 2, 4, "keyword", id="keyword-hole"),
    pytest.param('"a"\n"a ] b"\n', 2, 4, "single ']'", id="single-close-bracket"),
    pytest.param('y = 2\n"x = {y} }"\n', 2, 10, "single '}'", id="stray-close-brace"),
    pytest.param('"a"\n"b { c"\n', 2, 4, "unclosed '{'", id="unclosed-brace"),
    pytest.param('"a"\n"a {} b"\n', 2, 4, "empty interpolation", id="empty-interpolation"),
    pytest.param('"a"\n"[X: ]"\n', 2, 2, "empty annotation", id="empty-annotation"),
    pytest.param('"a"\n"[@ X]"\n', 2, 3, "decorator", id="decorator-without-name"),
    pytest.param('"a"\nb"bytes [X]"\n', 2, 1, "bytes literal", id="bytes-prompt"),
    pytest.param('"a"\n"[X]" where X ==== 3\n', 2, 17, "unexpected", id="bad-where-expression"),
    pytest.param('"a"\n"[X]" where len(TOKENS(X)) <\n', 2, 29, "unexpected end of line",
                 id="truncated-where"),
    pytest.param('"a"\n"[X]" where\n', 2, 12, "unexpected end of line",
                 id="where-without-expression"),
    pytest.param('argmax\n    "a [X]"\nwhere\n', 3, 6, "unexpected end of query",
                 id="where-clause-without-expression"),
    pytest.param('"a"\n"[X]" where not STOPS_AT(X, ".")\n', 2, 13, "cannot be negated",
                 id="not-stops-at"),
    pytest.param('"a"\n"[X]" where len(TOKENS(X)) < 3 and not STOPS_BEFORE(X, ".")\n', 2, 36,
                 "cannot be negated", id="not-stops-before-in-conjunction"),
    pytest.param('"a"\n"[X]" where (len(TOKENS(X)) < 3 and\n    not STOPS_AT(X, "."))\n', 3, 5,
                 "cannot be negated", id="not-stops-at-on-continuation-line"),
    pytest.param('"a"\n"[X]" where TOKENS(X) < 3\n', 2, 13, "len(TOKENS(X))", id="bare-tokens"),
    pytest.param('"a"\n"[X]" where len(TOKENS(Y)) < 3\n', 2, 17, "hole variable",
                 id="tokens-of-non-hole"),
    pytest.param('"a"\n"[X]" where STOPS_AT(Y, ".")\n', 2, 13, "hole variable",
                 id="stops-at-non-hole"),
    pytest.param('"a"\n"[X]" where STOPS_AT(X)\n', 2, 13, "2 arguments", id="stops-at-arity"),
    pytest.param('argmax\n    "a [X]"\nfrom\n    "m"\n    "n"\n', 5, 5, "one expression",
                 id="from-clause-two-models"),
    pytest.param('argmax\n    "a"\ndistribution\n    X in ["a"]\n    Y in ["b"]\n', 5, 5,
                 "one expression", id="distribution-clause-two-expressions"),
    pytest.param('argmax\n    "[X]"\nWHERE\n    len(TOKENS(X)) < 3 and STOPS_AT(Q, ".")\n', 4, 28,
                 "hole variable", id="global-where-bad-operand"),
    pytest.param('argmax(max_len=)\n    "a [X]"\n', 1, 16, "unexpected",
                 id="bad-decoder-arguments"),
    pytest.param('"a"\nbreak\n', 2, 1, "outside loop", id="break-outside-loop"),
    pytest.param('"a"\n"x {1 +} y"\n', 2, 1,      # Python's own message, reworded in 3.12
                 ("invalid syntax", "expecting a valid expression"), id="bad-interpolation-expression"),
]


@pytest.mark.parametrize("source,line,column,message", MALFORMED)
def test_malformed_query_is_a_syntax_error_at_its_position(source, line, column, message):
    with pytest.raises(lmq.LmqSyntaxError) as info:
        compile_query(source, "bad.lmq")
    error = info.value
    assert (error.line, error.column) == (line, column), error
    assert any(m in error.message for m in ((message,) if isinstance(message, str) else message))
    offending = source.split("\n")[line - 1]
    assert error.source_line == offending
    rendered = str(error).split("\n")
    assert rendered[0].startswith(f"bad.lmq, line {line}, column {column}: ")
    # the offending line, then a caret under the offending column
    assert rendered[-2] == "    " + offending
    assert rendered[-1] == "    " + " " * (column - 1) + "^"
    # no compiler internals chained into what the user sees
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_every_api_entry_point_reports_syntax_errors():
    source = '"a"\n"b [X"\n'
    with pytest.raises(lmq.LmqSyntaxError, match="line 2"):
        lmq.run_sync(source)
    with pytest.raises(lmq.LmqSyntaxError, match="line 2"):
        lmq.query(source)
    with pytest.raises(lmq.LmqSyntaxError, match="unclosed"):
        lmq.F("Say [X")


def test_decorated_query_reports_its_function_and_docstring_line():
    with pytest.raises(lmq.LmqSyntaxError) as info:
        @lmq.query
        def broken():
            '''lmq
            "fine"
            "[X]" where not STOPS_AT(X, ".")
            '''
    error = info.value
    assert error.filename.endswith(":broken")
    assert error.line == 2                      # counted from the first query line
    assert error.source_line.strip() == '"[X]" where not STOPS_AT(X, ".")'


def test_valid_queries_near_the_malformed_ones_compile():
    """The errors above are about the construct, not about the surrounding text."""
    for source in ['"a"\n"b [X]"\n', '"a"\n"c [x1]"\n', '"a ]] b [[ {{}}"\n',
                   '"a"\n"[X]" where STOPS_AT(X, ".")\n', '"[X]" where len(TOKENS(X)) < 3\n',
                   'argmax\n    "a [X]"\nfrom\n    "m"\n', '"a"\n"x {1 + 1} y"\n',
                   '"[@f X]"\n', 'for i in range(2):\n    "a"\n"b"\n', '', '# only a comment\n']:
        compile_query(source)
