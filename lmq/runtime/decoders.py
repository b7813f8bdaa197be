"""Decoders: how a hole's tokens are chosen from the (masked) logits.

`Decoder.decode` is the per-token loop shared by every decoder (`decode_hole` runs it
synchronously on a bare sequence): ask for logits, apply the hole automaton's mask, hide end tokens while the value may not end,
pick a token (`_pick`, the one thing a decoder changes), check stops and the budget.
The loop is a coroutine: it awaits its logits from a scheduler `Lane`
(runtime/scheduler.py), so every running branch and query advances in one batch. The
decoders of runtime/branching.py (sample, beam, best_k; n>1) register in `DECODERS`.
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Callable, Hashable, cast

import numpy as np

from lmq.backends.base import Backend, Sequence
from lmq.backends.sampling_settings import KNOB_ALIASES, SamplingSettings
from lmq.constraints.hole_plan import HoleOutput, HolePlan, find_stop
from lmq.constraints.token_automaton import BudgetedTokenAutomaton, TokenAutomaton
from lmq.constraints.token_choice import candidates, choose, log_normalizer
from lmq.constraints.token_masks import TokenMask
from lmq.errors import ContextLimitError, QueryArgumentError, UnsatisfiableConstraint
from lmq.runtime.sampling import DrawAhead
from lmq.runtime.scheduler import DirectLane, Lane, run_ready

if TYPE_CHECKING:
    from lmq.runtime.trace import Tracer

#: arguments of the decoder itself, besides the sampling knobs
DECODER_ARGUMENTS = frozenset({"max_len", "seed", "n"})
#: arguments every decoder accepts: its own plus every `SamplingSettings` knob (under
#: llama.cpp's names; LMQL's spellings are `KNOB_ALIASES`)
COMMON_ARGUMENTS = DECODER_ARGUMENTS | SamplingSettings.names()
#: how many of the most likely tokens a grammar hole tries for its last budgeted token
FINAL_CANDIDATES = 256
#: the most results (branches, beams) one query may ask for: llama.cpp's own limit on the
#: sequences of one context (LLAMA_MAX_SEQ), past which branches could not share a batch
MAX_N = 256


class Decoder:
    """Greedy decoding: the highest-scoring allowed token. Base of the other decoders."""

    name = "argmax"
    arguments = COMMON_ARGUMENTS
    distribution_norm = "sum"        # how a `distribution` clause aggregates token scores
    tracer: "Tracer | None" = None   # runtime/trace.py: set while the call is traced
    #: whether a model server may decode a hole whole (`generate_hole`): only where a
    #: hole depends on one branch alone; search decoders decide across branches, and n
    #: branches decode here in one batch (as in process, so with the same rows) on rows
    #: the server computes
    whole_holes_remote = True
    #: whether forced text is evaluated with a guess of the next choice (speculative
    #: evaluation, on backends that `speculate`; `LMQ_NO_SPECULATION=1` turns it off):
    #: only for decoders whose choice never waits for other branches, as the guess's
    #: rows are used after the step that made them
    speculates = True

    def __init__(self, **settings: Any):
        settings = {KNOB_ALIASES.get(k, k): v for k, v in settings.items()}
        unknown = sorted(set(settings) - self.arguments)
        if unknown:
            raise QueryArgumentError(f"unknown argument{'s' if len(unknown) > 1 else ''} of decoder "
                                     f"{self.name}: {', '.join(unknown)}")
        n = settings.get("n", 1)
        if not _is_int(n) or not 1 <= n <= MAX_N:
            raise QueryArgumentError(f"decoder {self.name}: n must be an int from 1 to {MAX_N}, "
                                     f"not {n!r}")
        max_len = settings.get("max_len")
        if max_len is not None and (not _is_int(max_len) or max_len < 1):
            raise QueryArgumentError(f"decoder {self.name}: max_len must be an int >= 1, not {max_len!r}")
        seed = settings.get("seed")
        if seed is not None and (not _is_int(seed) or seed < -1):
            raise QueryArgumentError(f"decoder {self.name}: seed must be an int >= 0, or -1 for a "
                                     f"random seed, not {seed!r}")
        if seed == -1:                  # llama.cpp's spelling of "a fresh random seed"
            settings["seed"] = None
        SamplingSettings.of(settings)   # the knobs' types and ranges, for every decoder
        self.n = n
        self.branch_index = 0           # which branch of a run with several results
        self.settings = settings
        self.max_len: int | None = max_len
        self._buffer: np.ndarray | None = None

    def branch(self, index: int) -> "Decoder":
        """This decoder for branch `index` of a run with several results (own state)."""
        child = copy.copy(self)
        child.branch_index = index
        child._buffer = None
        if self.tracer is not None:
            child.tracer = self.tracer.for_branch(index)
        return child

    def _pick(self, row: np.ndarray, ids: np.ndarray | None) -> int:
        """The index of the chosen entry of a candidate row (-inf entries are not allowed);
        `ids` are the entries' token ids when the row is a gathered subset."""
        return int(row.argmax())

    async def _select(self, row: np.ndarray, mask: TokenMask | None, hidden: np.ndarray | None,
                      end_list: np.ndarray) -> tuple[int, float | Callable[[], float]]:
        """The per-token choice: the token and its log-probability, or a function giving
        it (called once the next decode is under way); search decoders override it to
        decide across branches."""
        return self._choose_later(row, mask, hidden, end_list)

    def decode_hole(self, sequence: Sequence, context: list[int], plan: HolePlan,
                    backend: Backend, max_len: int,
                    on_text: Callable[[bytes], None] | None = None) -> HoleOutput:
        """`decode` on a bare sequence, synchronously (no scheduler, one sequence)."""
        return run_ready(self.decode(DirectLane(sequence), context, plan, backend, max_len, on_text))

    async def decode(self, lane: Lane, context: list[int], plan: HolePlan,
                     backend: Backend, max_len: int,
                     on_text: Callable[[bytes], None] | None = None) -> HoleOutput:
        """Generate one hole's value after `context` (the prompt tokens so far)."""
        if len(context) > max_len:
            limit = f"max_len={max_len}" if self.max_len == max_len else \
                f"the model's context of {max_len} tokens"
            raise ContextLimitError(f"the prompt before {plan.name} is {len(context)} tokens, "
                                    f"{len(context) - max_len} more than {limit}",
                                    result=([], b""))
        remote = getattr(backend, "generate_hole", None)
        if remote is not None and (not backend.returns_rows or self.whole_holes_remote and self.n == 1):
            return await remote(context, plan, max_len, self, on_text)
        speculate = self._speculates(lane, backend)
        try:
            return await self._decode_tokens(lane, context, plan, backend, max_len, on_text, speculate)
        finally:
            if speculate and lane.guessed:  # guesses past the hole's end leave the cache
                lane.drop_guesses()

    def _speculates(self, lane: Lane, backend: Backend) -> bool:
        """Whether this hole evaluates forced text with a guess of what follows."""
        return (self.speculates and backend.speculates and lane.speculates and not lane.replaying
                and not os.environ.get("LMQ_NO_SPECULATION"))

    async def _decode_tokens(self, lane: Lane, context: list[int], plan: HolePlan,
                             backend: Backend, max_len: int,
                             on_text: Callable[[bytes], None] | None, speculate: bool) -> HoleOutput:
        """The per-token loop. Each evaluation carries the chosen token, the forced text
        after it (fast-forward) and, when `speculate`, a guess of the token after that
        (the canonical tokenization's last token, which fast-forward holds back) with its
        row kept: where the decoder's own choice on that row equals the guess, the next
        row is ready without another evaluation; otherwise the guess leaves the cache."""
        vocabulary = backend.vocabulary
        ends = vocabulary.end_ids
        end_list = np.fromiter(sorted(ends), dtype=np.int64)
        table = vocabulary.token_bytes
        automaton = plan.automaton
        state = automaton.initial() if automaton is not None else None
        tokens: list[int] = []
        value = bytearray()
        logprob = 0.0
        score: float | Callable[[], float] = 0.0     # the last choice's, added once it is sent
        tracer = self.tracer
        if plan.max_tokens == 0:
            return HoleOutput(tokens, b"", "length", 0.0)
        chosen: list[int] = []          # the chosen token, not evaluated yet
        guesses: list[int] = []         # evaluated past the current position, not checked yet
        ahead: list[np.ndarray] = []    # the rows after the checked guesses, in order
        pending: Any = None
        while True:
            mask = None
            if not guesses:
                forced, guess = [], []
                if automaton is not None:
                    forced, guess = self._forced_tokens(automaton, state, backend, plan, len(tokens),
                                                        max_len - len(context), speculate)
                if forced:
                    start = len(value)
                    for token in forced:
                        if tracer is not None:
                            tracer.forced(automaton, state, plan, len(tokens), token)
                        state = automaton.advance(state, token)
                        tokens.append(token)
                        value += table[token]
                    cut = (find_stop(value, plan, start)
                           if plan.stops and plan.may_end_at(len(tokens)) else None)
                    if on_text:
                        on_text(bytes(value[start:cut]))
                    if cut is not None:
                        return HoleOutput(tokens, bytes(value[:cut]), "stop", logprob + _value(score))
                    if automaton.complete(state) and plan.may_end_at(len(tokens)):
                        return HoleOutput(tokens, bytes(value), "end", logprob + _value(score))
                if guess and not backend.wrong_guesses_cheap:
                    mask = _sole_token_mask(automaton, state, plan, len(tokens))
                    if mask is None:
                        guess = []
                if pending is None:
                    pending = lane.logits(context + tokens + guess, len(guess) + 1)
                    guesses = guess
                elif chosen or forced:
                    # Everything up to `await pending` runs while the engine evaluates.
                    pending = lane.advance(chosen + forced + guess,
                                           self._draw_ahead(plan, automaton, len(tokens), end_list,
                                                            max_len - len(context)),
                                           len(guess) + 1)
                    guesses, ahead = guess, []
            logprob += _value(score)
            count = len(tokens)
            if automaton is not None and mask is None and not _mask_needs_row(automaton, plan, count):
                mask = _step_mask(automaton, state, plan, count, None)
            may_end = plan.may_end_at(count) and (automaton is None or automaton.accepts(state))
            if ahead:
                row = ahead.pop(0)
            else:
                row = await pending
                if guesses:
                    row, ahead = row[0], row[1:]
            if automaton is not None and mask is None:
                mask = _step_mask(automaton, state, plan, count, row)
            token, score = await self._select(row, mask, None if may_end else end_list, end_list)
            if token < 0:
                raise UnsatisfiableConstraint(f"no token can continue {plan.name} after "
                                              f"{bytes(value)!r}" + (" within its token budget"
                                                                     if plan.counts_tokens else ""))
            if tracer is not None:
                score = _value(score)
                tracer.token(plan.name, row, mask, None if may_end else end_list, end_list, token, score)
            if guesses and token == guesses[0]:
                del guesses[0]              # evaluated already: its row is `ahead`'s first
                lane.accept_guess()
                chosen = []
            else:
                if guesses:
                    lane.drop_guesses()
                    guesses, ahead = [], []
                chosen = [token]
            if token in ends:
                return HoleOutput(tokens, bytes(value), "end", logprob + _value(score))
            tokens.append(token)
            start = len(value)
            value += table[token]
            if automaton is not None:
                state = automaton.advance(state, token)
                if automaton.complete(state) and plan.may_end_at(len(tokens)):
                    if on_text:                 # nothing can follow: end without a decode
                        on_text(table[token])
                    return HoleOutput(tokens, bytes(value), "end", logprob + _value(score))
            if plan.stops and plan.may_end_at(len(tokens)):
                cut = find_stop(value, plan, start)
                if cut is not None:
                    if on_text and cut > start:
                        on_text(bytes(value[start:cut]))
                    return HoleOutput(tokens, bytes(value[:cut]), "stop", logprob + _value(score))
            if on_text:
                on_text(table[token])
            if plan.max_tokens is not None and len(tokens) >= plan.max_tokens:
                return HoleOutput(tokens, bytes(value), "length", logprob + _value(score))
            if len(context) + len(tokens) >= max_len:
                raise ContextLimitError(f"max_len of {max_len} tokens reached while generating "
                                        f"{plan.name}", result=(tokens, bytes(value)))

    def _choose(self, row: np.ndarray, mask: TokenMask | None, hidden: np.ndarray | None,
                end_list: np.ndarray) -> tuple[int, float]:
        """(token, its log-probability under the masked distribution), or (-1, 0) when
        nothing is allowed."""
        token, score = self._choose_later(row, mask, hidden, end_list)
        return token, score()

    def _choose_later(self, row: np.ndarray, mask: TokenMask | None, hidden: np.ndarray | None,
                      end_list: np.ndarray) -> tuple[int, Callable[[], float]]:
        """(token, a function giving its log-probability under the masked distribution),
        or (-1, …) when nothing is allowed. The candidates are the mask's tokens (every
        token without one) and the end tokens unless they are `hidden`
        (lmq/constraints/token_choice.py). A decoder taking the best candidate has
        `choose` pick it and its normalizer (summed at once by the kernel, else by numpy
        when the function is called, while the engine evaluates the token); the others
        pick among the candidates' scores in a reused row (the backend's row is never
        written: the next decode rewrites it)."""
        allow = end_list if hidden is None else None
        if self.picks_best:
            return choose(row, mask, allow, hidden)
        if mask is None:
            index = self._pick_hiding(row, hidden)
            if index is not None:
                if index < 0:
                    return -1, _nothing
                chosen, known = float(row[index]), self._known_normalizer()
                return index, lambda: chosen - known
        values, ids = candidates(row, mask, allow, hidden, self._scratch(row))
        if not len(values):
            return -1, _nothing
        index = self._pick(values, ids)
        chosen = float(values[index])
        if chosen == -np.inf:
            return -1, _nothing
        token = int(ids[index]) if ids is not None else index
        known = self._known_normalizer()
        if known is not None:
            return token, lambda: chosen - known
        return token, lambda: chosen - log_normalizer(values)

    def _draw_ahead(self, plan: HolePlan, automaton, count: int, end_list: np.ndarray,
                    room: int) -> DrawAhead | None:
        """The next token's draw for the scheduler to make on the row it hands out, where
        this decoder's choice needs nothing but the row (`count` tokens of the value so
        far, `room` the most the context leaves it); else None."""
        return None

    def _pick_hiding(self, row: np.ndarray, hidden: np.ndarray | None) -> int | None:
        """The chosen entry of `row` with the `hidden` entries left out (-1: none left),
        where the decoder can pick so without a copy of the row and knows the normalizer
        afterwards (`_known_normalizer`); else None."""
        return None

    #: whether the decoder takes the best candidate (`choose`), not `_pick`'s choice
    picks_best = True

    def _known_normalizer(self) -> float | None:
        """log Σ exp(candidates) where `_pick` has summed it already, else None."""
        return None

    def _scratch(self, row: np.ndarray) -> np.ndarray:
        if self._buffer is None or self._buffer.shape != row.shape:
            self._buffer = np.empty_like(row)
        return self._buffer

    @staticmethod
    def _forced_tokens(automaton: TokenAutomaton, state: Hashable, backend: Backend,
                       plan: HolePlan, count: int, room: int,
                       speculate: bool) -> tuple[list[int], list[int]]:
        """Fast-forward: the canonical tokens of the text every value must continue with,
        the last one held back (a longer token may span into what follows), within the
        token budget (one token left for the end) and the context; and, when `speculate`,
        the held-back one as the guess of the next choice, where that choice would be
        evaluated (not the budget's last token, room in the context, a value that goes on)."""
        text = _whole_characters(automaton.forced(state))
        if not text:
            return [], []           # mid-character: the mask forces the rest byte-exactly
        tokens = backend.tokenize(text)
        if backend.detokenize(tokens) != text.encode("utf-8"):
            return [], []           # this tokenizer does not reproduce the text on its own
        limit = len(tokens) - 1
        if plan.max_tokens is not None:
            limit = min(limit, plan.max_tokens - count - 1)
        forced = _within_budget(automaton, state, tokens[:max(0, min(limit, room - count - 1))],
                                plan, count)
        after = count + len(tokens)              # tokens once the guess is chosen
        if (not speculate or len(forced) < len(tokens) - 1 or after >= room
                or plan.max_tokens is not None and after >= plan.max_tokens):
            return forced, []
        if plan.may_end_at(after):
            if not automaton.exact_budget:
                state = automaton.fork(state)   # grammar states change as they advance
            for token in tokens:
                state = automaton.advance(state, token)
            if automaton.complete(state):
                return forced, []       # the guess would end the value: no row after it
        return forced, tokens[-1:]


def _within_budget(automaton: TokenAutomaton, state: Hashable, tokens: list[int], plan: HolePlan,
                   count: int) -> list[int]:
    """The longest prefix of forced `tokens` after which a value can still end within the
    token budget (canonical tokens may take more than the budget leaves; the masks then
    find a shorter tokenization)."""
    if not tokens or not automaton.exact_budget or (not plan.counts_tokens
                                                    and automaton.strands_nothing):
        return tokens
    can_finish = cast(BudgetedTokenAutomaton, automaton).can_finish
    states = []
    for token in tokens:
        state = automaton.advance(state, token)
        states.append(state)
    while tokens and not can_finish(states[len(tokens) - 1], plan.remaining(count + len(tokens))):
        tokens = tokens[:-1]
    return tokens


def _whole_characters(forced: bytes) -> str:
    """The forced bytes up to the first one that is not part of a whole UTF-8 character:
    "" when they start with continuation bytes (the last token ended inside a character;
    text tokenization would drop them), an incomplete last character left out."""
    try:
        return forced.decode("utf-8")
    except UnicodeDecodeError as e:
        return forced[:e.start].decode("utf-8")



def _nothing() -> float:
    return 0.0


def _value(score: float | Callable[[], float]) -> float:
    """A score `_select` gave: a number, or a function computing it."""
    return score() if callable(score) else score


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _step_mask(automaton: TokenAutomaton, state: Hashable, plan: HolePlan, count: int,
               row: np.ndarray | None) -> TokenMask:
    """The state's mask within the token budget. A DFA keeps exactly the tokens after
    which some value still ends at a count the budget allows (`budget_mask`: never a dead
    end while a value fits; also without a budget where a plain mask could strand it);
    a grammar's last budgeted token must complete it."""
    if not plan.counts_tokens and automaton.strands_nothing:
        return automaton.mask(state)
    if automaton.exact_budget:
        return cast(BudgetedTokenAutomaton, automaton).budget_mask(state, plan.remaining(count))
    if plan.max_tokens is not None and count + 1 == plan.max_tokens:
        return _final_mask(automaton, state, row)
    return automaton.mask(state)


def _mask_needs_row(automaton: TokenAutomaton, plan: HolePlan, count: int) -> bool:
    """Only a grammar's last budgeted token needs the logits row for its mask (every
    other mask is computed while the engine evaluates the previous token)."""
    return (not automaton.exact_budget and plan.max_tokens is not None
            and count + 1 == plan.max_tokens)


def _sole_token_mask(automaton: TokenAutomaton, state: Hashable, plan: HolePlan,
                     count: int) -> TokenMask | None:
    """The state's mask where it allows one token alone (nor may the value end there),
    else None: a guess of that token cannot be wrong."""
    if _mask_needs_row(automaton, plan, count) or plan.may_end_at(count) and automaton.accepts(state):
        return None
    mask = _step_mask(automaton, state, plan, count, None)
    return mask if mask.count == 1 else None


def _final_mask(automaton: TokenAutomaton, state: Hashable, row: np.ndarray) -> TokenMask:
    """The mask of a grammar's last budgeted token: only tokens that complete a value.
    The `FINAL_CANDIDATES` most likely allowed tokens are tried one by one on a copy of
    the parser state (sound; a completing token ranked lower is not found, and the hole
    then fails loudly)."""
    allowed = automaton.mask(state).allowed
    ranked = allowed[np.argsort(-row[allowed], kind="stable")[:FINAL_CANDIDATES]]
    completing = [t for t in ranked.tolist()
                  if automaton.accepts(automaton.advance(automaton.fork(state), t))]
    return TokenMask.of(np.array(sorted(completing), dtype=np.int32), len(row))


DECODERS: dict[str, type[Decoder]] = {"argmax": Decoder}
PLANNED = ("beam_var", "var")


def make_decoder(name: str, settings: dict[str, Any]) -> Decoder:
    """The decoder called `name` with its keyword arguments, validated."""
    cls = DECODERS.get(name.lower())
    if cls is None:
        if name.lower() in PLANNED:
            raise QueryArgumentError(f"decoder {name} is not available in this version of lmq "
                                     f"(available: {', '.join(DECODERS)})")
        raise QueryArgumentError(f"unknown decoder {name!r} (available: {', '.join(DECODERS)})")
    return cls(**settings)
