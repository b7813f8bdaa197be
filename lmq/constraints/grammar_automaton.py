"""`GrammarTokenAutomaton`: the token automaton of a context-free constraint (GRAMMAR,
JSON, typed holes), enforced by llguidance on the GBNF grammar that defines it.

A state is an `llguidance.LLMatcher` (an Earley parser over the value's bytes so far).
Context-free states are unbounded, so masks cannot be cached per state as for a DFA:
llguidance computes each one by walking its token trie in Rust. Two llguidance
defaults are turned off because they break lmq's promises: byte forcing (with it, the
mask of a state with forced text allows only the canonical tokenization of that text;
lmq allows every tokenization and fast-forwards forced text itself, from `forced`), and
greedy lexing where it could lose strings (see `lmq.constraints.llguidance_lark`).
"""

from __future__ import annotations

from typing import Callable

import llguidance
import numpy as np

from lmq.backends.base import Vocabulary
from lmq.constraints import grammar_cache
from lmq.constraints.gbnf import Grammar, parse_gbnf
from lmq.constraints.llguidance_lark import to_lark
from lmq.constraints.token_masks import TokenMask
from lmq.constraints.vocabulary_cache import MATCHERS_SIZE, vocabulary_cache
from lmq.errors import ConstraintError, ConstraintTooLarge, ConstraintViolation, UnsatisfiableConstraint
_LARK_HEADER = '%llguidance {"no_forcing": true}\n'


class _VocabularyTokens:
    """What `llguidance.TokenizerWrapper` reads: token bytes, end and special ids.

    llguidance calls the encoder only to tokenize forced text for its own
    fast-forward, which lmq does not use (the decoder tokenizes forced text with the
    model's tokenizer), so the encoder returns no tokens."""

    def __init__(self, vocabulary: Vocabulary):
        self.tokens = list(vocabulary.token_bytes)
        ends = sorted(vocabulary.end_ids)
        self.eos_token_id = ends[0] if ends else (vocabulary.eos_id or 0)
        self.bos_token_id = vocabulary.bos_id
        # control tokens have no text: marked special, llguidance never allows them in text
        self.special_token_ids = [t for t, data in enumerate(self.tokens) if not data]

    def __call__(self, text: bytes) -> list[int]:
        return []


def lltokenizer(vocabulary: Vocabulary) -> llguidance.LLTokenizer:
    """llguidance's tokenizer (token trie) of `vocabulary`, built once per vocabulary."""
    cache = vocabulary_cache(vocabulary)
    if cache.tokenizer is not None:
        return cache.tokenizer
    source = _VocabularyTokens(vocabulary)
    ends = sorted(vocabulary.end_ids) or [source.eos_token_id]
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(source), eos_token=ends)
    with cache.lock:
        if cache.tokenizer is None:
            cache.tokenizer = tokenizer
        return cache.tokenizer


class GrammarTokenAutomaton:
    """Token automaton of a checked GBNF grammar over one vocabulary (see module doc).

    States are matchers: `advance` consumes the given state (call `fork` first to keep
    it); `mask` is computed by llguidance, once per state reached (the last one is kept:
    the decoder asks for a state's mask more than once, e.g. to see whether a guess is
    the only token allowed, and a mask at 262k tokens costs a millisecond).
    """

    exact_budget = False       # masks per call; the decoder checks the last budgeted token
    strands_nothing = True     # a grammar's masks allow viable prefixes only: taken as they are

    def __init__(self, grammar: Grammar | str, vocabulary: Vocabulary, *, variable: str,
                 lark: str | None = None):
        """`grammar`: a checked grammar, or GBNF text (checked unless its llguidance
        form is in the grammar cache); `lark`: `grammar_lark(grammar)` when it is at
        hand (it costs seconds for grammars of hundreds of rules)."""
        self.text = grammar if isinstance(grammar, str) else grammar.text
        self.variable = variable
        self.size = vocabulary.size
        self._template = _compiled_matcher(self.text, vocabulary, variable,
                                           lambda: lark if lark is not None else lark_of(grammar, variable))
        self._bitmask = np.zeros((self.size + 31) // 32, dtype=np.int32)
        ends = np.array(sorted(vocabulary.end_ids), dtype=np.int64)
        self._end_clear = np.full(len(self._bitmask), -1, dtype=np.int32)
        np.bitwise_and.at(self._end_clear, ends // 32, ~(np.int32(1) << (ends % 32).astype(np.int32)))
        self._last: tuple[llguidance.LLMatcher, TokenMask] | None = None   # (state, its mask)

    def initial(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()

    def fork(self, state: llguidance.LLMatcher) -> llguidance.LLMatcher:
        return state.deep_copy()

    def accepts(self, state: llguidance.LLMatcher) -> bool:
        return state.is_accepting()

    def complete(self, state: llguidance.LLMatcher) -> bool:
        """llguidance knows it without a mask: the matcher has stopped (only an end
        token may follow)."""
        return state.is_accepting() and state.is_stopped()

    def forced(self, state: llguidance.LLMatcher) -> bytes:
        """The bytes every continuation of the value starts with (empty if there is a
        choice, or if the value may end here)."""
        if state.is_accepting():
            return b""
        return state.compute_ff_bytes()

    def advance(self, state: llguidance.LLMatcher, token: int) -> llguidance.LLMatcher:
        self._last = None
        if not state.consume_token(token):
            self._check_size(state)
            raise ConstraintViolation(f"token {token} does not continue the grammar of "
                                      f"{self.variable}: {state.get_error()}")
        return state

    def _check_size(self, state: llguidance.LLMatcher) -> None:
        """llguidance's own limits (parser items, lexer states) as `ConstraintTooLarge`."""
        reason = state.get_error().split("\n", 1)[0].strip()
        if "Too many" in reason or "limit" in reason or "; max is " in reason:
            raise ConstraintTooLarge(f"constraint too large: the grammar of {self.variable} "
                                     f"grows past llguidance's limits ({reason})")

    def mask(self, state: llguidance.LLMatcher) -> TokenMask:
        last = self._last
        if last is not None and last[0] is state:
            return last[1]
        state.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if state.is_error():
            if state.get_error().startswith("NoExtension"):    # no byte can follow
                raise UnsatisfiableConstraint(f"no text continues {self.variable} under its grammar")
            self._check_size(state)
            raise ConstraintError(f"the grammar of {self.variable} failed: {state.get_error()}")
        np.bitwise_and(self._bitmask, self._end_clear, out=self._bitmask)
        mask = TokenMask.of_bits(self._bitmask, self.size)
        if not mask.count and not state.is_accepting():
            raise UnsatisfiableConstraint(f"no token of the vocabulary continues {self.variable} "
                                          "under its grammar, and the value is not complete")
        self._last = (state, mask)
        return mask


def grammar_lark(grammar: Grammar) -> str:
    """`grammar` in llguidance's Lark syntax, with lmq's settings."""
    return _LARK_HEADER + to_lark(grammar)


def lark_of(grammar: Grammar | str, owner: str) -> str:
    """`grammar_lark` of a grammar or of GBNF text, through the grammar cache on disk
    (text not found there is parsed and checked first; `owner` names it in errors)."""
    if isinstance(grammar, Grammar):
        return grammar_cache.cached("lark", grammar.text, lambda: grammar_lark(grammar))
    return grammar_cache.cached("lark", grammar, lambda: grammar_lark(parse_gbnf(grammar, owner=owner)))


def _compiled_matcher(text: str, vocabulary: Vocabulary, variable: str,
                      lark: Callable[[], str]) -> llguidance.LLMatcher:
    """The template matcher of GBNF `text` (`lark()`: its llguidance form), compiled
    once per (grammar, vocabulary)."""
    tokenizer = lltokenizer(vocabulary)

    def compile_matcher() -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(lark()),
                                       log_level=0)
        if matcher.is_error():
            raise ConstraintError(f"the grammar of {variable} cannot be compiled: {matcher.get_error()}")
        return matcher

    cache = vocabulary_cache(vocabulary)
    return cache.recent(cache.matchers, text, compile_matcher, MATCHERS_SIZE)
