"""Decoders: how a hole's tokens are chosen from the (masked) logits.

`Decoder.decode_hole` is the per-token loop shared by every decoder: ask the sequence
for logits, apply the hole automaton's mask, hide end tokens while the value may not end,
pick a token (`_pick`, the one thing a decoder changes), check stops and the budget.
Branching decoders (sample with n>1, beam, best_k) come with their own issue and plug in
as further entries of `DECODERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from lmq.backends.base import Sequence, Vocabulary
from lmq.errors import ContextLimitError, QueryArgumentError, UnsatisfiableConstraint
from lmq.runtime.hole import HolePlan

#: arguments every decoder accepts (llama.cpp sampling knobs under their llama.cpp names)
COMMON_ARGUMENTS = frozenset({"max_len", "seed", "n", "temperature", "top_k", "top_p", "min_p",
                              "typical_p", "repeat_penalty", "frequency_penalty",
                              "presence_penalty", "mirostat", "mirostat_tau", "mirostat_eta"})
ALIASES = {"repetition_penalty": "repeat_penalty"}


@dataclass
class HoleOutput:
    tokens: list[int]          # every generated token (the last may overshoot a stop)
    value: bytes               # the value's bytes, stop overshoot removed
    finish: str                # "end" (end token), "stop" (stop phrase), "length" (budget)
    logprob: float             # model log-probability of the generated tokens


class Decoder:
    """Greedy decoding: the highest-scoring allowed token. Base of the other decoders."""

    name = "argmax"
    arguments = COMMON_ARGUMENTS

    def __init__(self, **settings: Any):
        settings = {ALIASES.get(k, k): v for k, v in settings.items()}
        unknown = sorted(set(settings) - self.arguments)
        if unknown:
            raise QueryArgumentError(f"unknown argument{'s' if len(unknown) > 1 else ''} of decoder "
                                     f"{self.name}: {', '.join(unknown)}")
        if settings.get("n", 1) != 1:
            raise QueryArgumentError(f"decoder {self.name} with n={settings['n']}: several results "
                                     "need the branching decoders, not available in this version")
        self.settings = settings
        self.max_len: int | None = settings.get("max_len")
        self._buffer: np.ndarray | None = None

    def _pick(self, row: np.ndarray) -> int:
        return int(row.argmax())

    def decode_hole(self, sequence: Sequence, context: list[int], plan: HolePlan,
                    vocabulary: Vocabulary, max_len: int,
                    on_text: Callable[[bytes], None] | None = None) -> HoleOutput:
        """Generate one hole's value after `context` (the prompt tokens so far)."""
        ends = vocabulary.end_ids
        end_list = np.fromiter(ends, dtype=np.int64)
        table = vocabulary.token_bytes
        automaton = plan.automaton
        state = automaton.initial() if automaton is not None else None
        tokens: list[int] = []
        value = bytearray()
        logprob = 0.0
        if plan.max_tokens == 0:
            return HoleOutput(tokens, b"", "length", 0.0)
        row = sequence.logits(context)
        while True:
            may_end = len(tokens) >= plan.min_tokens and (automaton is None or automaton.accepts(state))
            mask = automaton.mask(state) if automaton is not None else None
            if mask is not None or not may_end:
                row = self._masked(row, mask, None if may_end else end_list)
            token = self._pick(row)
            if row[token] == -np.inf:
                raise UnsatisfiableConstraint(f"no token can continue {plan.name} after "
                                              f"{bytes(value)!r}")
            logprob += float(row[token]) - _logsumexp(row)
            if token in ends:
                return HoleOutput(tokens, bytes(value), "end", logprob)
            tokens.append(token)
            start = len(value)
            value += table[token]
            if automaton is not None:
                state = automaton.advance(state, token)
            if plan.stops and len(tokens) >= plan.min_tokens:
                cut = _find_stop(value, plan, start)
                if cut is not None:
                    if on_text and cut > start:
                        on_text(bytes(value[start:cut]))
                    return HoleOutput(tokens, bytes(value[:cut]), "stop", logprob)
            if on_text:
                on_text(table[token])
            if plan.max_tokens is not None and len(tokens) >= plan.max_tokens:
                return HoleOutput(tokens, bytes(value), "length", logprob)
            if len(context) + len(tokens) >= max_len:
                raise ContextLimitError(f"max_len of {max_len} tokens reached while generating "
                                        f"{plan.name}", result=(tokens, bytes(value)))
            row = sequence.advance(token)

    def _masked(self, row: np.ndarray, mask: np.ndarray | None, hidden: np.ndarray | None) -> np.ndarray:
        """A copy of `row` with the mask added and `hidden` ids at -inf (the row itself,
        owned by the backend, is never written)."""
        if self._buffer is None or self._buffer.shape != row.shape:
            self._buffer = np.empty_like(row)
        buffer = self._buffer
        if mask is None:
            np.copyto(buffer, row)
        else:
            np.add(row, mask, out=buffer)
        if hidden is not None:
            buffer[hidden] = -np.inf
        return buffer


def _logsumexp(row: np.ndarray) -> float:
    top = float(row.max())
    return top + float(np.log(np.exp(row - top).sum()))


def _find_stop(value: bytearray, plan: HolePlan, start: int) -> int | None:
    """Where the value ends if a stop phrase ends inside the newest token (bytes from
    `start` on): an occurrence completed earlier, while a minimum token count held the
    stop back, does not fire. The earliest occurrence wins; STOPS_AT keeps the phrase,
    STOPS_BEFORE drops it."""
    best: tuple[int, int] | None = None
    for rule in plan.stops:
        position = value.find(rule.phrase, max(0, start - len(rule.phrase) + 1))
        if position >= 0 and (best is None or position < best[0]):
            best = (position, position + len(rule.phrase) if rule.keep else position)
    return None if best is None else best[1]


DECODERS: dict[str, type[Decoder]] = {"argmax": Decoder}
PLANNED = ("sample", "beam", "beam_search", "best_k", "beam_var", "var")


def make_decoder(name: str, settings: dict[str, Any]) -> Decoder:
    """The decoder called `name` with its keyword arguments, validated."""
    cls = DECODERS.get(name.lower())
    if cls is None:
        if name.lower() in PLANNED:
            raise QueryArgumentError(f"decoder {name} is not available in this version of lmq "
                                     f"(available: {', '.join(DECODERS)})")
        raise QueryArgumentError(f"unknown decoder {name!r} (available: {', '.join(DECODERS)})")
    return cls(**settings)
