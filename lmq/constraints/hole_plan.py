"""`HolePlan`: the constraint program of one hole, as the decoder enforces it.

A plan has a token budget (`min_tokens`/`max_tokens`, and counts the value may not end
at), stop phrases, a `TokenAutomaton` (what may come next, as a token mask per state) and
checks on the final value. Its regular part is a language key (constraints/languages.py)
that becomes one byte automaton, with the stop phrases folded in so that a value cut at a
stop still satisfies it; a `GRAMMAR`/`JSON` part is GBNF that becomes a byte automaton too
when its language is regular (`lmq.constraints.gbnf_dfa`: no recursion, a bounded size),
else a grammar automaton (llguidance). A plan travels as a constraint program
(`to_program`/`plan_from_program`, LMTP's wire form). Lowering a where clause into a plan
is the runtime's (runtime/hole.py).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from lmq.backends.base import Vocabulary
from lmq.constraints import byte_dfa as fa
from lmq.constraints import token_choice
from lmq.constraints.char_budget import CharBudgetAutomaton
from lmq.constraints.gbnf import Grammar, parse_gbnf
from lmq.constraints.gbnf_dfa import cached_grammar_dfa, text_grammar_dfa
from lmq.constraints.gbnf_export import dfa_to_gbnf
from lmq.constraints.grammar_automaton import GrammarTokenAutomaton, grammar_lark
from lmq.constraints.languages import (LanguageKey, character_budget, key_from_json, key_to_json,
                                       stopped_dfa, value_dfa)
from lmq.constraints.token_automaton import TokenAutomaton
from lmq.constraints.token_budget import TokenWindow
from lmq.constraints.token_masks import DENSE_MASKS_KEPT, DfaTokenAutomaton
from lmq.constraints.vocabulary_cache import GRAMMAR_AUTOMATA_SIZE, vocabulary_cache
from lmq.errors import ConstraintError, ConstraintTooLarge


#: the dense masks one regular grammar's token automaton keeps (bytes; with
#: `GRAMMAR_AUTOMATA_SIZE` automata per vocabulary, what a process holds at most)
GRAMMAR_DENSE_MASK_BYTES = 48 << 20


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
        plan.grammar = grammar_of(plan.grammar, name).text
    build_automaton(plan, vocabulary)
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
    language (with the character budget counted apart) or of its regular grammar, or its
    checked grammar and that grammar in llguidance's syntax. The costly part of
    compiling; a server builds it in a separate process and finishes the automaton with
    `attach_automaton`."""

    dfa: fa.ByteDfa | None = None
    most_chars: int | None = None
    grammar: Grammar | None = None
    lark: str | None = None


def compile_constraint(plan: HolePlan) -> CompiledConstraint | None:
    """The compiled form of `plan`'s language or grammar (None when it has neither). A
    grammar is translated here, not read from the grammar cache on disk: a server's
    compile budget bounds this work, whatever an earlier process left there."""
    if plan.grammar is not None:
        dfa = text_grammar_dfa(plan.grammar, plan.name)      # parsed in Python only if needed
        if dfa is not None:
            return CompiledConstraint(dfa=dfa)
        grammar = grammar_of(plan.grammar, plan.name)
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
    elif plan.grammar is not None:
        plan.automaton = _grammar_dfa_automaton(plan.grammar, compiled.dfa, vocabulary)
    else:
        plan.automaton = _token_automaton(compiled.dfa, compiled.most_chars, vocabulary)


def build_automaton(plan: HolePlan, vocabulary: Vocabulary) -> None:
    """Give `plan` the token automaton of its grammar or language over `vocabulary`: a
    regular grammar's DFA (from the grammar cache on disk when it was built before), else
    llguidance's matcher."""
    if plan.grammar is not None:
        dfa = cached_grammar_dfa(plan.grammar, plan.name)
        plan.automaton = (GrammarTokenAutomaton(plan.grammar, vocabulary, variable=plan.name)
                          if dfa is None else _grammar_dfa_automaton(plan.grammar, dfa, vocabulary))
        return
    if plan.language is None:
        return
    plan.automaton = _dfa_automaton(plan.language, _stop_pairs(plan), vocabulary)


def _grammar_dfa_automaton(text: str, dfa: fa.ByteDfa, vocabulary: Vocabulary) -> DfaTokenAutomaton:
    """One token automaton per (regular grammar, vocabulary), keeping as many dense masks
    as `GRAMMAR_DENSE_MASK_BYTES` hold (a JSON document's string positions are states of
    their own, each met once per document): a bit row each, and a bias row where the
    numpy fallback applies them."""
    per_mask = vocabulary.size // 8 + (0 if token_choice.KERNEL is not None else 4 * vocabulary.size)
    kept = max(DENSE_MASKS_KEPT, GRAMMAR_DENSE_MASK_BYTES // per_mask)
    cache = vocabulary_cache(vocabulary)
    return cache.recent(cache.grammar_automata, text,
                        lambda: DfaTokenAutomaton.for_vocabulary(dfa, vocabulary, dense_kept=kept),
                        GRAMMAR_AUTOMATA_SIZE)


def _stop_pairs(plan: HolePlan) -> tuple[tuple[bytes, bool], ...]:
    return tuple((rule.phrase, rule.keep) for rule in plan.stops)


def _dfa_automaton(key: LanguageKey, stops: tuple,
                   vocabulary: Vocabulary) -> DfaTokenAutomaton | CharBudgetAutomaton:
    """One token automaton per (language, stops, vocabulary), so masks computed for a
    state serve every later hole with the same constraint."""
    return vocabulary_cache(vocabulary).automaton(
        (key, stops), lambda: _token_automaton(*_language_dfa(key, stops), vocabulary))


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
def grammar_of(text: str, owner: str) -> Grammar:
    """The checked grammar of GBNF `text` (`owner` names it in errors), parsed once."""
    return parse_gbnf(text, owner=owner)


_COMPARE = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b,
            "!=": lambda a, b: a != b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


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


@dataclass
class HoleOutput:
    tokens: list[int]          # every generated token (the last may overshoot a stop)
    value: bytes               # the value's bytes, stop overshoot removed
    finish: str                # "end" (end token), "stop" (stop phrase), "length" (budget)
    logprob: float             # model log-probability of the generated tokens


def find_stop(value: bytearray, plan: HolePlan, start: int) -> int | None:
    """Where the value ends if a stop phrase ends inside the newest bytes (from `start`
    on): an occurrence completed earlier, while a token count held the stop back, does not
    fire. The occurrence that ends first wins (generation stops as soon as one phrase is
    complete); STOPS_AT keeps the phrase, STOPS_BEFORE drops it."""
    best: tuple[int, int, int] | None = None
    for rule in plan.stops:
        position = value.find(rule.phrase, max(0, start - len(rule.phrase) + 1))
        if position < 0:
            continue
        end = position + len(rule.phrase)
        candidate = (end, position, end if rule.keep else position)
        if best is None or candidate < best:
            best = candidate
    return None if best is None else best[2]
