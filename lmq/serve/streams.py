"""Server streams: what one GENERATE or SCORE does with each logits row it is given.

The scheduler owns the model and hands every active stream the row after its newest
tokens; the stream answers with its TOKEN elements and the tokens to evaluate next.
An LMQL-style GENERATE adds `logit_bias` and the hard `mask` to the row and lets the
sampling knobs pick; SCORE reads off the log-probability of each scored token. A GENERATE
with a `constraint` program is a whole hole: see `lmq.serve.holes`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from lmq.backends.base import Sequence, Vocabulary
from lmq.constraints.token_choice import log_normalizer
from lmq.runtime.sampling import Sampler
from lmq.serve.protocol import Generate, Score


class Owner(Protocol):
    """Where a stream's elements go (a client connection)."""

    def deliver(self, elements: list[dict[str, Any]]) -> None: ...


class Stream:
    """One request's token stream on a model. The scheduler evaluates `prompt`, then
    alternates: `step(row)` with the row after the newest tokens (→ the elements to send),
    `request()` for the tokens to evaluate next (None once the stream is finished)."""

    def __init__(self, owner: Owner, stream_id: int, prompt: list[int], new_tokens: int):
        self.owner = owner
        self.stream_id = stream_id
        self.prompt = prompt
        self.new_tokens = new_tokens          # most tokens this stream may add after its prompt
        self.sequence: Sequence | None = None
        self.next_tokens: list[int] | None = None
        self.resume_tokens: list[int] | None = None   # a preempted stream's tokens to evaluate again
        self.admission = 0                    # when the scheduler first admitted it (its seniority)
        self.finished = False

    def step(self, row: np.ndarray) -> list[dict[str, Any]]:
        raise NotImplementedError

    def request(self) -> list[int] | None:
        tokens, self.next_tokens = self.next_tokens, None
        return None if self.finished else tokens

    def finish(self, element: dict[str, Any], reason: str) -> dict[str, Any]:
        element["finish_reason"] = reason
        self.finished = True
        return element

    def cancelled(self) -> dict[str, Any]:
        self.finished = True
        return {"stream_id": self.stream_id, "finish_reason": "cancelled"}

    def failed(self, message: str, error_type: str | None = None) -> dict[str, Any]:
        self.finished = True
        element = {"stream_id": self.stream_id, "error": message}
        if error_type:
            element["error_type"] = error_type
        return element


class GenerateStream(Stream):
    """GENERATE as LMQL speaks it: bias, hard mask, sampling knobs, top log-probabilities."""

    def __init__(self, owner: Owner, request: Generate, vocabulary: Vocabulary, context_size: int):
        super().__init__(owner, request.stream_id, request.prompt,
                         min(request.max_tokens, context_size - len(request.prompt)))
        self.top_logprobs = request.top_logprobs
        self.bias = _bias_row(request, vocabulary.size)
        self.sampler = Sampler(request.sampling, np.random.default_rng(request.seed))
        self.ends = vocabulary.end_ids
        self.generated: list[int] = []

    def step(self, row: np.ndarray) -> list[dict[str, Any]]:
        if self.bias is not None:
            row = row + self.bias
        token = self.sampler.pick(row, self.prompt[-64:] + self.generated[-64:])
        if row[token] == -np.inf:
            return [self.failed("the mask allows no token")]
        total = log_normalizer(row)
        element = {"stream_id": self.stream_id, "token": token,
                   "logprob": float(row[token]) - total, "finish_reason": None,
                   "top_logprobs": self._top(row, token, total)}
        if token in self.ends:
            return [self.finish(element, "stop")]
        self.generated.append(token)
        if len(self.generated) >= self.new_tokens:
            return [self.finish(element, "length")]
        self.next_tokens = [token]
        return [element]

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

    def step(self, row: np.ndarray) -> list[dict[str, Any]]:
        token = self.scored[self.position]
        element = {"stream_id": self.stream_id, "token": token,
                   "logprob": float(row[token]) - log_normalizer(row), "finish_reason": None}
        self.position += 1
        if self.position == len(self.scored):
            return [self.finish(element, "stop")]
        self.next_tokens = [token]
        return [element]


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
