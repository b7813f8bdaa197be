"""Constraint streams: a GENERATE with an lmq `constraint` program is one whole hole.

The hole is decoded on the server by the in-process decoder itself (`Decoder.decode_hole`:
masks, end-token hiding, fast-forward of forced text, stops, budget), so a hole gives the
same tokens through the server as in process. The decoder runs on a thread of its own and
sees a `BatchedSequence`: each time it asks for the logits after new tokens, the request
joins the model's next multi-sequence step and the thread waits for its row.

Elements: each token is sent once the decoder has moved past it (forced tokens with
log-probability 0: under the constraint they are certain); the last element carries
`finish_reason` and the lmq extension `hole` = {finish: "end"|"stop"|"length",
value_bytes, logprob}, the decoder's own account of the value, so a client needs no
stop-phrase logic of its own. A decoder error (unsatisfiable constraint, context full)
is an error element with `error_type`, the lmq error class name.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor
from typing import Any, Callable

import numpy as np

from lmq.backends.base import Backend, Sequence
from lmq.backends.sampling_settings import SamplingSettings
from lmq.constraints.hole_plan import HoleOutput, HolePlan, plan_from_program
from lmq.errors import ContextLimitError, LmqError, ModelError
from lmq.runtime.decoders import DECODERS, Decoder
from lmq.serve.protocol import Generate, ProtocolError
from lmq.serve.streams import Owner, Stream

_CANCEL = object()


class _Cancelled(Exception):
    """Raised inside the decoding thread when its stream was cancelled."""


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
    def __init__(self, owner: Owner, request: Generate, backend: Backend, executor: Executor):
        if request.logit_bias or request.allow is not None or request.deny:
            raise ProtocolError("GENERATE: a constraint program cannot be combined with "
                                "logit_bias or mask")
        super().__init__(owner, request.stream_id, request.prompt,
                         min(request.max_tokens, backend.context_size - len(request.prompt)))
        self.program = request.constraint
        self.plan: HolePlan | None = None         # compiled ahead (`lmq.serve.compiling`)
        self.decoder = _decoder(request)
        self.backend = backend
        self.executor = executor
        self.emitted = 0                          # tokens of the hole sent so far
        self._rows: queue.SimpleQueue = queue.SimpleQueue()       # → the decoding thread
        self._requests: queue.SimpleQueue = queue.SimpleQueue()   # ← token lists, None when done
        self._lock = threading.Lock()
        self._started = False

    def step(self, row: np.ndarray) -> list[dict[str, Any]]:
        """Hand the row to the decoding thread (it sends its own elements)."""
        if not self._started:
            self._started = True
            self.executor.submit(self._decode, row.copy())
        else:
            self._rows.put(row.copy())
        return []

    def request(self) -> list[int] | None:
        return None if self.finished else self._requests.get()

    def cancelled(self) -> dict[str, Any]:
        with self._lock:
            self._rows.put(_CANCEL)
            return super().cancelled()

    def failed(self, message: str, error_type: str | None = None) -> dict[str, Any]:
        with self._lock:
            self._rows.put(_CANCEL)
            return super().failed(message, error_type)

    # --- the decoding thread ------------------------------------------------------------------

    def _decode(self, first_row: np.ndarray) -> None:
        sequence = BatchedSequence(self, first_row)
        try:
            plan = self.plan or plan_from_program(self.program, self.backend.vocabulary)
            output = self.decoder.decode_hole(sequence, self.prompt, plan, self.backend,
                                              len(self.prompt) + self.new_tokens)
            self._send(self._final(output), last=True)
        except _Cancelled:
            pass
        except LmqError as e:
            made = e.result[0] if isinstance(e, ContextLimitError) and e.result else []
            self._send(self._unsent(made) + [{"stream_id": self.stream_id, "error": str(e),
                                              "error_type": type(e).__name__}], last=True)
        except Exception as e:        # a server fault ends this stream, never the server
            self._send([{"stream_id": self.stream_id,
                         "error": f"internal server error: {e!r}"}], last=True)
        finally:
            self._requests.put(None)

    def _send(self, elements: list[dict[str, Any]], last: bool = False) -> None:
        with self._lock:
            if self.finished:
                return
            if last:
                self.finished = True
            self.owner.deliver(elements)

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


class BatchedSequence(Sequence):
    """The decoding thread's cache slot, as the decoder sees it: every evaluation is a
    request to the model's batching loop, answered with a copy of the row."""

    def __init__(self, stream: HoleStream, first_row: np.ndarray):
        super().__init__()
        self.stream = stream
        self._first: np.ndarray | None = first_row
        self.tokens = list(stream.prompt)

    def logits(self, tokens: list[int]) -> np.ndarray:
        if self._first is not None and tokens == self.tokens:
            row, self._first = self._first, None
            return row
        if tokens[:len(self.tokens)] != self.tokens or len(tokens) == len(self.tokens):
            raise ModelError("a server hole can only extend its tokens")
        new = tokens[len(self.tokens):]
        self.stream._send([self.stream.element(t, 0.0) for t in new])     # forced tokens
        return self._evaluate(new)

    def advance(self, token: int) -> np.ndarray:
        self.stream._send([self.stream.chosen(token)])
        return self._evaluate([token])

    def _evaluate(self, tokens: list[int]) -> np.ndarray:
        self._first = None
        self.tokens.extend(tokens)
        self.stream._requests.put(tokens)
        row = self.stream._rows.get()
        if row is _CANCEL:
            raise _Cancelled
        return row

    def fork(self) -> Sequence:
        raise ModelError("a server hole cannot fork")

    def release(self) -> None:
        pass
