"""The interpreter: runs a compiled prompt program against a backend.

`Session` is one run: the backend, the decoder, the prompt and the values so far.
`QueryContext` is the `_ctx` object generated programs call: `text`, `role`, `hole`,
`resolve`. Nested queries run on the caller's session with a context of their own.
"""

from __future__ import annotations

import ast
import functools
import inspect
from typing import Any, Callable

from lmq.backends.base import Backend
from lmq.compiler.codegen import HoleSpec, PromptProgram
from lmq.compiler.constraints import Constraint, Operand
from lmq.constraints.hole_plan import HoleOutput, HolePlan, language_holds, stops_hold
from lmq.errors import ConstraintViolation, ContextLimitError
from lmq.runtime.decoders import Decoder
from lmq.runtime.decorators import DecoratorContext, HoleDecorators
from lmq.runtime.hole import ANNOTATION, annotated_where, plan_hole
from lmq.runtime.prompt import PromptState
from lmq.runtime.result import LMQResult
from lmq.runtime.scheduler import Lane, scheduler_for
from lmq.runtime.scoring import fill_distribution


class Session:
    """One query run: backend, decoder, prompt state and the values produced."""

    def __init__(self, backend: Backend | None, decoder: Decoder,
                 on_text: Callable[[str], None] | None = None, lane: Lane | None = None):
        self.backend = backend           # None: a query without holes, no model needed
        self.decoder = decoder
        self.prompt = PromptState(backend)
        context = backend.context_size if backend else 0
        self.max_len = min(decoder.max_len or context, context)
        self.on_text = on_text
        self.variables: dict[str, Any] = {}
        self.tokens: dict[str, list[int]] = {}
        self.logprob = 0.0
        self.distribution: list[tuple[str, float]] | None = None
        self._lane = lane

    @property
    def lane(self) -> Lane:
        """This run's KV-cache sequence, through the model's scheduler (made on first use)."""
        if self._lane is None:
            self._lane = scheduler_for(self.backend).lane()
        return self._lane

    def write(self, text: str) -> None:
        self.prompt.append_text(text)
        if self.on_text and text:
            self.on_text(text)
        if self.decoder.tracer is not None and text:
            messages = self.prompt.messages
            self.decoder.tracer.text(text, messages[-1][0] if messages else None)

    def result(self) -> LMQResult:
        return LMQResult(prompt=self.prompt.final_text(), variables=dict(self.variables),
                         tokens={k: list(v) for k, v in self.tokens.items()}, logprob=self.logprob,
                         distribution=self.distribution)

    def close(self) -> None:
        if self._lane is not None:
            self._lane.release()
            self._lane = None


class QueryContext:
    """The runtime object behind `_ctx` in a generated program."""

    def __init__(self, session: Session, program: PromptProgram, namespace: dict[str, Any]):
        self.session = session
        self.program = program
        self.namespace = namespace

    async def text(self, text: str) -> None:
        self.session.write(text)

    async def role(self, role: str) -> None:
        fallback = self.session.prompt.open_message(role)
        if fallback is not None:
            self.session.write(fallback)

    @staticmethod
    async def resolve(value: Any) -> Any:
        return await value if inspect.isawaitable(value) else value

    async def hole(self, index: int, local_scope: dict[str, Any]) -> Any:
        spec = self.program.holes[index]
        scope = {**self.namespace, **local_scope}
        session = self.session
        decorators = HoleDecorators([d.evaluate(scope) for d in spec.decorators])
        context = DecoratorContext(spec.name, session.prompt.text, dict(session.variables)) \
            if decorators else None
        mark = session.prompt.mark() if decorators.post else None
        supplied, value = decorators.supplied_value(context) if decorators.pre else (False, None)
        if supplied:
            session.write(str(value))
            finish = "supplied"
        elif self._is_distribution(spec):
            value = await fill_distribution(session, spec.name, self.program.distribution, scope)
            finish = "distribution"
        elif spec.annotation is not None:
            value, finish = await self._annotated(spec, scope, decorators, context)
        else:
            value, finish = await self._generate(spec, spec.where, scope, decorators, context)
        if mark is not None:
            shown = session.prompt.text[mark.text:]
            value, replacement = decorators.post_process(value, shown, context)
            if replacement != shown:
                session.prompt.truncate(mark)
                session.prompt.append_text(replacement)
        session.variables[spec.name] = value
        if session.decoder.tracer is not None:
            session.decoder.tracer.value(spec.name, value, finish)
        return value

    def _is_distribution(self, spec: HoleSpec) -> bool:
        distribution = self.program.distribution
        return distribution is not None and spec.name in distribution.variables

    async def _generate(self, spec: HoleSpec, where: Constraint | None, scope: dict[str, Any],
                        decorators: HoleDecorators, context: DecoratorContext | None) -> tuple[Any, str]:
        """The hole's value and how its generation finished ("end", "stop", "length")."""
        session = self.session
        plan = plan_hole(spec.name, where, scope, session.backend.vocabulary)
        if session.decoder.tracer is not None:
            session.decoder.tracer.hole(plan, where, session.backend)
        prompt = session.prompt
        on_text = None
        if session.on_text or decorators.streaming:
            partial = bytearray()

            def on_text(data: bytes) -> None:
                if session.on_text:
                    session.on_text(data.decode("utf-8", "replace"))
                if decorators.streaming:
                    partial.extend(data)
                    decorators.stream(partial.decode("utf-8", "replace"), context)
        try:
            output = await session.decoder.decode(session.lane, prompt.context(), plan,
                                                  session.backend, session.max_len, on_text)
        except ContextLimitError as e:
            if e.result is not None:        # (tokens, value) generated before the limit
                tokens, value = e.result
                session.variables[spec.name] = value.decode("utf-8", "replace")
                session.tokens[spec.name] = tokens
            raise
        table = session.backend.vocabulary.token_bytes
        kept, size = [], 0
        for token in output.tokens:
            if size + len(table[token]) > len(output.value):
                break
            kept.append(token)
            size += len(table[token])
        while kept and size < len(output.value) and output.value[size] & 0xC0 == 0x80:
            size -= len(table[kept.pop()])      # the cut remainder starts a whole character
        value = output.value.decode("utf-8", "replace")
        prompt.append_generated(kept, output.value[size:].decode("utf-8", "replace"), value)
        session.tokens[spec.name] = output.tokens
        session.logprob += output.logprob
        _check(spec, plan, output, value)
        return (plan.convert(value) if plan.convert is not None else value), output.finish

    async def _annotated(self, spec: HoleSpec, scope: dict[str, Any], decorators: HoleDecorators,
                         context: DecoratorContext | None) -> tuple[Any, str]:
        target, args, kwargs = _call_parts(spec.annotation, scope)
        if getattr(target, "is_lmq_query", False):
            return await self._nested(target, args, kwargs), "query"
        return await self._generate(spec, annotated_where(spec, target), {**scope, ANNOTATION: target},
                                    decorators, context)

    async def _nested(self, query, args: tuple, kwargs: dict) -> Any:
        """Run a query function on this prompt; a returned value replaces its text."""
        prompt = self.session.prompt
        mark = prompt.mark()
        namespace, bound = query.bind(args, kwargs)
        context = QueryContext(self.session, query.program, namespace)
        tracer = self.session.decoder.tracer
        if tracer is not None:
            tracer.nested(query.__name__, query.program.source)
        outer = self.session.variables, self.session.tokens
        self.session.variables, self.session.tokens = {}, {}   # its holes are not the caller's
        try:
            returned = await query.program.function(dict(namespace))(context, *bound)
        finally:
            self.session.variables, self.session.tokens = outer
        if tracer is not None:
            tracer.nested_result(returned)
        if returned is None:
            return prompt.text[mark.text:]
        prompt.truncate(mark)
        self.session.write(str(returned))
        return returned


def _check(spec: HoleSpec, plan: HolePlan, output: HoleOutput, value: str) -> None:
    """Soundness: the finished value is re-checked against what the plan promised, with
    Python's own semantics (never expected to fail; the check stays on)."""
    count = len(output.tokens)
    if count < plan.min_tokens or (plan.max_tokens is not None and count > plan.max_tokens) \
            or (output.finish != "length" and count in plan.excluded_counts):
        raise ConstraintViolation(f"{spec.name} has {count} tokens, outside its bounds "
                                  f"[{plan.min_tokens}, {plan.max_tokens}]")
    if plan.language is not None and not language_holds(plan.language, value):
        raise ConstraintViolation(f"{spec.name} = {value!r} does not satisfy its constraints")
    if plan.stops and not stops_hold(plan, output.value):
        raise ConstraintViolation(f"{spec.name} = {value!r} runs past a stop phrase")
    if plan.automaton is not None and plan.grammar is not None and not _grammar_accepts(plan, output):
        raise ConstraintViolation(f"{spec.name} = {value!r} is not derived by its grammar")
    for source, check in plan.checks:
        if not check(value):
            raise ConstraintViolation(f"{spec.name} = {value!r} does not satisfy {source}")


def _grammar_accepts(plan: HolePlan, output: HoleOutput) -> bool:
    """Replay the generated tokens through a fresh grammar state (a grammar's `advance`
    refuses a token its grammar does not allow: no mask is computed)."""
    automaton = plan.automaton
    state = automaton.initial()
    try:
        for token in output.tokens:
            state = automaton.advance(state, token)
    except ConstraintViolation:
        return False
    return automaton.accepts(state)


@functools.lru_cache(maxsize=512)
def _split_call(source: str) -> tuple[Operand, tuple[Operand, ...], tuple[tuple[str, Operand], ...]] | None:
    node = ast.parse(source, mode="eval").body
    if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args) \
            or any(k.arg is None for k in node.keywords):
        return None

    def operand(n: ast.AST) -> Operand:
        return Operand.of(ast.unparse(n))

    return (operand(node.func), tuple(operand(a) for a in node.args),
            tuple((k.arg, operand(k.value)) for k in node.keywords))


def _call_parts(annotation: Operand, scope: dict[str, Any]) -> tuple[Any, tuple, dict]:
    """(target, args, kwargs) of an annotation `f(a, b=c)` without calling `f`, so a
    query function can run nested; a plain annotation is (value, (), {})."""
    parts = _split_call(annotation.source)
    if parts is not None:
        func, args, keywords = parts
        target = func.evaluate(scope)
        if getattr(target, "is_lmq_query", False):
            return target, tuple(a.evaluate(scope) for a in args), \
                {k: v.evaluate(scope) for k, v in keywords}
    return annotation.evaluate(scope), (), {}


async def execute(program: PromptProgram, namespace: dict[str, Any], bound: list[Any],
                  session: Session) -> Any:
    """Run `program`; its return value, or the `LMQResult` when it returns nothing."""
    context = QueryContext(session, program, namespace)
    try:
        returned = await program.function(dict(namespace))(context, *bound)
    except ContextLimitError as e:
        e.result = session.result()
        raise
    return session.result() if returned is None else returned
