"""QueryAST → `PromptProgram`: an async Python function plus per-hole specs.

The generator rewrites only the spans of prompt statements and clauses and keeps every
other character of the query, so the generated program has the query's line numbers.
A prompt statement becomes one line of calls on the runtime context `_ctx`:

    "A: [X] {y}\\n" where STOPS_AT(X, ".")
    →  await _ctx.text('A: '); X = await _ctx.hole(0, locals()); await _ctx.text(f"{…y…}")

The program is compiled in memory (no files, no imports) and cached by source text.
"""

from __future__ import annotations

import ast
import builtins
import functools
import symtable
from dataclasses import dataclass
from types import CodeType
from typing import Any

from lmq.compiler.ast import PromptStatement, QueryAST, Span
from lmq.compiler.constraints import (CONSTRAINT_FUNCTIONS, Constraint, Junction, Operand,
                                      ValueComparison, WhereCompiler)
from lmq.compiler.nesting import TOO_DEEP, parse_python
from lmq.compiler.parser import error_at, parse_query
from lmq.compiler.prompt_string import (LONE_SURROGATE, ChatTagPart, HolePart, InterpolationPart,
                                        PromptScanError, TextPart, scan_prompt)
from lmq.errors import LmqSyntaxError

PROGRAM_NAME = "__lmq_program__"
CONTEXT_NAME = "_ctx"
_MARK = "\ue000"        # stands in for a non-text part while Python unescapes the literal
_BUILTINS = frozenset(dir(builtins))


@dataclass(frozen=True)
class HoleSpec:
    """What the runtime needs to fill one hole occurrence of the source."""

    index: int
    name: str
    decorators: tuple[Operand, ...]
    annotation: Operand | None
    where: Constraint | None
    line: int


@dataclass(frozen=True)
class DecoderSpec:
    """The decoder clause: a name and its keyword arguments (Python source)."""

    name: str
    arguments: Operand | None


@dataclass(frozen=True)
class PromptProgram:
    """A compiled query: the async program function's code and everything around it."""

    source: str
    filename: str
    python: str                          # the generated Python source (for `lmq compile`)
    code: CodeType
    free_names: tuple[str, ...]          # in order of first use
    holes: tuple[HoleSpec, ...]
    decoder: DecoderSpec | None
    model: Operand | None
    distribution: Constraint | None

    @property
    def hole_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(h.name for h in self.holes))

    def function(self, namespace: dict[str, Any]):
        """Instantiate the async program function with `namespace` as its globals."""
        exec(self.code, namespace)   # the code generated from the query itself
        return namespace.pop(PROGRAM_NAME)


@functools.lru_cache(maxsize=256)
def compile_query(source: str, filename: str = "<query>") -> PromptProgram:
    """Compile query text to a `PromptProgram` (cached by source text and file name)."""
    return _Generator(parse_query(source, filename)).generate()


class _Generator:
    def __init__(self, query: QueryAST):
        self.query = query
        self.lines = query.source.split("\n")
        self.holes: list[HoleSpec] = []
        self.hole_parts: dict[int, list] = {}
        for statement in query.prompts:
            self.hole_parts[id(statement)] = self._scan(statement)
        names = frozenset(p.name for parts in self.hole_parts.values() for p in parts
                          if isinstance(p, HolePart))
        self.where = WhereCompiler(names, query.filename, query.source)

    def _error(self, message: str, offset: int) -> LmqSyntaxError:
        return error_at(self.query.source, offset, message, self.query.filename)

    def _scan(self, statement: PromptStatement) -> list:
        parts: list = []
        for literal in statement.strings:
            try:
                scanned = scan_prompt(literal.body)
            except PromptScanError as e:
                raise self._error(e.message, literal.body_offset + e.offset) from None
            for part in scanned:
                self._check_nesting(part, literal.body_offset)
            parts.extend(self._unescape(literal, scanned))
        return parts

    def _check_nesting(self, part, body_offset: int) -> None:
        """Python inside a prompt string (an interpolation, a hole's annotation and
        decorators) nested too deeply, placed at the part; its other errors are Python's,
        reported where the part is compiled."""
        if isinstance(part, InterpolationPart):
            sources = [part.expression]
        elif isinstance(part, HolePart):
            sources = [s for s in (part.annotation, *part.decorators) if s]
        else:
            return
        for source in sources:
            try:
                parse_python("(" + source + ")")
            except SyntaxError as e:
                if e.msg == TOO_DEEP:
                    raise self._error(TOO_DEEP, body_offset + part.offset) from None

    def _unescape(self, literal, parts: list) -> list:
        """Turn TextPart sources into str values the way Python reads the literal."""
        if _MARK in literal.body:
            raise self._error("prompt text may not contain U+E000", literal.body_offset)
        body = "".join(p.source.replace("{{", "{").replace("}}", "}") if isinstance(p, TextPart)
                       else _MARK for p in parts)
        prefix = literal.prefix.replace("f", "").replace("F", "")
        try:
            value = ast.literal_eval(prefix + literal.quote + body + literal.quote)
        except SyntaxError as e:         # a malformed escape: \x4, \N{NO SUCH NAME}
            raise self._error(f"invalid prompt string: {e.msg}", literal.span.start) from None
        surrogate = LONE_SURROGATE.search(value)
        if surrogate is not None:
            raise self._error(f"the escape for U+{ord(surrogate.group()):04X} is a lone surrogate, "
                              "not a character", literal.span.start)
        texts = iter(value.split(_MARK))
        out: list = []
        for part in parts:
            if isinstance(part, TextPart):
                continue
            out.append(TextPart(next(texts)))
            out.append(part)
        out.append(TextPart(next(texts)))
        return [p for p in out if not (isinstance(p, TextPart) and p.source == "")]

    def generate(self) -> PromptProgram:
        query = self.query
        global_where = [self.where.compile(e) for e in query.where]
        replacements: list[tuple[Span, str]] = []
        for statement in query.prompts:
            replacements.append((statement.span, self._statement(statement, global_where)))
        if query.decoder is not None:
            end = query.prompts[0].span.start if query.inline_body else query.decoder.span.end
            header = "" if query.inline_body else "if True:"
            replacements.append((Span(query.decoder.span.start, end, 0, 0), header))
        for span in query.clause_spans:
            replacements.append((span, ""))
        python = _replace(query.source, replacements)
        module = self._module(python)
        free = _free_names(module, python)
        operands = [h.annotation for h in self.holes if h.annotation] + \
                   [d for h in self.holes for d in h.decorators]
        decoder = None
        if query.decoder is not None:
            arguments = self._operand(f"dict({query.decoder.arguments})", query.decoder.span) \
                if query.decoder.arguments else None
            decoder = DecoderSpec(query.decoder.name, arguments)
            operands += [arguments] if arguments else []
        model = self._operand(query.model.text, query.model.span) if query.model else None
        operands += [model] if model else []
        distribution = self.where.compile(query.distribution) if query.distribution else None
        if distribution is not None:
            self._check_distribution(distribution, query.distribution.span.start)
        extra = _operand_names(operands, global_where, self.holes)
        assigned = _assigned_names(module)
        holes = frozenset(self.where.holes)
        order = {name: i for i, name in enumerate(free)}
        for name in extra:
            if name not in assigned and name not in holes and name not in order:
                order[name] = len(order)
        parameters = tuple(order)
        code = self._compile(module, parameters)
        return PromptProgram(source=query.source, filename=query.filename, python=python,
                             code=code, free_names=parameters, holes=tuple(self.holes),
                             decoder=decoder, model=model, distribution=distribution)

    def _check_distribution(self, distribution: Constraint, offset: int) -> None:
        """`distribution VAR in [values]`: VAR is a hole and the last thing in the prompt
        (its values are scored as continuations of everything before it)."""
        if not (isinstance(distribution, ValueComparison) and distribution.op == "in"):
            raise self._error("a distribution clause must be VAR in [values]", offset)
        last = self.hole_parts[id(self.query.prompts[-1])] if self.query.prompts else []
        if not last or not isinstance(last[-1], HolePart) or last[-1].name != distribution.variable:
            raise self._error(f"the distribution variable {distribution.variable} must be the last "
                              "thing in the prompt", offset)

    def _operand(self, text: str, span: Span) -> Operand:
        try:
            return Operand.of(text)
        except SyntaxError as e:
            raise LmqSyntaxError(f"invalid expression: {e.msg}", filename=self.query.filename,
                                 line=span.line, column=span.column,
                                 source_line=self.lines[span.line - 1]) from None

    def _statement(self, statement: PromptStatement, global_where: list[Constraint]) -> str:
        inline = [self.where.compile(statement.where)] if statement.where else []
        where = _conjunction(inline + global_where)
        calls: list[str] = []
        for part in self.hole_parts[id(statement)]:
            if isinstance(part, TextPart):
                calls.append(f"await {CONTEXT_NAME}.text({part.source!r})")
            elif isinstance(part, ChatTagPart):
                calls.append(f"await {CONTEXT_NAME}.role({part.role!r})")
            elif isinstance(part, InterpolationPart):
                quote = statement.strings[0].quote if "\n" in part.expression else "'''"
                calls.append(f"await {CONTEXT_NAME}.text(f{quote}{{(await {CONTEXT_NAME}.resolve("
                             f"{part.expression})){part.suffix}}}{quote})")
            else:
                calls.append(f"{part.name} = await {CONTEXT_NAME}.hole({len(self.holes)}, locals())")
                self.holes.append(self._hole_spec(part, statement, where))
        return "; ".join(calls) or "pass"

    def _hole_spec(self, part: HolePart, statement: PromptStatement, where) -> HoleSpec:
        span = statement.span
        decorators = tuple(self._operand(d, span) for d in part.decorators)
        annotation = self._operand(part.annotation, span) if part.annotation else None
        return HoleSpec(len(self.holes), part.name, decorators, annotation, where, span.line)

    def _module(self, python: str) -> ast.Module:
        self.python_lines = python.split("\n")
        try:
            module = parse_python(python, "exec", self.query.filename)
        except SyntaxError as e:
            raise self._python_error(e) from None
        _keep_query_docstrings_raw(module, python)
        generator = _program_yield(module)
        if generator is not None:
            raise self._python_error(SyntaxError(
                "'yield' outside a def: a query is not a generator",
                (self.query.filename, generator.lineno, generator.col_offset + 1, None)))
        if self.query.decoder is not None and not self.query.inline_body:
            module.body = module.body[0].body      # the `if True:` standing for the decoder
        return module

    def _compile(self, module: ast.Module, parameters: tuple[str, ...]) -> CodeType:
        args = ast.arguments(posonlyargs=[], args=[ast.arg(CONTEXT_NAME)] + [ast.arg(p) for p in parameters],
                             vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[])
        body = module.body or [ast.Pass()]
        function = ast.AsyncFunctionDef(name=PROGRAM_NAME, args=args, body=body,
                                        decorator_list=[], returns=None, type_params=[])
        wrapper = ast.Module(body=[function], type_ignores=[])
        ast.fix_missing_locations(wrapper)
        function.lineno, function.col_offset = 1, 0
        try:
            return compile(wrapper, self.query.filename, "exec")
        except SyntaxError as e:
            raise self._python_error(e) from None

    def _python_error(self, error: SyntaxError) -> LmqSyntaxError:
        """Python's error in the generated program, placed in the query: on a rewritten
        prompt line Python's column is one of the generated code, so point at the line's
        first character instead."""
        line = min(max(error.lineno or 1, 1), len(self.lines))
        source = self.lines[line - 1]
        column = error.offset or 1
        if source != self.python_lines[line - 1]:
            column = len(source) - len(source.lstrip()) + 1
        return LmqSyntaxError(error.msg, filename=self.query.filename, line=line, column=column,
                              source_line=source)


def _conjunction(items: list[Constraint]) -> Constraint | None:
    if not items:
        return None
    if len(items) == 1:
        return items[0]
    return Junction(" and ".join(f"({c.source})" for c in items), "and", tuple(items))


def _replace(source: str, replacements: list[tuple[Span, str]]) -> str:
    out: list[str] = []
    position = 0
    for span, text in sorted(replacements, key=lambda r: r[0].start):
        out.append(source[position:span.start])
        out.append(text + "\n" * max(0, source.count("\n", span.start, span.end) - text.count("\n")))
        position = span.end
    out.append(source[position:])
    return "".join(out)


def _program_yield(module: ast.Module) -> ast.AST | None:
    """A `yield` of the program itself (not of a def or class inside it): it would turn the
    program function into an async generator."""
    stack: list[ast.AST] = list(module.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            return node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))
    return None


def raw_string_literal(segment: str) -> str | None:
    """The characters between the quotes of a string literal's source, escapes
    unprocessed."""
    literal = segment.lstrip("rRuU")
    quote = literal[:3] if literal[:3] in ('"""', "'''") else literal[:1]
    return literal[len(quote):-len(quote)] if quote in ('"""', "'''", '"', "'") else None


def _keep_query_docstrings_raw(module: ast.Module, python: str) -> None:
    """A `@…query` function defined inside a query keeps its docstring as written: it has
    no source file to read it back from, and its query's `"…\\n…"` must reach the query
    parser as a backslash and an n, not as a line break inside a string."""
    for node in ast.walk(module):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
            continue
        first = node.body[0]
        if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str) and any(map(_is_query_decorator, node.decorator_list))):
            continue
        raw = raw_string_literal(ast.get_source_segment(python, first.value) or "")
        if raw is not None:
            first.value.value = raw


def _is_query_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
    return name == "query"


def _free_names(module: ast.Module, python: str) -> list[str]:
    """Names the program reads but never binds, in order of first use."""
    body = ast.unparse(module) or "pass"        # an empty or comment-only query is valid
    wrapped = f"async def {PROGRAM_NAME}():\n" + "\n".join(
        "    " + line for line in body.split("\n"))
    table = next(t for t in symtable.symtable(wrapped, "<query>", "exec").get_children()
                 if t.get_name() == PROGRAM_NAME)
    free = _unbound_names(table) - {CONTEXT_NAME, "locals"}
    first_use: dict[str, tuple[int, int]] = {}
    for node in ast.walk(module):
        if isinstance(node, ast.Name) and node.id in free:
            key = (node.lineno, node.col_offset)
            first_use[node.id] = min(first_use.get(node.id, key), key)
    return sorted(free, key=lambda n: first_use.get(n, (0, 0)))


def _unbound_names(table: symtable.SymbolTable) -> set[str]:
    """Names read in `table` or its inner scopes (comprehensions, lambdas, defs) that none
    of them binds (from Python 3.12 on, a comprehension at the top of an expression binds
    its variable in the top scope itself: PEP 709)."""
    names: set[str] = set()
    stack = [table]
    while stack:
        scope = stack.pop()
        names.update(symbol.get_name() for symbol in scope.get_symbols()
                     if symbol.is_global() and not symbol.is_declared_global()
                     and symbol.is_referenced() and not symbol.is_assigned())
        stack.extend(scope.get_children())
    return names


def _assigned_names(module: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _operand_names(operands: list[Operand], where: list[Constraint], holes: list[HoleSpec]) -> list[str]:
    """Names read by where clauses, annotations, decorators, decoder and model expressions."""
    sources = [o.source for o in operands] + [c.source for c in where] + \
              [h.where.source for h in holes if h.where is not None]
    names: list[str] = []
    for source in sources:
        unbound = _unbound_names(symtable.symtable(source, "<operand>", "eval"))
        for node in ast.walk(ast.parse(source, mode="eval")):
            if isinstance(node, ast.Name) and node.id in unbound and node.id not in names:
                names.append(node.id)
    return [n for n in names if n not in CONSTRAINT_FUNCTIONS and n not in _BUILTINS]
