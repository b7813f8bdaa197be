"""Variable decorators, `[@f X]`, with LMQL's three kinds.

- a plain function post-processes the finished value: `f(value)` returns the new value;
  `f(value, prompt_value, context)` returns `(value, prompt_value)`, the second being the
  text that stands in the prompt instead of the generated text;
- `@lmq.pre` decorators run before generation: `f(variable)` or `f(variable, context)`
  returns the value to use without generating, or the variable itself (or None) to
  generate as usual;
- `@lmq.streaming` decorators see each partial value while it is generated:
  `f(value)` or `f(value, context)`.

Decorators apply innermost first, as Python's do: in `[@a @b X]`, `b` sees the value first.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from lmq.errors import QueryArgumentError

_KIND = "__lmq_decorator__"


def pre(function: Callable) -> Callable:
    """Mark `function` as a pre-generation decorator (may supply the value itself)."""
    setattr(function, _KIND, "pre")
    return function


def streaming(function: Callable) -> Callable:
    """Mark `function` as a streaming decorator (called with each partial value)."""
    setattr(function, _KIND, "streaming")
    return function


@dataclass(frozen=True)
class HoleVariable:
    """What a pre decorator receives: the hole about to be generated."""

    name: str


@dataclass(frozen=True)
class DecoratorContext:
    """What 2- and 3-argument decorators receive: the query's state at this hole."""

    name: str
    prompt: str                    # the prompt text before the hole
    variables: dict[str, Any]      # the values of the holes filled so far


class HoleDecorators:
    """The decorators of one hole occurrence, split by kind."""

    def __init__(self, functions: list[Callable]):
        self.pre: list[Callable] = []
        self.streaming: list[Callable] = []
        self.post: list[Callable] = []
        for function in reversed(functions):             # innermost first
            if not callable(function):
                raise QueryArgumentError(f"the decorator {function!r} is not callable")
            {"pre": self.pre, "streaming": self.streaming}.get(getattr(function, _KIND, None),
                                                                self.post).append(function)

    def __bool__(self) -> bool:
        return bool(self.pre or self.streaming or self.post)

    def supplied_value(self, context: DecoratorContext) -> tuple[bool, Any]:
        """(True, value) when a pre decorator supplies the value, else (False, None)."""
        variable = HoleVariable(context.name)
        for function in self.pre:
            result = _call(function, (variable, context))
            if result is not None and result is not variable:
                return True, result
        return False, None

    def stream(self, partial: str, context: DecoratorContext) -> None:
        for function in self.streaming:
            _call(function, (partial, context))

    def post_process(self, value: Any, prompt_value: str, context: DecoratorContext) -> tuple[Any, str]:
        """(value to bind, text to stand in the prompt) after every post-processor."""
        for function in self.post:
            if _arity(function, 3) == 3:
                result = function(value, prompt_value, context)
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise QueryArgumentError(f"the decorator {_name(function)} takes (value, "
                                             "prompt_value, context) and must return (value, "
                                             f"prompt_value), not {result!r}")
                value, prompt_value = result[0], str(result[1])
            else:
                value = function(value)
        return value, prompt_value


def _call(function: Callable, arguments: tuple) -> Any:
    """Call with as many of `arguments` as the function takes (1 or all)."""
    count = _arity(function, len(arguments))
    return function(*arguments[:count])


def _arity(function: Callable, most: int) -> int:
    """How many positional arguments `function` takes, between 1 and `most` (builtins
    without a signature, like `str.upper`, take one)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return 1
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return most
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(required) > most or (len(required) not in (1, most) and len(positional) < most):
        raise QueryArgumentError(f"the decorator {_name(function)} must take 1 or {most} arguments")
    return most if len(positional) >= most else 1


def _name(function: Callable) -> str:
    return getattr(function, "__qualname__", None) or repr(function)
