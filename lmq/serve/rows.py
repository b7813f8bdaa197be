"""LOGITS (an lmq extension): logits rows of sequences a client holds on the server.

Search decoders (beam, best_k), `distribution` and `model.score` decide across branches
or read whole rows, so an lmq client runs them itself, as in process, on sequences it
holds on the server: each is a slot of the model's pool, named by a handle the client
chose, kept (with its cache cells) until the client releases it or goes away. One
LOGITS request forks (`llama_memory_seq_cp`: cells shared, nothing evaluated), releases,
then evaluates: `reset` steps bring a sequence to exactly their tokens (a new handle
takes the most recently freed slot, with the cells it kept), the other steps append,
all in one `advance_many`, just as the in-process scheduler batches them. The answer is
one binary frame, `ROWS {"stream_id", "rows", "width"}\\n` then the rows as
little-endian float32, in step order (an error is a TOKEN error element on the stream).

Requests run on the model's worker thread between two batching steps; held slots'
cells count against the cache shared with the streams (`ModelWorker.held`). A request
that finds no free slot or no room for its steps beside the active streams waits (tried
again after each step) until they leave some; with no stream active it is an error.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Protocol

import numpy as np

from lmq.backends.base import Sequence
from lmq.errors import LmqError, ModelError
from lmq.serve.protocol import Logits, ProtocolError
from lmq.serve.scheduler import ModelWorker


class RowsOwner(Protocol):
    """Where answers go (a client connection)."""

    def deliver(self, elements: list[dict[str, Any]]) -> None: ...

    def deliver_frame(self, frame: bytes) -> None: ...


class HeldSequences:
    """One connection's held sequences, per model worker. The handle tables are read and
    written on the worker thread only."""

    def __init__(self, owner: RowsOwner):
        self.owner = owner
        self.handles: dict[ModelWorker, dict[int, Sequence]] = {}
        self.closed = False               # the client went away: waiting requests are dropped

    def submit(self, request: Logits, worker: ModelWorker) -> None:
        """Check the request's token ids and queue it on the worker (event loop side)."""
        size = worker.backend.vocabulary.size
        bad = next((t for t in request.token_ids() if not 0 <= t < size), None)
        if bad is not None:
            raise ProtocolError(f"token id {bad} is out of range (the vocabulary has {size} tokens)")
        handles = self.handles.setdefault(worker, {})
        worker.call(lambda: self._answer(request, worker, handles))

    def release_all(self) -> None:
        """The client went away: every held slot goes back to its pool."""
        self.closed = True
        for worker, handles in self.handles.items():
            worker.call(lambda worker=worker, handles=handles: _release(worker, handles, list(handles)))
        self.handles.clear()

    def _answer(self, request: Logits, worker: ModelWorker, handles: dict[int, Sequence]) -> bool:
        """Answer the request; False (nothing done) while the active streams leave it no
        free slot or no room for its steps: the worker tries again after its next step."""
        if self.closed:
            return True
        try:
            if worker.active and not _fits(request, worker, handles):
                return False
            rows = _evaluate(request, worker, handles)
        except LmqError as e:
            self.owner.deliver([{"stream_id": request.stream_id, "error": str(e),
                                 "error_type": type(e).__name__}])
            return True
        except Exception as e:           # a server fault answers the request, never the loop
            print(f"lmq serve-model: internal error on a LOGITS request: {e!r}", file=sys.stderr, flush=True)
            self.owner.deliver([{"stream_id": request.stream_id,
                                 "error": f"internal server error: {type(e).__name__}"}])
            return True
        self.owner.deliver_frame(rows_frame(request.stream_id, rows, worker.backend.vocabulary.size))
        return True


def rows_frame(stream_id: int, rows: list[np.ndarray], width: int) -> bytes:
    """The binary ROWS answer."""
    header = json.dumps({"stream_id": stream_id, "rows": len(rows), "width": width})
    body = np.stack(rows).astype("<f4", copy=False).tobytes() if rows else b""
    return b"ROWS " + header.encode() + b"\n" + body


def _evaluate(request: Logits, worker: ModelWorker, handles: dict[int, Sequence]) -> list[np.ndarray]:
    for parent, child in request.forks:
        source = _held(handles, parent)
        if child in handles:
            raise ProtocolError(f"LOGITS: sequence {child} is held already")
        slot = _take_slot(worker)
        slot.copy_from(source)                      # shares the cells: no room needed
        handles[child] = slot
    _release(worker, handles, request.releases)
    rows: list[np.ndarray | None] = [None] * len(request.steps)
    appends = []
    for index, step in enumerate(request.steps):
        if not step.reset:
            appends.append((index, _held(handles, step.sequence), step.tokens))
            continue
        rows[index] = _reset(worker, handles, step.sequence, step.tokens)
    if appends:
        _make_room(worker, sum(len(tokens) for _, _, tokens in appends), None)
        evaluated = worker.backend.advance_many([(slot, tokens) for _, slot, tokens in appends])
        for (index, _, _), row in zip(appends, evaluated):
            rows[index] = row
    return rows


def _reset(worker: ModelWorker, handles: dict[int, Sequence], handle: int, tokens: list[int]) -> np.ndarray:
    """Bring a sequence (a new one: the most recently freed slot) to exactly `tokens`; a
    new slot goes back to the pool if that fails."""
    slot = handles.get(handle)
    new = slot is None
    if new:
        slot = _take_slot(worker)
    try:
        _make_room(worker, len(tokens) - len(slot.tokens), slot)
        row = np.array(slot.logits(tokens))
    except Exception:
        if new:
            worker.held.discard(slot)
            worker.idle.append(slot)
        raise
    handles[handle] = slot
    return row


def _fits(request: Logits, worker: ModelWorker, handles: dict[int, Sequence]) -> bool:
    """Whether the pool has the slots the request takes (one per fork and per new
    sequence) and the cache the cells its steps add (a new sequence counted whole), once
    its releases are done."""
    parents = {child: handles.get(parent) for parent, child in request.forks}
    released = [handles[h] for h in set(request.releases) if h in handles]
    new = {step.sequence for step in request.steps
           if step.reset and step.sequence not in handles and step.sequence not in parents}
    if len(parents) + len(new) > len(worker.idle) + len(released):
        return False
    cells = -sum(len(slot.tokens) for slot in released)
    for step in request.steps:
        held = handles.get(step.sequence) or parents.get(step.sequence)
        before = len(held.tokens) if held is not None and step.reset else 0
        cells += len(step.tokens) - before
    return cells <= 0 or worker.make_room(cells)


def _held(handles: dict[int, Sequence], handle: int) -> Sequence:
    slot = handles.get(handle)
    if slot is None:
        raise ProtocolError(f"LOGITS: no sequence {handle} is held (a new one starts with a reset step)")
    return slot


def _take_slot(worker: ModelWorker) -> Sequence:
    """The most recently freed idle slot, now held: llama.cpp's own order in process, so
    the same requests reuse the same cached prefixes and get the in-process rows exactly."""
    if not worker.idle:
        raise ModelError(f"all {worker.slots} sequences of the server are in use (its --slots)")
    slot = worker.idle.pop()
    worker.held.add(slot)
    return slot


def _make_room(worker: ModelWorker, cells: int, keep: Sequence | None) -> None:
    if cells > 0 and not worker.make_room(cells, keep=keep):
        raise ModelError(f"the server's cache has no room for {cells} more tokens now (the "
                         f"{worker.backend.context_size} cells are held by other streams)")


def _release(worker: ModelWorker, handles: dict[int, Sequence], released: list[int]) -> None:
    """Held slots back to the pool, their cells kept for a later prefix (unknown handles:
    nothing to do)."""
    for handle in released:
        slot = handles.pop(handle, None)
        if slot is not None:
            worker.held.discard(slot)
            worker.idle.append(slot)
