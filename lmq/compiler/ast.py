"""The query AST: what the parser hands to the code generator.

Python statements are not modelled node by node: the generator keeps their source text
as written and only rewrites the spans listed here (prompt statements and the clauses of
the clause form), so line numbers of the generated program equal those of the query.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A region of the query source: character offsets plus the 1-based start position."""

    start: int
    end: int
    line: int
    column: int


@dataclass(frozen=True)
class Expression:
    """A Python expression kept as source text (a where clause, a model, decoder args)."""

    text: str
    span: Span


@dataclass(frozen=True)
class StringLiteral:
    """One string token of a prompt statement: prefix letters, quote and raw body text."""

    prefix: str
    quote: str
    body: str
    body_offset: int
    span: Span


@dataclass(frozen=True)
class PromptStatement:
    """A string statement (possibly several adjacent literals) with an optional `where`."""

    strings: tuple[StringLiteral, ...]
    where: Expression | None
    span: Span


@dataclass(frozen=True)
class DecoderClause:
    """The decoder of the clause form: its name and the source of its argument list."""

    name: str
    arguments: str
    span: Span


@dataclass
class QueryAST:
    """A parsed query of either form."""

    source: str
    filename: str
    form: str                                   # "program" or "clause"
    prompts: list[PromptStatement] = field(default_factory=list)
    decoder: DecoderClause | None = None
    model: Expression | None = None
    where: list[Expression] = field(default_factory=list)
    distribution: Expression | None = None
    inline_body: bool = False                   # clause form with the prompt on one line
    clause_spans: list[Span] = field(default_factory=list)   # text that is not program
