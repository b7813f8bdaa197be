"""The Python API, with LMQL's names: `query`, `run`, `run_sync`, `F`, `model`."""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from typing import Any, Callable

from lmq.compiler.codegen import PromptProgram, compile_query
from lmq.errors import LmqError
from lmq.runtime.query import Model, QueryFunction, run_sync_coroutine
from lmq.runtime.trace import trace_failure


def _compile(source: str, trace: Any, *filename: str) -> PromptProgram:
    """`compile_query` (the same cached call as without a trace); a query that does not
    compile is an error event in its trace too."""
    try:
        return compile_query(source, *filename)
    except LmqError as error:
        if trace is not None:
            trace_failure(trace, error)
        raise


def model(model_id: str | None = None, **kwargs: Any) -> Model:
    """A model for `model=` / `from`: `lmq.model("local:llama.cpp:m.gguf", n_ctx=2048)`."""
    return Model(model_id, **kwargs)


def _caller_scope(depth: int) -> dict[str, Any]:
    frame = sys._getframe(depth + 1)
    return {**frame.f_globals, **frame.f_locals}


def _raw_docstring(fn: Callable) -> str | None:
    """The docstring as written in the source, escapes unprocessed: a query's `"…\\n…"`
    must reach the query parser as backslash-n, not as a line break inside its string."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        node = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.body:
        return None
    first = node.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        return None
    literal = ast.get_source_segment(source, first.value) or ""
    literal = literal.lstrip("rRuU")
    quote = literal[:3] if literal[:3] in ('"""', "'''") else literal[:1]
    return literal[len(quote):-len(quote)] if quote else None


def _docstring_query(fn: Callable) -> str:
    doc = _raw_docstring(fn) or fn.__doc__
    if not doc or not doc.strip():
        raise LmqError(f"@lmq.query function {fn.__name__} has no query in its docstring")
    text = textwrap.dedent(doc if doc[0] == "\n" else "\n" + doc).strip("\n")
    lines = text.split("\n")
    if lines and lines[0].strip() == "lmq":
        lines = lines[1:]
    return textwrap.dedent("\n".join(lines))


def query(fn: Callable | str | None = None, **options: Any):
    """Decorator (`@lmq.query`, `@lmq.query(model=..., decoder=..., **decoder_kwargs)`) on
    a sync or async function whose docstring is the query, or `lmq.query(text)`."""
    def wrap(target: Callable | str, depth: int) -> QueryFunction:
        if isinstance(target, str):
            return QueryFunction(_compile(target, options.get("trace")), _caller_scope(depth + 1),
                                 options=options)
        closure = inspect.getclosurevars(target)
        scope = {**target.__globals__, **_caller_scope(depth + 1), **closure.nonlocals}
        filename = inspect.getsourcefile(target) or "<query>"
        return QueryFunction(_compile(_docstring_query(target), options.get("trace"),
                                      f"{filename}:{target.__name__}"),
                             scope, signature=inspect.signature(target),
                             is_async=inspect.iscoroutinefunction(target), name=target.__name__,
                             options=options)

    if fn is None:
        return lambda target: wrap(target, 1)
    return wrap(fn, 1)


async def run(query_text: str, *args: Any, **kwargs: Any) -> Any:
    """Compile (cached) and run a query string."""
    program = _compile(query_text, kwargs.get("trace"))
    return await QueryFunction(program, _caller_scope(1)).run(*args, **kwargs)


def run_sync(query_text: str, *args: Any, **kwargs: Any) -> Any:
    """`run` to completion; an error inside a running event loop (await `run` there)."""
    function = QueryFunction(_compile(query_text, kwargs.get("trace")), _caller_scope(1))
    return run_sync_coroutine(function.run(*args, **kwargs))


class F:
    """`lmq.F("Summarize {text}: [S]", "len(TOKENS(S)) < 40")`: a one-line query as a
    function; one hole returns its value, several a dict of values."""

    def __init__(self, template: str, constraints: str | None = None, **options: Any):
        if '"""' in template or template.endswith("\\"):
            raise LmqError('an lmq.F template cannot contain """ or end with a backslash')
        source = f'r"""{template}"""' + (f" where {constraints}" if constraints else "")
        self._query = QueryFunction(_compile(source, options.get("trace")), _caller_scope(1), options=options,
                                    name="F")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self._query(*args, **kwargs)
        names = self._query.program.hole_names
        if len(names) == 1:
            return result.variables[names[0]]
        return {name: result.variables[name] for name in names}
