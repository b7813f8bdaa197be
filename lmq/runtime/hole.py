"""Lowering a hole's where clause into its `HolePlan` (lmq/constraints/hole_plan.py), at
the moment the hole is reached (runtime operands evaluated in the query's scope).

Regular constraints (`in`, `==`, `!=`, substring, `len(X)`, `INT`, `FLOAT`, `REGEX`, and
their `and`/`or`/`not`) become one language key, `GRAMMAR` and `JSON` a grammar, token
counts the budget, `STOPS_AT`/`STOPS_BEFORE` stop rules, anything else a Python check on
the final value. Contradictions are found here, before any model is involved.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from lmq.backends.base import Vocabulary
from lmq.compiler.codegen import HoleSpec, PromptProgram
from lmq.compiler.constraints import (CharCount, Constraint, Junction, Negation, Operand,
                                      PythonCheck, StopPhrase, TokenCount, TypeConstraint,
                                      ValueComparison, conjuncts, lowered_operands)
from lmq.constraints import byte_dfa as fa
from lmq.constraints.hole_plan import HolePlan, StopRule, build_automaton, grammar_of
from lmq.constraints.json_schema import json_constraint
from lmq.constraints.languages import (TYPE_PATTERNS, LanguageKey, character_budget, conjunction,
                                       fewest_value_characters, value_dfa)
from lmq.errors import ConstraintError, UnsatisfiableConstraint


def plan_hole(name: str, constraint: Constraint | None, scope: dict[str, Any],
              vocabulary: Vocabulary) -> HolePlan:
    """The plan of hole `name`, with its token automaton over `vocabulary`."""
    plan = lower_hole(name, constraint, scope)
    build_automaton(plan, vocabulary)
    return plan


def lower_hole(name: str, constraint: Constraint | None, scope: dict[str, Any]) -> HolePlan:
    """Lower the conjuncts of `constraint` that concern hole `name` (no vocabulary needed:
    contradictions are found here, before any model is involved)."""
    plan = HolePlan(name)
    stops: list[StopRule] = []
    keys: list[LanguageKey] = []
    for item in conjuncts(constraint):
        if name not in item.variables:
            continue
        if isinstance(item, TokenCount):
            _bound_tokens(plan, item, item.bound.evaluate(scope))
        elif isinstance(item, StopPhrase):
            stops.extend(_stop_rules(item, item.phrases.evaluate(scope)))
        elif _stop_alternatives(item):
            for alternative in item.items:
                stops.extend(_stop_rules(alternative, alternative.phrases.evaluate(scope)))
        elif isinstance(item, PythonCheck):
            plan.checks.append((item.source, _python_check(item, scope, name)))
        elif len(item.variables) > 1:
            raise ConstraintError(f"{item.source!r} constrains several holes at once inside "
                                  "'or'/'not'; write it as separate constraints per hole")
        elif isinstance(item, TypeConstraint) and item.kind in ("GRAMMAR", "JSON"):
            _grammar(plan, item, scope)
        else:
            if isinstance(item, TypeConstraint) and item.kind in TYPE_PATTERNS and plan.convert is None:
                plan.convert = parse_int if item.kind == "INT" else float
            keys.append(_language_key(item, scope, name))
    if plan.max_tokens is not None and plan.min_tokens > plan.max_tokens:
        raise UnsatisfiableConstraint(
            f"no value of {name} can satisfy the token bounds: at least {plan.min_tokens} and "
            f"at most {plan.max_tokens} tokens")
    plan.stops = tuple(stops)
    plan.language = conjunction(keys)
    if plan.grammar is not None and (plan.language is not None or plan.stops):
        raise ConstraintError(f"{name}: a GRAMMAR/JSON constraint cannot be combined with other "
                              "value constraints or stop phrases on the same hole (express them "
                              "in the grammar)")
    if plan.language is not None:
        if plan.stops and plan.min_tokens > 0:
            raise ConstraintError(f"{name}: a stop phrase together with a minimum token count and "
                                  "a value constraint is not supported")
        rest, most_chars = character_budget(plan.language)
        language = value_dfa(rest)
        if fa.is_empty(language) or (plan.max_tokens == 0 and not language.accepting[language.initial]) \
                or (most_chars is not None and fewest_value_characters(rest) > most_chars):
            raise UnsatisfiableConstraint(f"no value of {name} satisfies its constraints")
    return plan


def static_plan(spec: HoleSpec) -> HolePlan | None:
    """The plan of a hole as far as its literal operands decide it before the query runs,
    without running any of the query's code (None when its constraints read anything but
    literals: names, calls, arithmetic, which only the run evaluates)."""
    if runtime_values(spec):
        return None
    scope: dict[str, Any] = {"__builtins__": {}}     # the operands are literals
    where = spec.where
    if spec.annotation is not None:
        scope[ANNOTATION] = _static_annotation(spec.annotation)[1]
        where = annotated_where(spec, scope[ANNOTATION])
    return lower_hole(spec.name, where, scope)


def runtime_values(spec: HoleSpec) -> list[str]:
    """The operands of a hole's constraints and annotation that only a run can evaluate
    (anything but a literal; `int` and `float` as annotations), as written."""
    values = [o.source for item in conjuncts(spec.where) if spec.name in item.variables
              for o in lowered_operands(item) if not o.constant()[0]]
    if spec.annotation is not None and not _static_annotation(spec.annotation)[0]:
        values.append(spec.annotation.source)
    return list(dict.fromkeys(values))


def grammar_listing(spec: HoleSpec) -> str:
    """What `lmq compile --gbnf` shows of a hole (its GBNF grammar in llama.cpp's
    dialect, token budget and stop phrases, or the run-time values it waits for), as text
    ending in a blank line: the playground shows the same per hole."""
    lines = [f"# hole {spec.index}: {spec.name} (line {spec.line})"]
    plan = static_plan(spec)
    if plan is None:
        lines.append(f"# run-time values: {', '.join(runtime_values(spec))} (not evaluated here: "
                     "the grammar is made when the query runs)\n")
        return "\n".join(lines) + "\n"
    low, high = plan.min_tokens, plan.max_tokens
    budget = ("any number of tokens" if high is None and not low else
              f"at least {low} tokens" if high is None else f"{low} to {high} tokens")
    if plan.excluded_counts:
        budget += f", not {', '.join(map(str, sorted(plan.excluded_counts)))}"
    lines.append(f"# token budget: {budget}")
    stops = ", ".join(f"{'STOPS_AT' if r.keep else 'STOPS_BEFORE'} {r.phrase.decode('utf-8')!r}"
                      for r in plan.stops)
    lines.append(f"# stops: {stops or '(none)'}")
    checks = ", ".join(source for source, _ in plan.checks)
    if checks:
        lines.append(f"# checked on the final value only (no grammar form): {checks}")
    lines.append((plan.gbnf() or 'root ::= [^\\x00]*').rstrip("\n") + "\n")
    return "\n".join(lines) + "\n"


def _static_annotation(annotation: Operand) -> tuple[bool, Any]:
    """(True, target) for `[X: int]`, `[X: float]` and a literal annotation, else (False, None)."""
    if annotation.source in ("int", "float"):
        return True, {"int": int, "float": float}[annotation.source]
    return annotation.constant()


_checked: "weakref.WeakSet[PromptProgram]" = weakref.WeakSet()


def check_satisfiable(program: PromptProgram) -> None:
    """Compile-time contradictions (`X in ["a"] and X in ["b"]`, impossible token bounds)
    as `UnsatisfiableConstraint` naming the variable, once per compiled program."""
    if program not in _checked:
        for spec in program.holes:
            static_plan(spec)
        _checked.add(program)


ANNOTATION = "__lmq_annotation__"


def annotated_where(spec: HoleSpec, target: Any) -> Constraint:
    """The hole's where clause and its annotation's constraint: `[X: int]` is INT(X),
    `[X: float]` FLOAT(X), `[X: r"…"]` REGEX(X, …), any other type JSON(X, type) (the
    annotation's value is bound to `ANNOTATION` in the scope)."""
    name = spec.name
    if target is int:
        typed = TypeConstraint(f"INT({name})", name, "INT", None)
    elif target is float:
        typed = TypeConstraint(f"FLOAT({name})", name, "FLOAT", None)
    else:
        kind = "REGEX" if isinstance(target, str) else "JSON"
        typed = TypeConstraint(f"{kind}({name}, {spec.annotation.source})", name, kind,
                               Operand.of(ANNOTATION))
    if spec.where is None:
        return typed
    return Junction(f"{spec.where.source} and {typed.source}", "and", (spec.where, typed))


def _stop_alternatives(item: Constraint) -> bool:
    """`STOPS_AT(X, a) or STOPS_BEFORE(X, b)`: each disjunct's stop fires on its own."""
    return (isinstance(item, Junction) and item.op == "or"
            and all(isinstance(i, StopPhrase) for i in item.items))


def _language_key(node: Constraint, scope: dict[str, Any], name: str) -> LanguageKey:
    """The language key of a regular constraint node, its operands evaluated."""
    if isinstance(node, ValueComparison):
        value = node.operand.evaluate(scope)
        if node.op in ("in", "not in"):
            key = ("in", _options(node, value))
        elif node.op in ("==", "!="):
            key = ("in", (_string(node, value),))
        else:
            key = ("contains", _string(node, value))
        return ("not", key) if node.op in ("not in", "!=", "not contains") else key
    if isinstance(node, CharCount):
        bound = node.bound.evaluate(scope)
        if not isinstance(bound, int) or isinstance(bound, bool):
            raise ConstraintError(f"in {node.source!r} the bound must be an int, not {bound!r}")
        return ("chars", node.op, bound)
    if isinstance(node, TypeConstraint) and node.kind in TYPE_PATTERNS:
        return ("regex", TYPE_PATTERNS[node.kind])
    if isinstance(node, TypeConstraint) and node.kind == "REGEX":
        pattern = node.argument.evaluate(scope)
        if not isinstance(pattern, str):
            raise ConstraintError(f"{node.source!r}: the regex must be a string, not {pattern!r}")
        return ("regex", pattern)
    if isinstance(node, Junction):
        return (node.op, tuple(_language_key(i, scope, name) for i in node.items))
    if isinstance(node, Negation):
        return ("not", _language_key(node.item, scope, name))
    if isinstance(node, (TokenCount, StopPhrase)):
        raise ConstraintError(f"{node.source!r} can only be a top-level 'and' term of the where "
                              f"clause of {name}, not inside 'or' or 'not'")
    if isinstance(node, TypeConstraint):
        raise ConstraintError(f"{node.source!r} cannot be combined with 'or' or 'not'")
    raise ConstraintError(f"{node.source!r}: a Python check cannot be combined with 'or' or "
                          "'not' of masked constraints")


def _string(node: Constraint, value: Any) -> bytes:
    if not isinstance(value, str):
        raise ConstraintError(f"{node.source!r}: {value!r} is not a string (hole values are strings)")
    return _utf8(node, value)


def _options(node: Constraint, value: Any) -> tuple[bytes, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset, dict)):
        raise ConstraintError(f"{node.source!r}: expected a list of strings, not {value!r}")
    return tuple(sorted({_string(node, v) for v in value}))


def _grammar(plan: HolePlan, item: TypeConstraint, scope: dict[str, Any]) -> None:
    if plan.grammar is not None:
        raise ConstraintError(f"{plan.name}: only one GRAMMAR/JSON constraint per hole")
    argument = item.argument.evaluate(scope)
    if item.kind == "GRAMMAR":
        if not isinstance(argument, str):
            raise ConstraintError(f"{item.source}: the grammar must be a string of GBNF, "
                                  f"not {type(argument).__name__}")
        plan.grammar = grammar_of(argument, item.source).text
    else:
        constraint = json_constraint(argument, owner=item.source)
        plan.grammar, plan.convert = constraint.gbnf, constraint.value


def _bound_tokens(plan: HolePlan, item: TokenCount, bound: Any) -> None:
    if not isinstance(bound, int) or isinstance(bound, bool):
        raise ConstraintError(f"in {item.source!r} the bound must be an int, not {bound!r}")
    if item.op == "!=":
        plan.excluded_counts = plan.excluded_counts | {bound}
        return
    low, high = {"<": (0, bound - 1), "<=": (0, bound), "==": (bound, bound),
                 ">": (bound + 1, None), ">=": (bound, None)}[item.op]
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
    return [StopRule(_utf8(item, p), item.keep) for p in phrases]


def _utf8(node: Constraint, text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConstraintError(f"{node.source!r}: {text[:40]!r} holds a lone surrogate "
                              f"U+{ord(text[e.start]):04X}, which is not a character") from None


def _python_check(item: PythonCheck, scope: dict[str, Any], name: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        try:
            return bool(item.operand.evaluate({**scope, name: value}))
        except NameError:        # another hole of the check is not filled yet
            return True
    return check


def parse_int(text: str) -> int:
    """An INT value as an int, however long: Python's `int(str)` refuses more than 4,300
    digits, so longer digit strings are converted in halves joined arithmetically."""
    text = text.strip()
    digits = text.lstrip("+-")
    value = _digits_value(digits)
    return -value if text.startswith("-") else value


def _digits_value(digits: str) -> int:
    if len(digits) <= 4000:
        return int(digits)
    low = len(digits) // 2
    return _digits_value(digits[:-low]) * 10 ** low + _digits_value(digits[-low:])


