"""Continuous batching of every stream on one model.

A `ModelWorker` owns one backend and a pool of its sequences (cache slots), and runs a
loop on its own thread: admit waiting streams (each onto the idle slot whose cached
tokens share the longest prefix with its prompt, so a repeated prompt is not evaluated
again), then advance every active stream by one token in one multi-sequence batch
(`Backend.advance_many`), then hand each connection the elements of that step. A stream
joins at the next step and leaves when it ends; a cancelled stream (CANCEL, or its client
went away) frees its slot at the next step.

The slots share one cache of `context_size` cells (llama.cpp's unified KV cache): a stream
is admitted only when its prompt plus its token budget fits beside the active streams;
idle slots give their cached tokens back when the room is needed.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmq.backends.base import Backend, Sequence, common_prefix
from lmq.errors import LmqError
from lmq.serve.streams import Owner, Stream


class ModelWorker:
    """The batching loop of one served model."""

    def __init__(self, model_id: str, backend: Backend, slots: int):
        self.model_id = model_id
        self.backend = backend
        self.slots = slots
        self.idle: list[Sequence] = [backend.sequence() for _ in range(slots)]   # most recent last
        self.active: list[Stream] = []
        self.waiting: deque[Stream] = deque()
        self.generated_tokens = 0
        self.executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="lmq-hole")
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"lmq-model {model_id}", daemon=True)
        self._thread.start()

    # --- called from the server's event loop ---------------------------------------------

    def submit(self, stream: Stream) -> None:
        self._commands.put(("submit", stream))

    def cancel(self, owner: Owner, stream_id: int | None = None) -> None:
        """Cancel one stream of `owner`, or all of them (stream_id None: it disconnected)."""
        self._commands.put(("cancel", owner, stream_id))

    def stop(self, timeout: float = 5.0) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout)
        self.executor.shutdown(wait=False)

    def stats(self) -> dict[str, Any]:
        return {"slots": self.slots, "busy_slots": self.slots - len(self.idle),
                "active_streams": len(self.active), "waiting_streams": len(self.waiting),
                "generated_tokens": self.generated_tokens}

    # --- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            out: dict[Owner, list[dict[str, Any]]] = {}
            if not self._take_commands(out, block=not self.active and not self.waiting):
                self._end_all("the server is shutting down", out)
                _send(out)
                return
            self._admit(out)
            if self.active:
                self._advance(out)
            _send(out)

    def _take_commands(self, out: dict, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on stop."""
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command[0] == "stop":
                return False
            if command[0] == "submit":
                self.waiting.append(command[1])
            else:
                self._cancel(command[1], command[2], out)

    def _cancel(self, owner: Owner, stream_id: int | None, out: dict) -> None:
        def matches(stream: Stream) -> bool:
            return stream.owner is owner and (stream_id is None or stream.stream_id == stream_id)

        for stream in [s for s in self.waiting if matches(s)]:
            self.waiting.remove(stream)
            out.setdefault(owner, []).append(stream.cancelled())
        for stream in [s for s in self.active if matches(s)]:
            out.setdefault(owner, []).append(stream.cancelled())
            self._retire(stream)

    def _admit(self, out: dict) -> None:
        while self.waiting and self.idle:
            stream = self.waiting[0]
            slot = self._slot_for(stream)
            if slot is None:
                return
            self.waiting.popleft()
            self.idle.remove(slot)
            stream.sequence = slot
            self.active.append(stream)
            try:
                elements = stream.step(slot.logits(stream.prompt))
            except Exception as e:          # one stream's failure never stops the loop
                elements = [stream.failed(_describe(e))]
            self._record(stream, elements, out)

    def _slot_for(self, stream: Stream) -> Sequence | None:
        """The idle slot sharing the longest prefix with the stream's prompt, once the
        stream fits in the cache (idle slots give up their tokens as needed); None while
        the active streams leave no room."""
        slot = max(reversed(self.idle), key=lambda s: common_prefix(s.tokens, stream.prompt))
        room = self.backend.context_size - sum(s.reservation for s in self.active)
        others = sorted((s for s in self.idle if s is not slot and len(s.tokens) > 1),
                        key=lambda s: len(s.tokens))
        while stream.reservation + sum(len(s.tokens) for s in others) > room:
            if not others:
                return None
            victim = others.pop()
            victim.logits(victim.tokens[:1])     # the protocol's way to drop all but one token
        return slot

    def _advance(self, out: dict) -> None:
        steps = []
        for stream in list(self.active):
            tokens = stream.request()
            if tokens is None:               # it finished on its own (a hole's thread)
                self._retire(stream)
            else:
                steps.append((stream, tokens))
        if not steps:
            return
        try:
            rows = self.backend.advance_many([(s.sequence, tokens) for s, tokens in steps])
        except Exception as e:
            for stream, _ in steps:
                self._record(stream, [stream.failed(_describe(e))], out)
            return
        self.generated_tokens += sum(len(tokens) for _, tokens in steps)
        for (stream, _), row in zip(steps, rows):
            try:
                elements = stream.step(row)
            except Exception as e:
                elements = [stream.failed(_describe(e))]
            self._record(stream, elements, out)

    def _record(self, stream: Stream, elements: list[dict[str, Any]], out: dict) -> None:
        if elements:
            out.setdefault(stream.owner, []).extend(elements)
        if stream.finished and stream in self.active:
            self._retire(stream)

    def _retire(self, stream: Stream) -> None:
        self.active.remove(stream)
        self.idle.append(stream.sequence)
        stream.sequence = None

    def _end_all(self, message: str, out: dict) -> None:
        for stream in [*self.waiting, *self.active]:
            out.setdefault(stream.owner, []).append(stream.failed(message))
        self.waiting.clear()
        self.active.clear()


def _describe(error: Exception) -> str:
    """An error answer's text: lmq errors say what is wrong; anything else is a server fault."""
    return str(error) if isinstance(error, LmqError) else f"internal server error: {error!r}"


def _send(out: dict[Owner, list[dict[str, Any]]]) -> None:
    for owner, elements in out.items():
        owner.deliver(elements)
