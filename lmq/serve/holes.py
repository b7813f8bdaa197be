"""Constraint streams: a GENERATE with an lmq `constraint` program is one whole hole.

The hole is decoded on the server by the in-process decoder itself (`Decoder.decode_hole`:
masks, end-token hiding, fast-forward of forced text, stops, budget), so a hole gives the
same tokens through the server as in process. The decoding coroutine (`Decoder.decode`) is
stepped by the model's batching loop itself, on its own thread: it sees a `LoopLane`, and
each time it awaits the logits after new tokens it yields those tokens to the loop, which
evaluates them in its next multi-sequence step and sends the row back in. No thread per
hole, no hand-off per token, no copy of the row (the decoder is done with it before the
loop's next step).

Elements: each token is sent once the decoder has moved past it (forced tokens with
log-probability 0: under the constraint they are certain); the last element carries
`finish_reason` and the lmq extension `hole` = {finish: "end"|"stop"|"length",
value_bytes, logprob}, the decoder's own account of the value, so a client needs no
stop-phrase logic of its own. A decoder error (unsatisfiable constraint, context full)
is an error element with `error_type`, the lmq error class name.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from lmq.backends.base import Backend
from lmq.backends.sampling_settings import SamplingSettings
from lmq.constraints.hole_plan import HoleOutput, HolePlan, plan_from_program
from lmq.errors import ContextLimitError, LmqError, ModelError
from lmq.runtime.decoders import DECODERS, Decoder
from lmq.runtime.sampling import DrawAhead
from lmq.serve.protocol import Generate, ProtocolError
from lmq.serve.streams import Owner, Stream


class _RecordingChoices:
    """Decoder mixin: keeps the last token the decoder chose with its log-probability
    under the masked distribution, for that token's element."""

    choice: tuple[int, float] | None = None

    def _choose_later(self, *args: Any) -> tuple[int, Callable[[], float]]:
        token, score = super()._choose_later(*args)
        logprob = score()
        self.choice = (token, logprob)
        return token, lambda: logprob


def _decoder(request: Generate) -> Decoder:
    name = "argmax" if request.sampling.greedy else "sample"
    cls = DECODERS.get(name)
    if cls is None:
        raise ProtocolError(f"GENERATE constraint: decoder {name} is not available on this server")
    neutral = SamplingSettings()
    knobs = {} if name == "argmax" else {k: v for k, v in vars(request.sampling).items()
                                        if v != getattr(neutral, k)}
    if request.seed is not None:
        knobs["seed"] = request.seed
    try:
        decoder = type(f"Streaming{cls.__name__}", (_RecordingChoices, cls), {})(**knobs)
    except LmqError as e:
        raise ProtocolError(f"GENERATE constraint: {e}") from None
    if request.sampler_state is not None and name == "sample":
        try:                     # the client's sampler goes on where it stopped
            decoder.sampler().restore(request.sampler_state)
        except ValueError as e:
            raise ProtocolError(f"GENERATE: field 'sampler_state': {e}") from None
    return decoder


class HoleStream(Stream):
    def __init__(self, owner: Owner, request: Generate, backend: Backend):
        if request.logit_bias or request.allow is not None or request.deny:
            raise ProtocolError("GENERATE: a constraint program cannot be combined with "
                                "logit_bias or mask")
        super().__init__(owner, request.stream_id, request.prompt,
                         min(request.max_tokens, backend.context_size - len(request.prompt)))
        self.program = request.constraint
        self.plan: HolePlan | None = None         # compiled ahead (`lmq.serve.compiling`)
        self.decoder = _decoder(request)
        self.backend = backend
        self.emitted = 0                          # tokens of the hole sent so far
        self.lane: LoopLane | None = None
        self._decoding = None                     # the decoding coroutine, once started

    def step(self, row: np.ndarray) -> list[dict[str, Any]]:
        """Run the decoder on `row` up to its next request for tokens (→ `next_tokens`);
        the elements of the tokens it moved past, and the last ones once it is done."""
        if self.lane is None:
            self.lane = LoopLane(self, row)
            row = None
        elements = self.lane.elements
        try:
            if self._decoding is None:
                plan = self.plan or plan_from_program(self.program, self.backend.vocabulary)
                self._decoding = self.decoder.decode(self.lane, self.prompt, plan, self.backend,
                                                     len(self.prompt) + self.new_tokens)
            self.next_tokens = self._decoding.send(row)
        except StopIteration as done:
            self.finished = True
            elements += self._final(done.value)
        except LmqError as e:
            self.finished = True
            made = e.result[0] if isinstance(e, ContextLimitError) and e.result else []
            elements += self._unsent(made) + [{"stream_id": self.stream_id, "error": str(e),
                                               "error_type": type(e).__name__}]
        except Exception as e:        # a server fault ends this stream, never the server
            self.finished = True
            elements.append({"stream_id": self.stream_id, "error": f"internal server error: {e!r}"})
        self.lane.elements = []
        return elements

    def cancelled(self) -> dict[str, Any]:
        self._close()
        return super().cancelled()

    def failed(self, message: str, error_type: str | None = None) -> dict[str, Any]:
        self._close()
        return super().failed(message, error_type)

    def _close(self) -> None:
        if self._decoding is not None:
            self._decoding.close()

    def element(self, token: int, logprob: float) -> dict[str, Any]:
        self.emitted += 1
        return {"stream_id": self.stream_id, "token": token, "logprob": logprob,
                "finish_reason": None, "top_logprobs": {str(token): logprob}}

    def chosen(self, token: int) -> dict[str, Any]:
        """The element of a token the decoder chose (else forced: log-probability 0)."""
        choice = self.decoder.choice
        if choice is None or choice[0] != token:
            return self.element(token, 0.0)
        self.decoder.choice = None
        return self.element(token, choice[1])

    def _unsent(self, tokens: list[int]) -> list[dict[str, Any]]:
        """Elements for the hole's tokens not sent yet: forced ones (that a stop cut), and
        the last choice."""
        remaining = tokens[self.emitted:]
        return [self.element(t, 0.0) for t in remaining[:-1]] + [self.chosen(t) for t in remaining[-1:]]

    def _final(self, output: HoleOutput) -> list[dict[str, Any]]:
        """The elements not sent yet; the last one finishes the stream."""
        elements = self._unsent(output.tokens)
        end = self.decoder.choice if output.finish == "end" else None
        if end is not None:                  # the end token is the last choice, not a value token
            elements.append(self.element(*end))
        if not elements:
            elements.append({"stream_id": self.stream_id, "token": None, "logprob": 0.0,
                             "finish_reason": None, "top_logprobs": {}})
        last = elements[-1]
        last["finish_reason"] = "length" if output.finish == "length" else "stop"
        last["hole"] = {"finish": output.finish, "value_bytes": len(output.value),
                        "logprob": output.logprob}
        if self.decoder.name == "sample":
            last["hole"]["sampler_state"] = self.decoder.sampler().state()
        return elements


class LoopLane:
    """The hole's cache slot, as its decoding coroutine sees it (a `Lane`): awaiting the
    logits after new tokens yields them to the batching loop, which sends the row back.
    The tokens the decoder moves past become elements (`elements`, taken by each step)."""

    replaying = False
    speculates = False          # the batching loop sends one row per evaluation

    def __init__(self, stream: HoleStream, first_row: np.ndarray):
        self.stream = stream
        self.tokens = list(stream.prompt)
        self.elements: list[dict[str, Any]] = []
        self._first: np.ndarray | None = first_row

    def logits(self, context: list[int], rows: int = 1) -> "_Evaluation":
        """`rows` is 1: this lane does not speculate."""
        if self._first is not None and context == self.tokens:
            row, self._first = self._first, None
            return _Evaluation(None, row)
        if context[:len(self.tokens)] != self.tokens or len(context) == len(self.tokens):
            raise ModelError("a server hole can only extend its tokens")
        new = context[len(self.tokens):]
        self.elements += [self.stream.element(t, 0.0) for t in new]      # forced tokens
        return self._evaluate(new)

    def advance(self, tokens: list[int], draw: DrawAhead | None = None, rows: int = 1) -> "_Evaluation":
        """`draw` is left to the decoder (the loop hands it the row at once); `rows` is 1."""
        self.elements += [self.stream.chosen(t) for t in tokens]
        return self._evaluate(tokens)

    def _evaluate(self, tokens: list[int]) -> "_Evaluation":
        self._first = None
        self.tokens += tokens
        return _Evaluation(tokens, None)

    def fork(self) -> "LoopLane":
        raise ModelError("a server hole cannot fork")

    def release(self) -> None:
        pass


class _Evaluation:
    """The awaitable row after `tokens`: awaiting it yields them to the batching loop
    (which sends back the row); with no tokens, the row is already here."""

    __slots__ = ("tokens", "row")

    def __init__(self, tokens: list[int] | None, row: np.ndarray | None):
        self.tokens = tokens
        self.row = row

    def __await__(self):
        if self.tokens is not None:
            self.row = yield self.tokens
        return self.row
