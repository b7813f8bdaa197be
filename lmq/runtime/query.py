"""`QueryFunction`: a compiled query with its defining scope and options, callable.

Argument binding: call arguments first (a decorated function's signature, or for query
strings positional arguments in order of first use), then the defining scope, then
builtins. A missing value is an error naming it, before any model is loaded.
Options: call-time keywords override the decorator's, which override the query clauses.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import inspect
from typing import Any, Callable

from lmq.backends import load_backend, resolve_model_id
from lmq.backends.base import Backend
from lmq.compiler.codegen import PromptProgram, compile_query
from lmq.compiler.nesting import parse_python
from lmq.errors import LmqError, QueryArgumentError
from lmq.runtime.branching import is_branching, run_branches
from lmq.runtime.decoders import make_decoder
from lmq.runtime.hole import check_satisfiable
from lmq.runtime.interpreter import Session, execute
from lmq.runtime.scoring import ScoreResult, check_aggregation, score
from lmq.runtime.trace import Tracer, TraceSink, error_event, query_event, result_event

_CONTINUATION = '"{prompt}[CONTINUATION]" where len(TOKENS(CONTINUATION)) <= max_tokens'


class Model:
    """A model id plus backend keyword arguments (`lmq.model(...)`); loads on first use."""

    def __init__(self, model_id: str | None = None, **kwargs: Any):
        self.model_id = model_id
        self.kwargs = kwargs

    def backend(self) -> Backend:
        return load_backend(self.model_id, **self.kwargs)

    async def score(self, prompt: str | list[int], values: list[str | list[int]]) -> ScoreResult:
        """Token log-probabilities of each value as a continuation of `prompt`, all values
        in one batch per token position: `.logprobs()`, `.probs()`, `.argmax()`."""
        return await score(self.backend(), prompt, values)

    def score_sync(self, prompt: str | list[int], values: list[str | list[int]]) -> ScoreResult:
        return run_sync_coroutine(self.score(prompt, values))

    async def generate(self, prompt: str, max_tokens: int = 32, decoder: str = "argmax",
                       **decoder_kwargs: Any) -> str | list[str]:
        """The continuation of `prompt` (no constraint but `max_tokens`) under any decoder;
        a list of continuations for decoders with several results."""
        if not isinstance(prompt, str):
            raise QueryArgumentError(f"generate: the prompt must be a string, not {prompt!r}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise QueryArgumentError(f"generate: max_tokens must be an int >= 0, not {max_tokens!r}")
        query = QueryFunction(compile_query(_CONTINUATION), {}, name="generate")
        result = await query.run(prompt=prompt, max_tokens=max_tokens, model=self, decoder=decoder,
                                 **decoder_kwargs)
        if isinstance(result, list):
            return [r.variables["CONTINUATION"] for r in result]
        return result.variables["CONTINUATION"]

    def generate_sync(self, prompt: str, max_tokens: int = 32, decoder: str = "argmax",
                      **decoder_kwargs: Any) -> str | list[str]:
        return run_sync_coroutine(self.generate(prompt, max_tokens, decoder, **decoder_kwargs))

    def __repr__(self) -> str:
        return f"lmq.model({self.model_id!r}{''.join(f', {k}={v!r}' for k, v in self.kwargs.items())})"


def as_model(model: Any) -> Model:
    if isinstance(model, Model):
        return model
    if model is None or isinstance(model, str):
        return Model(model)
    raise QueryArgumentError(f"model must be a model id string or lmq.model(...), not {model!r}")


class QueryFunction:
    """A query ready to run. Calling it runs it; an `async def` query returns a coroutine."""

    is_lmq_query = True

    def __init__(self, program: PromptProgram, scope: dict[str, Any], *,
                 signature: inspect.Signature | None = None, is_async: bool = False,
                 name: str = "query", options: dict[str, Any] | None = None):
        check_satisfiable(program)
        self.program = program
        self.scope = scope
        self.signature = signature
        self.is_async = is_async
        self.__name__ = name
        self.options = dict(options or {})

    def __repr__(self) -> str:
        return f"<lmq query {self.__name__}({', '.join(self.program.free_names)})>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_async:
            return self.run(*args, **kwargs)
        return run_sync_coroutine(self.run(*args, **kwargs))

    async def run(self, *args: Any, on_text: Callable[[str], None] | None = None, **kwargs: Any) -> Any:
        """Run the query (the coroutine behind every way of calling it); `trace=` writes
        its trace (runtime/trace.py)."""
        params = set(self.signature.parameters) if self.signature else set(self.program.free_names)
        options = {**self.options, **{k: v for k, v in kwargs.items() if k not in params}}
        trace = options.pop("trace", None)
        if trace is None:
            return await self._run(args, kwargs, params, options, on_text, None)
        sink = TraceSink(trace)
        try:
            returned = await self._run(args, kwargs, params, options, on_text, sink)
        except BaseException as error:
            sink.emit(error_event(error, self.program.filename))
            raise
        else:
            sink.emit(result_event(returned))
            return returned
        finally:
            sink.close()

    async def _run(self, args: tuple, kwargs: dict[str, Any], params: set[str],
                   options: dict[str, Any], on_text: Callable[[str], None] | None,
                   sink: TraceSink | None) -> Any:
        namespace, bound = self.bind(args, {k: v for k, v in kwargs.items() if k in params})
        model = options.pop("model", None)
        name, settings = self._decoder(options, namespace)
        norm = settings.pop("distribution_norm", "sum")
        decoder = make_decoder(name, settings)
        decoder.distribution_norm = check_aggregation(norm, "distribution_norm")
        backend = None
        if self.program.holes:           # a query without holes never touches a model
            if model is None and self.program.model is not None:
                model = self.program.model.evaluate(namespace)
            model = as_model(model)
            backend = model.backend()
        if sink is not None:
            decoder.tracer = Tracer(sink)
            model_id = resolve_model_id(model.model_id) if backend is not None else None
            sink.emit(query_event(self.__name__, self.program.source, model_id, decoder))
        if is_branching(decoder):
            return await run_branches(decoder, self.program, namespace, bound, backend)
        session = Session(backend, decoder, on_text)
        try:
            return await execute(self.program, namespace, bound, session)
        finally:
            session.close()

    def _decoder(self, options: dict[str, Any], namespace: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Decoder name and settings: the clause's, then the decorator's and the call's."""
        clause = self.program.decoder
        name = clause.name if clause else "argmax"
        settings = dict(clause.arguments.evaluate(namespace)) if clause and clause.arguments else {}
        decoder = options.pop("decoder", None)
        if decoder is not None:
            name, given = _parse_decoder(decoder)
            settings.update(given)
        settings.update(options)
        return name, settings

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """(namespace for the program, values of its free names in order)."""
        values: dict[str, Any] = {}
        if self.signature is not None:
            try:
                call = self.signature.bind(*args, **kwargs)
            except TypeError as e:
                raise QueryArgumentError(f"{self.__name__}(): {e}") from None
            call.apply_defaults()
            values.update(call.arguments)
        else:
            unknown = sorted(set(kwargs) - set(self.program.free_names))
            if unknown:
                raise QueryArgumentError(f"unknown argument{'s' if len(unknown) > 1 else ''} "
                                         f"of {self.__name__}: {', '.join(unknown)}")
            values.update(kwargs)
            open_names = [n for n in self.program.free_names if n not in kwargs
                          and n not in self.scope and not hasattr(builtins, n)]
            if len(args) > len(open_names):
                raise QueryArgumentError(f"{self.__name__}() takes {len(open_names)} positional "
                                         f"argument{'s' if len(open_names) != 1 else ''} "
                                         f"({', '.join(open_names) or 'none'}), {len(args)} given")
            values.update(zip(open_names, args))
        bound = []
        missing = []
        for name in self.program.free_names:
            if name in values:
                bound.append(values[name])
            elif name in self.scope:
                bound.append(self.scope[name])
            elif hasattr(builtins, name):
                bound.append(getattr(builtins, name))
            else:
                missing.append(name)
        if missing:
            raise QueryArgumentError(f"{self.__name__}: no value for {', '.join(missing)} "
                                     "(pass it as an argument or define it in the calling scope)")
        namespace = {**self.scope, **values}
        namespace.setdefault("__builtins__", builtins)
        return namespace, bound


def _parse_decoder(text: str) -> tuple[str, dict[str, Any]]:
    """`"sample(n=2, temperature=0.5)"` → ("sample", {...}) with literal arguments."""
    try:
        node = parse_python(text.strip()).body
        if isinstance(node, ast.Name):
            return node.id, {}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args \
                and all(k.arg for k in node.keywords):
            return node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError, TypeError):
        pass
    raise QueryArgumentError(f"invalid decoder {text!r}: expected name(key=literal, …)")


def run_sync_coroutine(coroutine) -> Any:
    """Run to completion; inside a running event loop, say to await instead."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    coroutine.close()
    raise LmqError("a synchronous lmq call cannot run inside a running event loop: "
                   "await the async form (await lmq.run(...), or an async def query) instead")
