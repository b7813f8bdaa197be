"""`HolePlan`: the constraint program of one hole, lowered from the IR at the moment the
hole is reached (runtime operands evaluated in the query's scope).

A plan has the parts a decoder enforces: a token budget (`min_tokens`/`max_tokens`, and
counts the value may not end at), stop phrases, a `TokenAutomaton` (what may come next,
as a token mask per state) and checks on the final value. Regular constraints (`in`,
`==`, `!=`, substring, `len(X)`, `INT`, `FLOAT`, `REGEX`, and their `and`/`or`/`not`)
become one byte automaton, with the stop phrases folded in so that a value cut at a stop
still satisfies them; `GRAMMAR` and `JSON` become a grammar automaton (llguidance).
"""

from __future__ import annotations

import functools
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Protocol

from lmq.backends.base import Vocabulary
from lmq.compiler import automaton as fa
from lmq.compiler.codegen import HoleSpec, PromptProgram
from lmq.compiler.constraints import (CharCount, Constraint, Junction, Negation, Operand,
                                      PythonCheck, StopPhrase, TokenCount, TypeConstraint,
                                      ValueComparison, conjuncts, lowered_operands)
from lmq.compiler.gbnf import Grammar, parse_gbnf
from lmq.compiler.gbnf_export import dfa_to_gbnf
from lmq.compiler.json_schema import json_constraint
from lmq.compiler.languages import (TYPE_PATTERNS, LanguageKey, character_budget, conjunction,
                                    key_from_json, key_to_json, stopped_dfa, value_dfa)
from lmq.errors import ConstraintError, ConstraintTooLarge, UnsatisfiableConstraint
from lmq.runtime.char_budget import CharBudgetAutomaton
from lmq.runtime.grammar import GrammarTokenAutomaton, grammar_lark
from lmq.runtime.token_budget import TokenWindow
from lmq.runtime.token_masks import DfaTokenAutomaton, TokenMask


class TokenAutomaton(Protocol):
    """The per-hole token automaton of the constraint engine.

    `mask(state)` is the state's `TokenMask` (computed once per state and cached by the
    engine; end tokens are never in it); `accepts(state)` says whether the value may end
    there. `advance` may consume the state it is given (grammar states are mutable): a
    caller that keeps a state for another branch takes `fork(state)` first. `forced` is
    the text every value must continue with (fast-forward).
    """

    def initial(self) -> Hashable: ...

    def mask(self, state: Hashable) -> TokenMask: ...

    def advance(self, state: Hashable, token: int) -> Hashable: ...

    def accepts(self, state: Hashable) -> bool: ...

    def forced(self, state: Hashable) -> bytes: ...

    def fork(self, state: Hashable) -> Hashable: ...


@dataclass(frozen=True)
class StopRule:
    phrase: bytes
    keep: bool              # STOPS_AT keeps the phrase in the value, STOPS_BEFORE drops it


@dataclass
class HolePlan:
    name: str
    min_tokens: int = 0
    max_tokens: int | None = None
    excluded_counts: frozenset[int] = frozenset()    # `len(TOKENS(X)) != n`
    stops: tuple[StopRule, ...] = ()
    automaton: TokenAutomaton | None = None
    language: LanguageKey | None = None              # the regular part, for the re-check
    grammar: str | None = None                       # GBNF of a GRAMMAR/JSON constraint
    convert: Callable[[str], Any] | None = None      # INT → int, FLOAT → float, JSON → object
    checks: list[tuple[str, Callable[[Any], bool]]] = field(default_factory=list)
    _windows: dict[int, TokenWindow] = field(default_factory=dict, repr=False, compare=False)

    def may_end_at(self, count: int) -> bool:
        """Whether a value of `count` tokens satisfies the token budget."""
        return count >= self.min_tokens and count not in self.excluded_counts

    @property
    def counts_tokens(self) -> bool:
        """Whether the token budget constrains the value's token count at all."""
        return self.min_tokens > 0 or self.max_tokens is not None or bool(self.excluded_counts)

    def remaining(self, count: int) -> TokenWindow:
        """The token counts the budget still allows after `count` tokens (cached: the
        decoder asks once per step)."""
        window = self._windows.get(count)
        if window is None:
            window = self._windows[count] = TokenWindow.of(
                self.min_tokens, self.max_tokens, self.excluded_counts).after(count)
        return window

    def gbnf(self) -> str | None:
        """The plan's value language as GBNF (llama.cpp's dialect), None for any text."""
        if self.grammar is not None:
            return self.grammar
        if self.language is None and not self.stops:
            return None
        stops = [(rule.phrase, rule.keep) for rule in self.stops]
        note = ""
        try:
            base = value_dfa(self.language) if self.language is not None else fa.valid_utf8()
        except ConstraintTooLarge:      # a character count too large to spell out as rules
            rest, limit = character_budget(self.language)
            if limit is None:
                raise
            base = value_dfa(rest)
            note = f"# and at most {limit} characters (not expressed in the rules)\n"
        return note + dfa_to_gbnf(fa.stop_values(base, stops) if stops else base)

    def to_program(self) -> dict[str, Any]:
        """The plan as an LMTP constraint program: a GRAMMAR/JSON constraint as its GBNF, a
        regular one as lmq's exact language key (so an lmq server builds the very same
        automaton and masks), the budget and the stops."""
        return {"grammar": self.grammar,
                "language": key_to_json(self.language) if self.language is not None else None,
                "min_tokens": self.min_tokens, "max_tokens": self.max_tokens,
                "excluded_counts": sorted(self.excluded_counts),
                "stops": [{"phrase": r.phrase.decode("utf-8"), "keep": r.keep} for r in self.stops]}


def plan_from_program(program: dict[str, Any], vocabulary: Vocabulary,
                      name: str = "constraint") -> HolePlan:
    """The plan a constraint program describes (the inverse of `HolePlan.to_program`; the
    program comes from a network client and is validated, never evaluated). A program
    with a language key is enforced through it; else its grammar, if any."""
    plan = program_plan(program, name)
    if plan.grammar is not None:
        plan.grammar = _grammar_of(plan.grammar, name).text
    _build_automaton(plan, vocabulary)
    return plan


def program_plan(program: dict[str, Any], name: str = "constraint") -> HolePlan:
    """A constraint program's plan without its automaton (budget, stops, the language key
    or the grammar text as sent): cheap, so a server checks it before any compiling."""
    try:
        language = program.get("language")
        plan = HolePlan(name, min_tokens=program.get("min_tokens", 0),
                        max_tokens=program.get("max_tokens"),
                        excluded_counts=frozenset(program.get("excluded_counts", ())),
                        stops=tuple(StopRule(s["phrase"].encode("utf-8"), bool(s["keep"]))
                                    for s in program.get("stops", ())),
                        language=key_from_json(language) if language is not None else None)
        if language is None:
            plan.grammar = program.get("grammar")
    except (TypeError, KeyError, AttributeError, ValueError) as e:
        raise ConstraintError(f"malformed constraint program: {e}") from None
    if plan.grammar is not None and not isinstance(plan.grammar, str):
        raise ConstraintError("malformed constraint program: the grammar must be GBNF text")
    return plan


@dataclass(frozen=True)
class CompiledConstraint:
    """The vocabulary-free part of a plan's automaton, picklable: the byte DFA of its
    language (with the character budget counted apart), or its checked grammar and that
    grammar in llguidance's syntax. The costly part of compiling; a server builds it in
    a separate process and finishes the automaton with `attach_automaton`."""

    dfa: fa.ByteDfa | None = None
    most_chars: int | None = None
    grammar: Grammar | None = None
    lark: str | None = None


def compile_constraint(plan: HolePlan) -> CompiledConstraint | None:
    """The compiled form of `plan`'s language or grammar (None when it has neither)."""
    if plan.grammar is not None:
        grammar = _grammar_of(plan.grammar, plan.name)
        return CompiledConstraint(grammar=grammar, lark=grammar_lark(grammar))
    if plan.language is None:
        return None
    dfa, most_chars = _language_dfa(plan.language, _stop_pairs(plan))
    return CompiledConstraint(dfa=dfa, most_chars=most_chars)


def attach_automaton(plan: HolePlan, compiled: CompiledConstraint | None,
                     vocabulary: Vocabulary) -> None:
    """Give `plan` the token automaton of `compiled` over `vocabulary`."""
    if compiled is None:
        return
    if compiled.grammar is not None:
        plan.grammar = compiled.grammar.text
        plan.automaton = GrammarTokenAutomaton(compiled.grammar, vocabulary, variable=plan.name,
                                               lark=compiled.lark)
    else:
        plan.automaton = _token_automaton(compiled.dfa, compiled.most_chars, vocabulary)


def plan_hole(name: str, constraint: Constraint | None, scope: dict[str, Any],
              vocabulary: Vocabulary) -> HolePlan:
    """The plan of hole `name`, with its token automaton over `vocabulary`."""
    plan = lower_hole(name, constraint, scope)
    _build_automaton(plan, vocabulary)
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
                or (most_chars is not None and _fewest_characters(rest) > most_chars):
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


def _build_automaton(plan: HolePlan, vocabulary: Vocabulary) -> None:
    if plan.grammar is not None:
        plan.automaton = GrammarTokenAutomaton(_grammar_of(plan.grammar, plan.name), vocabulary,
                                               variable=plan.name)
        return
    if plan.language is None:
        return
    plan.automaton = _dfa_automaton(plan.language, _stop_pairs(plan), vocabulary)


def _stop_pairs(plan: HolePlan) -> tuple[tuple[bytes, bool], ...]:
    return tuple((rule.phrase, rule.keep) for rule in plan.stops)


#: (language, stops, id of the vocabulary) → (the vocabulary, kept alive so its id stays
#: its own, and the token automaton)
_automata: dict[tuple, tuple[Vocabulary, DfaTokenAutomaton | CharBudgetAutomaton]] = {}


def _dfa_automaton(key: LanguageKey, stops: tuple,
                   vocabulary: Vocabulary) -> DfaTokenAutomaton | CharBudgetAutomaton:
    """One token automaton per (language, stops, vocabulary), so masks computed for a
    state serve every later hole with the same constraint."""
    cache_key = (key, stops, id(vocabulary))
    cached = _automata.get(cache_key)
    if cached is None:
        if len(_automata) > 256:
            _automata.clear()
        automaton = _token_automaton(*_language_dfa(key, stops), vocabulary)
        cached = _automata[cache_key] = (vocabulary, automaton)
    return cached[1]


def _language_dfa(key: LanguageKey, stops: tuple) -> tuple[fa.ByteDfa, int | None]:
    """The byte DFA of a language with its stops, and the most characters it allows: an
    upper bound on the characters is a budget the automaton counts, not states of the DFA."""
    rest, most_chars = character_budget(key)
    return stopped_dfa(rest, stops), most_chars


def _token_automaton(dfa: fa.ByteDfa, most_chars: int | None,
                     vocabulary: Vocabulary) -> DfaTokenAutomaton | CharBudgetAutomaton:
    automaton = DfaTokenAutomaton.for_vocabulary(dfa, vocabulary)
    return automaton if most_chars is None else CharBudgetAutomaton(automaton, most_chars)


@functools.lru_cache(maxsize=256)
def _fewest_characters(key: LanguageKey) -> int:
    """The fewest characters of a value of `key`."""
    language = value_dfa(key)
    return int(fa.fewest_characters(language)[language.initial])


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
        plan.grammar = _grammar_of(argument, item.source).text
    else:
        constraint = json_constraint(argument, owner=item.source)
        plan.grammar, plan.convert = constraint.gbnf, constraint.value


@functools.lru_cache(maxsize=256)
def _grammar_of(text: str, owner: str) -> Grammar:
    return parse_gbnf(text, owner=owner)


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


_COMPARE = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
            "!=": lambda a, b: a != b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


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


def language_holds(key: LanguageKey, value: str) -> bool:
    """Python's own verdict on a language key for a finished value: the reference the
    automata are re-checked against (soundness), independent of them."""
    kind = key[0]
    if kind == "in":
        return value in {o.decode("utf-8", "replace") for o in key[1]}
    if kind == "contains":
        return key[1].decode("utf-8", "replace") in value
    if kind == "chars":
        return _COMPARE[key[1]](len(value), key[2])
    if kind == "regex":
        return re.fullmatch(key[1], value) is not None
    if kind == "not":
        return not language_holds(key[1], value)
    if kind == "and":
        return all(language_holds(k, value) for k in key[1])
    return any(language_holds(k, value) for k in key[1])


def stops_hold(plan: HolePlan, value: bytes) -> bool:
    """A value ended by stop phrases holds no occurrence of one except a kept phrase at its
    very end (the first occurrence ends generation). Only checkable when every occurrence
    could fire: no minimum or excluded token count held a stop back."""
    if plan.min_tokens > 0 or plan.excluded_counts:
        return True
    for rule in plan.stops:
        position = value.find(rule.phrase)
        if position >= 0 and not (rule.keep and position + len(rule.phrase) == len(value)):
            return False
    return True
