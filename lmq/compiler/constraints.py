"""Where clause → constraint IR.

A where clause is Python expression syntax over hole variables. The compiler turns it
into a tree of IR nodes; operands that are not hole variables (`n` in
`len(TOKENS(X)) < n`, the list in `X in options`) stay Python expressions (`Operand`) and
are evaluated in the query's scope when the hole is reached. The runtime lowers the IR of
one hole into a `HolePlan` (token budget, stop phrases, token automaton, final checks).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, fields
from types import CodeType
from typing import Any, Iterable

from lmq.compiler.ast import Expression
from lmq.compiler.nesting import parse_python
from lmq.errors import LmqSyntaxError

COMPARISONS = {ast.Lt: "<", ast.LtE: "<=", ast.Eq: "==", ast.NotEq: "!=", ast.Gt: ">", ast.GtE: ">="}
_FLIPPED = {"<": ">", "<=": ">=", "==": "==", "!=": "!=", ">": "<", ">=": "<="}
CONSTRAINT_FUNCTIONS = frozenset({"STOPS_AT", "STOPS_BEFORE", "TOKENS", "INT", "FLOAT", "REGEX",
                                  "GRAMMAR", "JSON"})


@dataclass(frozen=True)
class Operand:
    """A Python expression of the query evaluated when the hole is reached."""

    source: str
    code: CodeType

    @classmethod
    def of(cls, source: str) -> "Operand":
        """Compile Python expression text (a SyntaxError propagates to the caller)."""
        return cls(source, compile(parse_python(source), f"<{source}>", "eval"))

    def evaluate(self, scope: dict[str, Any]) -> Any:
        return eval(self.code, scope)  # the query's own code, in the query's own scope

    def constant(self) -> tuple[bool, Any]:
        """(True, value) when the operand is a literal, decidable at compile time."""
        try:
            return True, ast.literal_eval(self.source)
        except (ValueError, SyntaxError):
            return False, None


@dataclass(frozen=True)
class Constraint:
    """Base of the IR nodes; `variables` are the holes the node talks about."""

    source: str

    @property
    def variables(self) -> frozenset[str]:
        return frozenset()


@dataclass(frozen=True)
class VariableConstraint(Constraint):
    variable: str

    @property
    def variables(self) -> frozenset[str]:
        return frozenset({self.variable})


@dataclass(frozen=True)
class StopPhrase(VariableConstraint):
    """`STOPS_AT(X, s)` (keep=True) / `STOPS_BEFORE(X, s)` (keep=False); s a str or list."""

    phrases: Operand
    keep: bool


@dataclass(frozen=True)
class TokenCount(VariableConstraint):
    """`len(TOKENS(X)) op bound`."""

    op: str
    bound: Operand


@dataclass(frozen=True)
class CharCount(VariableConstraint):
    """`len(X) op bound`."""

    op: str
    bound: Operand


@dataclass(frozen=True)
class ValueComparison(VariableConstraint):
    """`X in options`, `X not in options`, `X == v`, `X != v`, `s in X`, `s not in X`."""

    op: str                   # "in", "not in", "==", "!=", "contains", "not contains"
    operand: Operand


@dataclass(frozen=True)
class TypeConstraint(VariableConstraint):
    """`INT(X)`, `FLOAT(X)`, `REGEX(X, r)`, `GRAMMAR(X, g)`, `JSON(X, schema)`."""

    kind: str
    argument: Operand | None


@dataclass(frozen=True)
class Junction(Constraint):
    """`and` / `or` of constraints."""

    op: str
    items: tuple[Constraint, ...]

    @property
    def variables(self) -> frozenset[str]:
        return frozenset().union(*(item.variables for item in self.items))


@dataclass(frozen=True)
class Negation(Constraint):
    item: Constraint

    @property
    def variables(self) -> frozenset[str]:
        return self.item.variables


@dataclass(frozen=True)
class PythonCheck(Constraint):
    """Any other boolean expression: evaluated on the final values, never masked."""

    operand: Operand
    names: frozenset[str]

    @property
    def variables(self) -> frozenset[str]:
        return self.names


def conjuncts(constraint: Constraint | None) -> Iterable[Constraint]:
    """The `and` items of a constraint, nested `and`s flattened."""
    if constraint is None:
        return
    if isinstance(constraint, Junction) and constraint.op == "and":
        for item in constraint.items:
            yield from conjuncts(item)
    else:
        yield constraint


class WhereCompiler:
    """Compiles where-clause expressions given the set of hole names of the query."""

    def __init__(self, holes: frozenset[str], filename: str, source: str):
        self.holes = holes
        self.filename = filename
        self.lines = source.split("\n")

    def compile(self, expression: Expression) -> Constraint:
        self._expression = expression
        try:
            tree = parse_python("(" + expression.text + ")").body
        except SyntaxError as e:
            raise self._error_at(f"invalid where clause: {e.msg}", e.lineno, (e.offset or 1) - 1) from None
        return self._node(tree)

    def _error(self, message: str, node: ast.AST | None = None) -> LmqSyntaxError:
        return self._error_at(message, getattr(node, "lineno", None), getattr(node, "col_offset", 0))

    def _error_at(self, message: str, lineno: int | None, col_offset: int) -> LmqSyntaxError:
        """The error at a position of the parsed `(…)` text (0-based column), in the query."""
        span = self._expression.span
        line, column = span.line, span.column
        if lineno:
            line = span.line + lineno - 1
            column = max(span.column + col_offset - 1, 1) if lineno == 1 else col_offset + 1
        return LmqSyntaxError(message, filename=self.filename, line=line, column=column,
                              source_line=self.lines[line - 1] if line - 1 < len(self.lines) else "")

    def _text(self, node: ast.AST) -> str:
        return ast.unparse(node)

    def _operand(self, node: ast.AST) -> Operand:
        try:
            return Operand.of(self._text(node))
        except SyntaxError as e:          # parses, but is no expression: `yield`, `await`
            raise self._error(f"invalid where clause: {e.msg}", node) from None

    def _hole_name(self, node: ast.AST) -> str | None:
        return node.id if isinstance(node, ast.Name) and node.id in self.holes else None

    def _node(self, node: ast.AST) -> Constraint:
        text = self._text(node)
        if isinstance(node, ast.BoolOp):
            op = "and" if isinstance(node.op, ast.And) else "or"
            return Junction(text, op, tuple(self._node(v) for v in node.values))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self._node(node.operand)
            if any(isinstance(c, StopPhrase) for c in _walk(inner)):
                raise self._error("'not STOPS_AT(…)' has no meaning: a stop cannot be negated", node)
            if isinstance(inner, ValueComparison) and inner.op in ("contains", "in"):
                flipped = {"contains": "not contains", "in": "not in"}[inner.op]
                return ValueComparison(text, inner.variable, flipped, inner.operand)
            return Negation(text, inner)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CONSTRAINT_FUNCTIONS:
            return self._call(node, text)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            compared = self._comparison(node, text)
            if compared is not None:
                return compared
        return self._python_check(node, text)

    def _call(self, node: ast.Call, text: str) -> Constraint:
        name = node.func.id
        if name == "TOKENS":
            raise self._error("TOKENS(X) is only meaningful inside len(TOKENS(X)) <op> N", node)
        if node.keywords or not node.args:
            raise self._error(f"{name} takes the variable as its first argument", node)
        variable = self._hole_name(node.args[0])
        if variable is None:
            raise self._error(f"the first argument of {name} must be a hole variable, "
                              f"not {self._text(node.args[0])!r}", node)
        arity = {"INT": 1, "FLOAT": 1}.get(name, 2)
        if len(node.args) != arity:
            raise self._error(f"{name} takes {arity} argument{'s' if arity > 1 else ''}", node)
        argument = self._operand(node.args[1]) if arity == 2 else None
        if name in ("STOPS_AT", "STOPS_BEFORE"):
            return StopPhrase(text, variable, argument, keep=name == "STOPS_AT")
        return TypeConstraint(text, variable, name, argument)

    def _comparison(self, node: ast.Compare, text: str) -> Constraint | None:
        left, op_node, right = node.left, node.ops[0], node.comparators[0]
        op = COMPARISONS.get(type(op_node))
        if op is not None:
            for a, b, o in ((left, right, op), (right, left, _FLIPPED[op])):
                length = self._length_of(a)
                if length is not None:
                    kind, variable = length
                    cls = TokenCount if kind == "tokens" else CharCount
                    return cls(text, variable, o, self._operand(b))
            if op in ("==", "!="):
                for a, b in ((left, right), (right, left)):
                    variable = self._hole_name(a)
                    if variable is not None and self._hole_name(b) is None:
                        return ValueComparison(text, variable, op, self._operand(b))
            return None
        if isinstance(op_node, (ast.In, ast.NotIn)):
            negated = isinstance(op_node, ast.NotIn)
            variable = self._hole_name(left)
            if variable is not None and self._hole_name(right) is None:
                return ValueComparison(text, variable, "not in" if negated else "in", self._operand(right))
            variable = self._hole_name(right)
            if variable is not None and self._hole_name(left) is None:
                return ValueComparison(text, variable, "not contains" if negated else "contains",
                                       self._operand(left))
        return None

    def _length_of(self, node: ast.AST) -> tuple[str, str] | None:
        """('tokens', X) for len(TOKENS(X)), ('chars', X) for len(X), else None."""
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "len" and len(node.args) == 1):
            return None
        arg = node.args[0]
        if (isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id == "TOKENS"
                and len(arg.args) == 1):
            variable = self._hole_name(arg.args[0])
            if variable is None:
                raise self._error("TOKENS takes a hole variable", arg)
            return "tokens", variable
        variable = self._hole_name(arg)
        return ("chars", variable) if variable else None

    def _python_check(self, node: ast.AST, text: str) -> Constraint:
        names = frozenset(n.id for n in ast.walk(node) if isinstance(n, ast.Name))
        used = {n for n in names if n in CONSTRAINT_FUNCTIONS}
        if "TOKENS" in used:
            raise self._error("TOKENS(X) is only meaningful inside len(TOKENS(X)) <op> N", node)
        if used:
            raise self._error(f"{sorted(used)[0]} cannot be used inside the expression {text!r}", node)
        return PythonCheck(text, self._operand(node), names & self.holes)


def lowered_operands(constraint: Constraint | None) -> Iterable[Operand]:
    """The Python operands that lowering a constraint evaluates, in order (a Python
    check's expression is evaluated only on the final value)."""
    if constraint is None:
        return
    for item in _walk(constraint):
        if isinstance(item, PythonCheck):
            continue
        for f in fields(item):
            value = getattr(item, f.name)
            if isinstance(value, Operand):
                yield value


def _walk(constraint: Constraint) -> Iterable[Constraint]:
    yield constraint
    if isinstance(constraint, Junction):
        for item in constraint.items:
            yield from _walk(item)
    elif isinstance(constraint, Negation):
        yield from _walk(constraint.item)
