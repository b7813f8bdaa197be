"""Query source → `QueryAST`, with the Lark grammar in `lmq.lark`.

The grammar has two start symbols, one per query form. A clause-form query is never a
valid program (a name followed by a string or an indented block), so the parser tries the
program form first and the clause form second, and reports the error that got further.

Text Python could not compile is refused here with a position: a NUL or a lone surrogate
(no source encoding holds them) and a parse tree so deep that Python's own parser would
fail without one (the exact limit, `nesting.MAX_NESTING` levels of Python's AST, is
checked where the code generator parses the Python). Line breaks are read as Python
reads them: `\r\n` and a lone `\r` are line ends.
"""

from __future__ import annotations

import functools
import os
import threading

import lark.grammars
from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import DedentError, PythonIndenter

from lmq.compiler.ast import (DecoderClause, Expression, PromptStatement, QueryAST, Span,
                              StringLiteral)
from lmq.compiler.nesting import MAX_NESTING, TOO_DEEP
from lmq.compiler.prompt_string import LONE_SURROGATE
from lmq.errors import LmqSyntaxError

#: operator chains `a + b + …`, flat in the parse tree, nested one level per operator in
#: Python's AST
_CHAINS = {f"python__{name}" for name in ("or_expr", "xor_expr", "and_expr", "shift_expr",
                                          "arith_expr", "term")}
_GRAMMAR = os.path.join(os.path.dirname(__file__), "lmq.lark")
_NOT_PROMPT_SCOPES = {"python__funcdef", "python__async_funcdef", "python__classdef"}
_STRING_NODES = {"python__string", "string_concat"}
_TERMINAL_NAMES = {
    "_NEWLINE": "end of line", "_INDENT": "an indented block", "_DEDENT": "end of block",
    "$END": "end of query", "NAME": "a name", "STRING": "a string", "LONG_STRING": "a string",
    "_WHERE": "where", "_FROM": "from", "_DISTRIBUTION": "distribution", "RPAR": "')'",
    "RSQB": "']'", "RBRACE": "'}'", "COLON": "':'", "LPAR": "'('",
}
#: one parse at a time: the parser's indenter keeps its bracket and indent levels on itself
#: (two threads parsing at once corrupt each other's), and a parse takes milliseconds
_PARSING = threading.Lock()


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    """The LALR parser; Lark caches the grammar analysis between processes (`cache=True`)."""
    with open(_GRAMMAR, encoding="utf-8") as f:
        grammar = f.read()
    return Lark(grammar, parser="lalr", start=["program", "clause_query"],
                postlex=PythonIndenter(), propagate_positions=True, maybe_placeholders=False,
                import_paths=[os.path.dirname(lark.grammars.__file__)], cache=True)


def parse_query(source: str, filename: str = "<query>") -> QueryAST:
    """Parse a query of either form; malformed input raises `LmqSyntaxError`."""
    text = source.replace("\r\n", "\n").replace("\r", "\n")
    text = text if text.endswith("\n") else text + "\n"
    if "\x00" in text:
        raise error_at(text, text.index("\x00"), "a NUL character cannot be query text; write it "
                       "as \\x00 in a string", filename)
    surrogate = LONE_SURROGATE.search(text)
    if surrogate is not None:
        raise error_at(text, surrogate.start(), f"a lone surrogate U+{ord(surrogate.group()):04X} "
                       "is not a character", filename)
    with _PARSING:
        try:
            tree = _lark().parse(text, start="program")
            form = "program"
        except (UnexpectedInput, DedentError) as program_error:
            try:
                tree = _lark().parse(text, start="clause_query")
                form = "clause"
            except (UnexpectedInput, DedentError) as clause_error:
                worst = max(program_error, clause_error, key=lambda e: _error_position(e, text))
                raise _syntax_error(worst, text, filename) from None
    _check_depth(tree, text, filename)
    return _Builder(text, filename).build(tree, form)


def _check_depth(tree: Tree, text: str, filename: str) -> None:
    """Refuse a tree deeper than ten times `MAX_NESTING` (walked without recursion; a
    chain counts one level per operand, as in Python's AST): deeper text would make
    Python's own parser fail before `parse_python` can place the error."""
    stack = [(tree, 1, 0)]
    while stack:
        node, depth, start = stack.pop()
        start = node.start_pos if isinstance(node, Token) else getattr(node.meta, "start_pos", start)
        if depth > 10 * MAX_NESTING:
            raise error_at(text, start, TOO_DEEP, filename)
        if isinstance(node, Tree):
            step = len(node.children) if node.data in _CHAINS else 1
            stack.extend((child, depth + step, start) for child in reversed(node.children))


def error_at(text: str, offset: int, message: str, filename: str) -> LmqSyntaxError:
    """An `LmqSyntaxError` at character `offset` of the query text."""
    line = text.count("\n", 0, offset) + 1
    start = text.rfind("\n", 0, offset) + 1
    end = text.find("\n", offset)
    return LmqSyntaxError(message, filename=filename, line=line, column=offset - start + 1,
                          source_line=text[start:end if end >= 0 else len(text)])


def _error_position(error: Exception, text: str) -> tuple[int, int]:
    if isinstance(error, UnexpectedToken) and error.token.type in ("_INDENT", "_DEDENT"):
        # the indenter's tokens borrow the position of the line break before them
        return (error.token.end_line, error.token.end_column)
    if isinstance(error, UnexpectedInput) and getattr(error, "line", -1) not in (-1, None):
        return (error.line, error.column)
    if isinstance(error, UnexpectedEOF):
        return (text.count("\n") + 1, 0)
    return _dedent_position(text)


def _syntax_error(error: Exception, text: str, filename: str) -> LmqSyntaxError:
    lines = text.split("\n")
    line, column = _error_position(error, text)
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream]
        message = f"unexpected character {char!r}"
        if char in "\"'":
            message = "unterminated string"
    elif isinstance(error, UnexpectedToken):
        token = error.token
        if token.type == "$END":
            message = "unexpected end of query"
            line = len(lines) - 1
            column = len(lines[line - 1]) + 1
        else:
            what = {"_NEWLINE": "end of line", "_INDENT": "indentation",
                    "_DEDENT": "dedent"}.get(token.type, repr(str(token)))
            message = f"unexpected {what}"
        expected = sorted({_TERMINAL_NAMES.get(t, t.lower().strip("_")) for t in error.expected
                           if not t.startswith("__")})
        if expected and len(expected) <= 6:
            message += "; expected " + ", ".join(expected)
    elif isinstance(error, UnexpectedEOF):
        message = "unexpected end of query"
    else:
        message = "inconsistent indentation"
        line, column = _dedent_position(text)
    line = max(line, 1)
    source_line = lines[line - 1] if line - 1 < len(lines) else ""
    return LmqSyntaxError(message, filename=filename, line=line, column=max(column, 1),
                          source_line=source_line)


def _dedent_position(text: str) -> tuple[int, int]:
    """Lark's DedentError has no position: find the first line that dedents to no level."""
    levels = [0]
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.lstrip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(stripped)
        if indent > levels[-1]:
            levels.append(indent)
        else:
            while indent < levels[-1]:
                levels.pop()
            if indent != levels[-1]:
                return number, indent + 1
    return 1, 1


class _Builder:
    """Collects prompt statements and clauses from the Lark tree into a `QueryAST`."""

    def __init__(self, text: str, filename: str):
        self.text = text
        self.filename = filename

    def build(self, tree: Tree, form: str) -> QueryAST:
        query = QueryAST(source=self.text, filename=self.filename, form=form)
        if form == "program":
            self._collect_prompts(tree, query.prompts)
            return query
        for child in tree.children:
            if child.data == "decoder_clause":
                args = [c for c in child.children if isinstance(c, Tree) and c.data == "arguments"]
                query.decoder = DecoderClause(
                    name=str(child.children[0].children[0]),
                    arguments=self._slice(args[0]) if args else "",
                    span=self._span(child))
            elif child.data == "inline_body":
                query.inline_body = True
                query.prompts.append(self._prompt(child))
            elif child.data == "block_body":
                self._collect_prompts(child, query.prompts)
            else:
                query.clause_spans.append(self._span(child))
                values = [self._expression(v) for v in child.children[0].children]
                if child.data == "from_clause":
                    query.model = self._single(values, "from")
                elif child.data == "where_clause":
                    query.where.extend(values)
                else:
                    query.distribution = self._single(values, "distribution")
        return query

    def _single(self, values: list[Expression], clause: str) -> Expression:
        if len(values) != 1:
            span = values[1].span
            raise LmqSyntaxError(f"the {clause} clause takes one expression",
                                 filename=self.filename, line=span.line, column=span.column,
                                 source_line=self.text.split("\n")[span.line - 1])
        return values[0]

    def _collect_prompts(self, tree: Tree, out: list[PromptStatement]) -> None:
        """The prompt statements under `tree` in source order (walked without recursion)."""
        stack = list(reversed(tree.children))
        while stack:
            child = stack.pop()
            if not isinstance(child, Tree) or child.data in _NOT_PROMPT_SCOPES:
                continue
            if child.data == "expr_stmt" and self._is_string(child.children[0]):
                out.append(self._prompt(child))
            else:
                stack.extend(reversed(child.children))

    @staticmethod
    def _is_string(node) -> bool:
        return isinstance(node, Tree) and node.data in _STRING_NODES

    def _prompt(self, node: Tree) -> PromptStatement:
        strings_node = node.children[0]
        tokens = [t for t in strings_node.scan_values(lambda v: isinstance(v, Token))]
        where = self._expression(node.children[1]) if node.data == "expr_stmt" and len(node.children) > 1 else None
        return PromptStatement(strings=tuple(self._literal(t) for t in tokens), where=where,
                               span=self._span(node))

    def _literal(self, token: Token) -> StringLiteral:
        value = str(token)
        prefix_len = len(value) - len(value.lstrip("rRbBuUfF"))
        prefix = value[:prefix_len]
        rest = value[prefix_len:]
        quote = rest[:3] if rest[:3] in ('"""', "'''") else rest[0]
        span = Span(token.start_pos, token.end_pos, token.line, token.column)
        if "b" in prefix.lower():
            raise LmqSyntaxError("a prompt string cannot be a bytes literal",
                                 filename=self.filename, line=token.line, column=token.column,
                                 source_line=self.text.split("\n")[token.line - 1])
        return StringLiteral(prefix=prefix, quote=quote, body=rest[len(quote):-len(quote)],
                             body_offset=token.start_pos + prefix_len + len(quote), span=span)

    def _expression(self, node) -> Expression:
        return Expression(text=self._slice(node), span=self._span(node))

    def _slice(self, node) -> str:
        span = self._span(node)
        return self.text[span.start:span.end]

    @staticmethod
    def _span(node) -> Span:
        if isinstance(node, Token):
            return Span(node.start_pos, node.end_pos, node.line, node.column)
        meta = node.meta
        return Span(meta.start_pos, meta.end_pos, meta.line, meta.column)
