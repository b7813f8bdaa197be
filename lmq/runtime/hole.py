"""`HolePlan`: the constraint program of one hole, lowered from the IR at the moment the
hole is reached (runtime operands evaluated in the query's scope).

A plan has four parts a decoder enforces: a token budget (`min_tokens`/`max_tokens`),
stop phrases, an optional `TokenAutomaton` (the constraint engine's per-hole automaton:
what may come next, as a token mask per state) and checks on the final value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

import numpy as np

from lmq.compiler.constraints import (PythonCheck, StopPhrase, TokenCount, conjuncts,
                                      require_supported)
from lmq.errors import ConstraintError, UnsatisfiableConstraint


class TokenAutomaton(Protocol):
    """The per-hole token automaton the constraint engine plugs in.

    States are hashable; `mask(state)` is a float32 bias row (0 allowed, -inf masked) or
    None for "every token", computed once per state and cached by the engine; `advance`
    is a table lookup; `accepts(state)` says whether the value may end there.
    """

    def initial(self) -> Hashable: ...

    def mask(self, state: Hashable) -> np.ndarray | None: ...

    def advance(self, state: Hashable, token: int) -> Hashable: ...

    def accepts(self, state: Hashable) -> bool: ...


@dataclass(frozen=True)
class StopRule:
    phrase: bytes
    keep: bool              # STOPS_AT keeps the phrase in the value, STOPS_BEFORE drops it


@dataclass
class HolePlan:
    name: str
    min_tokens: int = 0
    max_tokens: int | None = None
    stops: tuple[StopRule, ...] = ()
    automaton: TokenAutomaton | None = None
    checks: list[tuple[str, Callable[[Any], bool]]] = field(default_factory=list)


def plan_hole(name: str, constraint, scope: dict[str, Any]) -> HolePlan:
    """Lower the conjuncts of `constraint` that concern hole `name`."""
    plan = HolePlan(name)
    stops: list[StopRule] = []
    for item in conjuncts(constraint):
        if name not in item.variables:
            continue
        require_supported(item)
        if isinstance(item, TokenCount):
            _bound_tokens(plan, item, item.bound.evaluate(scope))
        elif isinstance(item, StopPhrase):
            stops.extend(_stop_rules(item, item.phrases.evaluate(scope)))
        elif isinstance(item, PythonCheck):
            plan.checks.append((item.source, _python_check(item, scope, name)))
    if plan.max_tokens is not None and plan.min_tokens > plan.max_tokens:
        raise UnsatisfiableConstraint(
            f"no value of {name} can satisfy the token bounds: at least {plan.min_tokens} and "
            f"at most {plan.max_tokens} tokens")
    plan.stops = tuple(stops)
    return plan


def _bound_tokens(plan: HolePlan, item: TokenCount, bound: Any) -> None:
    if not isinstance(bound, int) or isinstance(bound, bool):
        raise ConstraintError(f"in {item.source!r} the bound must be an int, not {bound!r}")
    low, high = {"<": (0, bound - 1), "<=": (0, bound), "==": (bound, bound),
                 ">": (bound + 1, None), ">=": (bound, None), "!=": (0, None)}[item.op]
    if item.op == "!=":
        raise ConstraintError(f"{item.source!r}: '!=' on a token count needs the token-mask "
                              "engine, which this version of lmq does not have yet")
    plan.min_tokens = max(plan.min_tokens, low)
    if high is not None:
        if high < 0:
            raise UnsatisfiableConstraint(f"no value of {item.variable} satisfies {item.source}")
        plan.max_tokens = high if plan.max_tokens is None else min(plan.max_tokens, high)


def _stop_rules(item: StopPhrase, phrases: Any) -> list[StopRule]:
    if isinstance(phrases, str):
        phrases = [phrases]
    if not isinstance(phrases, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in phrases):
        raise ConstraintError(f"{item.source!r}: the stop phrase must be a string or a list of "
                              f"strings, not {phrases!r}")
    if any(p == "" for p in phrases):
        raise ConstraintError(f"{item.source!r}: a stop phrase cannot be empty")
    return [StopRule(p.encode("utf-8"), item.keep) for p in phrases]


def _python_check(item: PythonCheck, scope: dict[str, Any], name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        try:
            return bool(item.operand.evaluate({**scope, name: value}))
        except NameError:        # another hole of the check is not filled yet
            return True
    return check
