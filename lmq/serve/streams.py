"""Server streams: what one GENERATE or SCORE does with each logits row it is given.

The scheduler owns the model and hands every active stream the row after its newest
token; the stream answers with one TOKEN element and the token to evaluate next (or
finishes). A GENERATE stream applies, in this order, `logit_bias`, the hard `mask`, the
constraint program's automaton mask and the hiding of end tokens while the constraint's
minimum is not met; then the sampling knobs pick a token, and stop phrases, the budget
and end tokens decide whether the stream ends. The per-token rules (stop detection,
log-probability under the masked row) are the in-process decoder's own functions, so a
hole gives the same tokens through the server as in process.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from lmq.backends.base import Sequence, Vocabulary
from lmq.runtime.decoders import _find_stop, _logsumexp
from lmq.runtime.hole import HolePlan, StopRule
from lmq.runtime.sampling import Sampler
from lmq.serve.protocol import Constraint, Generate, ProtocolError, Score


class Owner(Protocol):
    """Where a stream's elements go (a client connection)."""

    def deliver(self, elements: list[dict[str, Any]]) -> None: ...


class Stream:
    """One request's token stream on a model."""

    def __init__(self, owner: Owner, stream_id: int, prompt: list[int], new_tokens: int):
        self.owner = owner
        self.stream_id = stream_id
        self.prompt = prompt
        self.new_tokens = new_tokens          # most tokens this stream may add after its prompt
        self.sequence: Sequence | None = None
        self.next_token: int | None = None    # the token to evaluate next; None once finished
        self.finished = False

    @property
    def reservation(self) -> int:
        """Cache cells this stream may occupy at most."""
        return len(self.prompt) + self.new_tokens

    def step(self, row: np.ndarray) -> dict[str, Any]:
        """The element for the row after the newest token; sets `next_token`/`finished`."""
        raise NotImplementedError

    def finish(self, element: dict[str, Any], reason: str) -> dict[str, Any]:
        element["finish_reason"] = reason
        self.finished = True
        self.next_token = None
        return element

    def cancelled(self) -> dict[str, Any]:
        self.finished = True
        return {"stream_id": self.stream_id, "finish_reason": "cancelled"}

    def failed(self, message: str) -> dict[str, Any]:
        self.finished = True
        return {"stream_id": self.stream_id, "error": message}


def plan_of(constraint: Constraint) -> HolePlan:
    """The hole plan a constraint program describes."""
    if constraint.grammar is not None:
        raise ProtocolError("GENERATE constraint: grammar programs need the constraint engine, "
                            "which this server does not have yet")
    stops = tuple(StopRule(phrase.encode("utf-8"), keep) for phrase, keep in constraint.stops)
    return HolePlan("constraint", min_tokens=constraint.min_tokens,
                    max_tokens=constraint.max_tokens, stops=stops)


class GenerateStream(Stream):
    def __init__(self, owner: Owner, request: Generate, vocabulary: Vocabulary, context_size: int):
        plan = plan_of(request.constraint) if request.constraint else None
        budget = request.max_tokens
        if plan is not None and plan.max_tokens is not None:
            budget = min(budget, plan.max_tokens)
        super().__init__(owner, request.stream_id, request.prompt,
                         min(budget, context_size - len(request.prompt)))
        self.plan = plan
        self.top_logprobs = request.top_logprobs
        self.bias = _bias_row(request, vocabulary.size)
        self.sampler = Sampler(request.sampling, np.random.default_rng(request.seed))
        self.ends = vocabulary.end_ids
        self.end_list = np.fromiter(vocabulary.end_ids, dtype=np.int64)
        self.table = vocabulary.token_bytes
        automaton = plan.automaton if plan else None
        self.automaton = automaton
        self.state = automaton.initial() if automaton is not None else None
        self.generated: list[int] = []
        self.value = bytearray()

    def step(self, row: np.ndarray) -> dict[str, Any]:
        row = self._masked(row)
        token = self.sampler.pick(row, self.prompt[-64:] + self.generated[-64:])
        if row[token] == -np.inf:
            return self.failed(f"no token satisfies the constraint after {bytes(self.value)!r}")
        total = _logsumexp(row)
        element = {"stream_id": self.stream_id, "token": token,
                   "logprob": float(row[token]) - total, "finish_reason": None,
                   "top_logprobs": self._top(row, token, total)}
        if token in self.ends:
            return self.finish(element, "stop")
        self.generated.append(token)
        start = len(self.value)
        self.value += self.table[token]
        plan = self.plan
        if plan is not None:
            if self.automaton is not None:
                self.state = self.automaton.advance(self.state, token)
            if plan.stops and len(self.generated) >= plan.min_tokens \
                    and _find_stop(self.value, plan, start) is not None:
                return self.finish(element, "stop")
        if len(self.generated) >= self.new_tokens:
            return self.finish(element, "length")
        self.next_token = token
        return element

    def _masked(self, row: np.ndarray) -> np.ndarray:
        """The row with the request's bias, the constraint's mask and hidden end tokens
        (a copy: the backend's row is never written)."""
        plan = self.plan
        mask = self.automaton.mask(self.state) if self.automaton is not None else None
        may_end = plan is None or (len(self.generated) >= plan.min_tokens and
                                   (self.automaton is None or self.automaton.accepts(self.state)))
        if self.bias is None and mask is None and may_end:
            return row
        out = row + self.bias if self.bias is not None else row.copy()
        if mask is not None:
            out += mask
        if not may_end:
            out[self.end_list] = -np.inf
        return out

    def _top(self, row: np.ndarray, token: int, total: float) -> dict[str, float]:
        """The chosen token and the k most likely ones, as id-string → log-probability."""
        k = self.top_logprobs
        best = [int(row.argmax())] if k == 1 else \
            (np.argpartition(-row, k - 1)[:k].tolist() if k > 1 else [])
        return {str(t): float(row[t]) - total for t in {token, *best}}


class ScoreStream(Stream):
    """SCORE: the log-probability of each scored token after the prompt and the ones
    before it (the scored tokens are fed in turn; the last one is never evaluated)."""

    def __init__(self, owner: Owner, request: Score):
        super().__init__(owner, request.stream_id, request.prompt, len(request.scored) - 1)
        self.scored = request.scored
        self.position = 0

    def step(self, row: np.ndarray) -> dict[str, Any]:
        token = self.scored[self.position]
        element = {"stream_id": self.stream_id, "token": token,
                   "logprob": float(row[token]) - _logsumexp(row), "finish_reason": None}
        self.position += 1
        if self.position == len(self.scored):
            return self.finish(element, "stop")
        self.next_token = token
        return element


def _bias_row(request: Generate, size: int) -> np.ndarray | None:
    """One float32 row holding `logit_bias` and the hard mask (None when neither)."""
    if not request.logit_bias and request.allow is None and not request.deny:
        return None
    row = np.zeros(size, dtype=np.float32)
    if request.allow is not None:
        row[:] = -np.inf
        row[request.allow] = 0.0
    if request.deny:
        row[request.deny] = -np.inf
    for token, bias in request.logit_bias.items():
        row[token] += bias
    return row
