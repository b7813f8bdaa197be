"""Continuous batching of every stream on one model.

A `ModelWorker` owns one backend and a pool of its sequences (cache slots), and runs a
loop on its own thread: admit waiting streams (each onto the idle slot whose cached
tokens share the longest prefix with its prompt, so a repeated prompt is not evaluated
again), then advance every active stream by one token in one multi-sequence batch
(`Backend.advance_many`), then hand each connection the elements of that step (one TOKEN
frame per connection and step). A stream joins at the next step: its slot is cut back to
the shared prefix (`Sequence.truncate`) and the rest of its prompt is evaluated in that
step's batch, so admitting eight streams costs one decode, not eight. It leaves when it
ends; a cancelled stream (CANCEL, or its client
went away) frees its slot at the next step.

The slots share one cache of `context_size` cells (llama.cpp's unified KV cache), and a
stream holds only the cells it uses (its prompt and the tokens so far), not its budget: a
hole's budget is the whole remaining context, so reserving it would decode one stream at a
time. A stream is admitted when its prompt plus `GROWTH_RESERVE` cells fits beside the
active streams (idle slots give their cached tokens back first). When a step would not fit
(the streams grew), the most recently admitted streams are preempted until it does: the
slot's cells are freed and the stream keeps its tokens; preempted streams are resumed
(oldest first) before any new stream is admitted: their tokens are evaluated anew and each
gets the very row it was waiting for, so its output is unchanged. The oldest stream is
never preempted (alone it fits: its budget is bounded by the context), so every stream
finishes.

Fairness: waiting streams are queued per owner (connection), and admission takes the head
of each owner's queue in turn, so a client with many queued streams does not make another
wait behind all of them.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable, Container, Iterator

from lmq.backends.base import Backend, Sequence, common_prefix
from lmq.errors import LmqError
from lmq.serve.streams import Owner, Stream

if TYPE_CHECKING:
    from lmq.serve.compiling import ConstraintCompiler


#: cells a stream must find free beyond its prompt to be admitted (room to grow a while
#: before a preemption could be needed)
GROWTH_RESERVE = 16


class FairQueue:
    """Waiting streams, one queue per owner; `pop` takes the head of each owner's queue
    in turn (round robin), so no owner waits behind another's many streams."""

    def __init__(self) -> None:
        self._owners: OrderedDict[Owner, deque[Stream]] = OrderedDict()   # next in turn first
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Stream]:
        return (stream for queued in list(self._owners.values()) for stream in list(queued))

    def push(self, stream: Stream) -> None:
        self._owners.setdefault(stream.owner, deque()).append(stream)
        self.count += 1

    def peek(self) -> Stream:
        return next(iter(self._owners.values()))[0]

    def pop(self, busy: Container[Owner] = ()) -> Stream | None:
        """The head of the next owner's queue in turn, passing over `busy` owners (None
        when only they wait)."""
        owner = next((o for o in self._owners if o not in busy), None)
        if owner is None:
            return None
        queued = self._owners[owner]
        self.count -= 1
        stream = queued.popleft()
        if queued:
            self._owners.move_to_end(owner)
        else:
            del self._owners[owner]
        return stream

    def remove(self, owner: Owner, matches: Callable[[Stream], bool]) -> list[Stream]:
        """Take out the owner's streams that match."""
        queued = self._owners.get(owner, deque())
        removed = [s for s in queued if matches(s)]
        for stream in removed:
            queued.remove(stream)
        self.count -= len(removed)
        if not queued:
            self._owners.pop(owner, None)
        return removed

    def clear(self) -> None:
        self._owners.clear()
        self.count = 0


class ModelWorker:
    """The batching loop of one served model."""

    def __init__(self, model_id: str, backend: Backend, slots: int,
                 compiler: "ConstraintCompiler | None" = None):
        """`compiler`: where holes go before they wait for a slot (else a hole compiles
        its constraint when it starts decoding)."""
        self.model_id = model_id
        self.compiler = compiler
        self.backend = backend
        self.slots = slots
        self.idle: list[Sequence] = [backend.sequence() for _ in range(slots)]   # most recent last
        self.active: list[Stream] = []
        self.waiting = FairQueue()
        self.preempted: deque[Stream] = deque()    # resumed before any new stream starts
        self._joining: set[Stream] = set()    # admitted, their prompts in the next step (not generated)
        self.held: set[Sequence] = set()      # slots clients hold between requests (LOGITS)
        self.generated_tokens = 0
        self.batch_width = 0                  # streams decoded in the latest step
        self.max_batch_width = 0              # the most streams decoded in one step so far
        self.preemptions = 0
        self.admissions = 0
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"lmq-model {model_id}", daemon=True)
        self._thread.start()

    # --- called from the server's event loop ---------------------------------------------

    def submit(self, stream: Stream) -> None:
        if self.compiler is not None:
            self.compiler.submit(stream, self._queue)
        else:
            self._queue(stream)

    def _queue(self, stream: Stream) -> None:
        self._commands.put(("submit", stream))

    def cancel(self, owner: Owner, stream_id: int | None = None) -> None:
        """Cancel one stream of `owner`, or all of them (stream_id None: it disconnected)."""
        if self.compiler is not None:
            self.compiler.cancel(owner, stream_id)
        self._commands.put(("cancel", owner, stream_id))

    def call(self, function: Callable[[], bool | None]) -> None:
        """Run `function` on the worker thread between two steps (it may use the backend
        and the slots; it answers its client itself); again after the next step while it
        returns False (it waits for the active streams to leave room)."""
        self._commands.put(("call", function))

    def stop(self, timeout: float = 5.0) -> None:
        if self.compiler is not None:
            self.compiler.stop()
        self._commands.put(("stop",))
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"slots": self.slots, "busy_slots": self.slots - len(self.idle),
                "active_streams": len(self.active), "waiting_streams": len(self.waiting) + len(self.preempted),
                "generated_tokens": self.generated_tokens, "batch_width": self.batch_width,
                "max_batch_width": self.max_batch_width, "preemptions": self.preemptions,
                "held_sequences": len(self.held),
                **(self.compiler.stats() if self.compiler is not None else {})}

    # --- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            out: dict[Owner, list[dict[str, Any]]] = {}
            if not self._take_commands(out, block=not self.active and not self.waiting and not self.preempted):
                self._end_all("the server is shutting down", out)
                _send(out)
                return
            self._admit(out)
            if self.active:
                self._advance(out)
            _send(out)

    def _take_commands(self, out: dict, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on stop. A call that
        returns False is tried again after the next step."""
        deferred = []
        while True:
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                for command in deferred:
                    self._commands.put(command)
                return True
            block = False
            if command[0] == "stop":
                return False
            if command[0] == "submit":
                self.waiting.push(command[1])
            elif command[0] == "call":
                if command[1]() is False:
                    deferred.append(command)
            else:
                self._cancel(command[1], command[2], out)

    def _cancel(self, owner: Owner, stream_id: int | None, out: dict) -> None:
        def matches(stream: Stream) -> bool:
            return stream.owner is owner and (stream_id is None or stream.stream_id == stream_id)

        for stream in [s for s in self.preempted if matches(s)]:
            self.preempted.remove(stream)
            out.setdefault(owner, []).append(stream.cancelled())
        for stream in self.waiting.remove(owner, matches):
            out.setdefault(owner, []).append(stream.cancelled())
        for stream in [s for s in self.active if matches(s)]:
            out.setdefault(owner, []).append(stream.cancelled())
            self._retire(stream)

    def _admit(self, out: dict) -> None:
        """While a slot and room are free: resume preempted streams, then admit waiting
        ones in turn across owners."""
        while (self.preempted or self.waiting) and self.idle:
            stream = self.preempted[0] if self.preempted else self.waiting.peek()
            tokens = stream.resume_tokens or stream.prompt
            slot = self._slot_for(tokens, stream.new_tokens)
            if slot is None:
                return
            if self.preempted:
                self.preempted.popleft()
            else:
                self.waiting.pop()
            self.idle.remove(slot)
            stream.sequence = slot
            if stream.resume_tokens is None:
                self.admissions += 1
                stream.admission = self.admissions
            stream.resume_tokens = None
            self.active.append(stream)
            kept = min(common_prefix(slot.tokens, tokens), len(tokens) - 1)
            if slot.truncate(kept):          # the rest joins the next step's batch
                stream.next_tokens = tokens[kept:]
                self._joining.add(stream)
                continue
            try:
                elements = stream.step(slot.logits(tokens))
            except Exception as e:          # one stream's failure never stops the loop
                elements = [stream.failed(_describe(e))]
            self._record(stream, elements, out)

    def _slot_for(self, tokens: list[int], new_tokens: int) -> Sequence | None:
        """The idle slot sharing the longest prefix with `tokens`, once they and a little
        room to grow fit beside the active streams (idle slots give up their cached tokens
        as needed); None while the active streams leave no room."""
        slot = max(reversed(self.idle), key=lambda s: common_prefix(s.tokens, tokens))
        fits = self.make_room(len(tokens) + min(new_tokens, GROWTH_RESERVE), keep=slot)
        return slot if fits or not self.active else None     # alone, a stream always goes

    def make_room(self, cells: int, keep: Sequence | None = None) -> bool:
        """Whether `cells` more fit in the cache beside the active streams and the held
        slots, once idle slots but `keep` give up their cached tokens as needed."""
        room = self.backend.context_size - self.used_cells() - cells
        return room >= 0 and self._free_idle(room, keep=keep)

    def used_cells(self) -> int:
        """Cells of the active streams (with the tokens they wait to have evaluated) and
        of the slots clients hold."""
        return (sum(len(s.sequence.tokens) + len(s.next_tokens or ()) for s in self.active)
                + sum(len(s.tokens) for s in self.held))

    def _free_idle(self, room: int, keep: Sequence | None = None) -> bool:
        """Drop idle slots' cached tokens (the longest first) until the idle slots but
        `keep` hold at most `room` cells; False if they cannot."""
        others = [s for s in self.idle if s is not keep]
        cached = sorted((s for s in others if len(s.tokens) > 1), key=lambda s: len(s.tokens))
        while sum(len(s.tokens) for s in others) > room and cached:
            _drop_cells(cached.pop())
        return sum(len(s.tokens) for s in others) <= room

    def _preempt(self, steps: list[tuple[Stream, list[int]]]) -> None:
        """Free the cache until this step fits: idle slots' cached tokens first, then the
        most recently admitted streams (to resume, oldest first, from the very tokens
        they hold)."""
        def active_need() -> int:
            return sum(len(s.sequence.tokens) + len(tokens) for s, tokens in steps)
        context = self.backend.context_size - sum(len(s.tokens) for s in self.held)
        if active_need() + sum(len(s.tokens) for s in self.idle) <= context:
            return
        self._free_idle(context - active_need())
        while active_need() + sum(len(s.tokens) for s in self.idle) > context and len(steps) > 1:
            stream, tokens = max(steps, key=lambda step: step[0].admission)
            steps.remove((stream, tokens))
            slot = stream.sequence
            stream.resume_tokens = slot.tokens + tokens
            self.active.remove(stream)
            _drop_cells(slot)
            self.idle.append(slot)
            stream.sequence = None
            self.preempted.appendleft(stream)
            self.preemptions += 1

    def _advance(self, out: dict) -> None:
        steps = []
        for stream in list(self.active):
            tokens = stream.request()
            if tokens is None:               # it finished
                self._retire(stream)
            else:
                steps.append((stream, tokens))
        self._preempt(steps)
        joining, self._joining = self._joining, set()
        if not steps:
            return
        self.batch_width = len(steps)
        self.max_batch_width = max(self.max_batch_width, len(steps))
        try:
            rows = self.backend.advance_many([(s.sequence, tokens) for s, tokens in steps])
        except Exception as e:
            for stream, _ in steps:
                self._record(stream, [stream.failed(_describe(e))], out)
            return
        self.generated_tokens += sum(len(tokens) for s, tokens in steps if s not in joining)
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
        for stream in [*self.preempted, *self.waiting, *self.active]:
            out.setdefault(stream.owner, []).append(stream.failed(message))
        self.preempted.clear()
        self.waiting.clear()
        self.active.clear()


def _drop_cells(slot: Sequence) -> None:
    """Free a slot's cells: the protocol's way is to keep one token only."""
    if not slot.truncate(1):
        slot.logits(slot.tokens[:1])


def _describe(error: Exception) -> str:
    """An error answer's text: lmq errors say what is wrong; anything else is a server fault."""
    return str(error) if isinstance(error, LmqError) else f"internal server error: {error!r}"


def _send(out: dict[Owner, list[dict[str, Any]]]) -> None:
    for owner, elements in out.items():
        owner.deliver(elements)
