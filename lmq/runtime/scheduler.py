"""One owner of an in-process model: every running branch and query of an event loop
decodes through it, and each step evaluates all their new tokens in one multi-sequence
batch (`Backend.advance_many`).

Branches and concurrent queries are asyncio tasks. A task that needs logits submits a
request and awaits it; the first request of a step schedules the step with `call_soon`,
which runs after every task woken by the previous step has had its turn, so one step
carries every task that is ready. A row handed out is valid until the next step: a task
awaits the future itself (not through `gather`, whose callbacks may run after the next
step) and uses the row before it awaits anything else.

The model serves one event loop at a time (`_ModelLease`): rows are read outside any lock,
so a query of another thread (each `run_sync` is a loop of its own) waits until this
loop's last lane is released, on an executor thread so that its own loop goes on.

A `Lane` is a task's handle on a backend sequence. It gets its sequence at its first
prefill: forked from the live lane that already holds the longest prefix of its context
(the branches of one query share their prompt in the KV cache, evaluated once), else a
fresh slot (which keeps what a finished query left there).

Where the engine `decodes_async` (llama.cpp on a GPU) and every branch of a step has had
its next token drawn by the scheduler (`DrawAhead`), the scheduler starts the decode of
those tokens before the tasks wake (a `LaunchedStep`): the branches' bookkeeping then runs
while the engine works. A launched token sits in the lane's sequence as a guess until the
branch asks for exactly it; a branch that asks for anything else first drops it.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from lmq.backends.base import Backend, Sequence, common_prefix
from lmq.errors import ContextLimitError
from lmq.runtime.sampling import DrawAhead


class _Guesses:
    """A lane's speculative tokens: the last `guessed` tokens of its sequence were
    evaluated on a guess of what the decoder will choose and are not its tokens yet."""

    sequence: Sequence | None
    guessed = 0
    speculates = True           # the lane can return the rows after guessed tokens

    @property
    def tokens(self) -> list[int]:
        """The decoder's tokens: the sequence's, less unchecked guesses."""
        if self.sequence is None:
            return []
        held = self.sequence.tokens
        return held[:len(held) - self.guessed] if self.guessed else held

    def accept_guess(self) -> None:
        """The decoder chose the first unchecked guess: it is one of its tokens now."""
        self.guessed -= 1

    def drop_guesses(self) -> None:
        """Remove the unchecked guesses from the cache (the decoder chose otherwise)."""
        if self.guessed:
            length = len(self.sequence.tokens) - self.guessed
            if not self.sequence.truncate(length):
                self.sequence.logits(self.sequence.tokens[:length])
            self.guessed = 0


class LaunchedStep:
    """A decode the scheduler started before the branches asked for it: its rows, read
    (waiting for the engine) once, and the lanes that have not taken theirs yet."""

    __slots__ = ("read", "_rows", "waiting")

    def __init__(self, read: Callable[[], list]):
        self.read = read
        self._rows: list | None = None
        self.waiting: list[_Launched] = []

    def rows(self) -> list:
        if self._rows is None:
            self._rows = self.read()
        return self._rows

    def secure(self) -> None:
        """Copy the rows still waiting for their lanes: the engine's next decode rewrites them."""
        for launched in self.waiting:
            if launched.row is None:
                launched.row = np.array(self.rows()[launched.index])


class _Launched:
    """A lane's token in a `LaunchedStep` (its row once secured)."""

    __slots__ = ("token", "step", "index", "row")

    def __init__(self, token: int, step: LaunchedStep, index: int):
        self.token = token
        self.step = step
        self.index = index
        self.row: np.ndarray | None = None

    def take(self) -> np.ndarray:
        self.step.waiting.remove(self)
        return self.row if self.row is not None else self.step.rows()[self.index]


class Lane(_Guesses):
    """A branch's sequence, as the scheduler hands it out."""

    def __init__(self, scheduler: "ModelScheduler"):
        self.scheduler = scheduler
        self.sequence: Sequence | None = None
        #: set while a forked branch replays choices whose tokens the sequence holds
        self.replaying = False
        #: the token the scheduler started decoding for this lane (its last guess)
        self.launched: _Launched | None = None

    def logits(self, context: list[int], rows: int = 1) -> "asyncio.Future[Any]":
        """The row after `context` (the cache brought to exactly `context`); None while
        replaying. Several lanes' requests made before awaiting share one step. With
        `rows` > 1, the rows after each of the last `rows` tokens, of which all but the
        first are guesses (`_Guesses`)."""
        if self.replaying:
            return self.scheduler._resolved(None)
        self._drop_launched()
        return self.scheduler._request(self, list(context), prefill=True, rows=rows)

    def advance(self, tokens: list[int], draw: DrawAhead | None = None,
                rows: int = 1) -> "asyncio.Future[Any]":
        """The row after appending `tokens` (`rows` > 1: as in `logits`); None while
        replaying. A `draw` is made on the row when it comes from a step shared with
        other lanes (else the caller draws)."""
        if self.replaying:
            return self.scheduler._resolved(None)
        launched = self.launched
        if launched is not None and rows == 1 and tokens == [launched.token]:
            self.launched = None
            self.accept_guess()
            return self.scheduler._request(self, [], prefill=False, draw=draw, launched=launched)
        self._drop_launched()
        return self.scheduler._request(self, list(tokens), prefill=False, draw=draw, rows=rows)

    def drop_guesses(self) -> None:
        self._drop_launched()
        super().drop_guesses()

    def _drop_launched(self) -> None:
        """Take a launched token the branch did not ask for out of the cache (once its
        decode is done)."""
        launched, self.launched = self.launched, None
        if launched is not None:
            launched.step.waiting.remove(launched)
            launched.step.rows()
            length = len(self.sequence.tokens) - 1
            self.guessed -= 1
            if not self.sequence.truncate(length):
                self.scheduler._before_decode()
                self.sequence.logits(self.sequence.tokens[:length])

    def fork(self) -> "Lane":
        """A lane holding this one's tokens (the KV cache copied, nothing evaluated)."""
        self._drop_launched()           # the child would take a launched token for its own
        child = Lane(self.scheduler)
        if self.sequence is not None:
            child.sequence = self.sequence.fork()
            self.scheduler._lanes.add(child)
        return child

    def release(self) -> None:
        self._drop_launched()
        if self.sequence is not None:
            scheduler = self.scheduler
            scheduler._lanes.discard(self)
            self.sequence.release()
            self.sequence = None
            if not scheduler._lanes:
                scheduler._lease.give_back(scheduler.loop)
        self.guessed = 0


@dataclass
class _Request:
    lane: Lane
    tokens: list[int]
    prefill: bool
    future: asyncio.Future = field(repr=False)
    draw: DrawAhead | None = None
    rows: int = 1
    launched: _Launched | None = None


class ModelScheduler:
    """The step loop of one backend on one event loop."""

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop):
        self.backend = backend
        self._loop = weakref.ref(loop)      # the registry's key: held weakly, or never freed
        self._pending: list[_Request] = []
        self._lanes: set[Lane] = set()
        self._lease = _lease(backend)
        self._lock = self._lease.decoding
        self._in_flight: LaunchedStep | None = None    # the last launch, rows not secured
        #: steps run and sequences per step, for tests and benchmarks
        self.steps = 0
        self.batched = 0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop()

    def lane(self) -> Lane:
        return Lane(self)

    def _resolved(self, value: Any) -> asyncio.Future:
        future = self.loop.create_future()
        future.set_result(value)
        return future

    def _request(self, lane: Lane, tokens: list[int], prefill: bool, draw: DrawAhead | None = None,
                 rows: int = 1, launched: _Launched | None = None) -> asyncio.Future:
        if not prefill and launched is None and not self._pending and self._alone(lane):
            return self._advance_alone(lane, tokens, rows)
        future = self.loop.create_future()
        if not self._pending:
            self.loop.call_soon(self._step)
        self._pending.append(_Request(lane, tokens, prefill, future, draw, rows, launched))
        return future

    def _before_decode(self) -> None:
        """Keep the rows of the last launch that lanes have not taken: a decode rewrites them."""
        if self._in_flight is not None:
            self._in_flight.secure()
            self._in_flight = None

    def _alone(self, lane: Lane) -> bool:
        """Whether `lane` is the only live lane: no other branch or query can share its step."""
        return len(self._lanes) == 1 and lane in self._lanes

    def _advance_alone(self, lane: Lane, tokens: list[int], rows: int) -> "_Later":
        """One sequence's next tokens, decoded at once: the per-token path of a single query
        goes through no event-loop round trip (awaiting the result never yields), and the
        engine works while the caller prepares its next step before awaiting."""
        with self._lock:            # a full context is the sequence's own ContextLimitError
            self._before_decode()
            if len(tokens) == 1:
                row = lane.sequence.advance_later(tokens[0])
            else:
                result = self.backend.advance_many([(lane.sequence, tokens)], [rows])[0]
                row = lambda: result
            lane.guessed = rows - 1
        self.steps += 1
        self.batched += 1
        return _Later(row, self._lock)

    def _step(self) -> None:
        if not self._lanes and not self._lease.take(self.loop):
            waited = self.loop.run_in_executor(None, self._lease.wait, self.loop)
            waited.add_done_callback(lambda _: self._step())   # the requests stay pending
            return
        try:
            self._run_step()
        finally:
            if not self._lanes:
                self._lease.give_back(self.loop)

    def _run_step(self) -> None:
        pending, self._pending = self._pending, []
        live = [r for r in pending if not r.future.cancelled()]
        with self._lock:
            if any(r.launched is None for r in live):   # this step decodes: the launched
                self._before_decode()                     # rows it rewrites are copied first
            taken = [(r, r.launched.take()) for r in live if r.launched is not None]
            prefilled: dict[tuple[int, ...], tuple[Lane, np.ndarray]] = {}
            for request in live:
                if request.prefill:
                    _settle(request.future, self._prefill, request.lane, request.tokens,
                            request.rows, prefilled)
            advances = [r for r in live if not r.prefill and r.launched is None]
            ready = []
            for request in advances:
                held = len(request.lane.sequence.tokens) + len(request.tokens)
                if held > self.backend.context_size:
                    request.future.set_exception(ContextLimitError(
                        f"the context of {self.backend.context_size} tokens is full"))
                else:
                    ready.append(request)
            try:
                rows = self.backend.advance_many([(r.lane.sequence, r.tokens) for r in ready],
                                                 [r.rows for r in ready]) if ready else []
            except Exception as error:          # the engine failed: every waiter learns why
                for request in ready:
                    request.future.set_exception(error)
                ready, rows = [], []
            if ready:
                self.steps += 1
            ready = [r for r, _ in taken] + ready
            rows = [row for _, row in taken] + rows
            self.batched += len(ready)
            drawn = [(r.draw, row) for r, row in zip(ready, rows) if r.draw is not None]
            if drawn:                           # the step's draws in one kernel call
                DrawAhead.run_all(*map(list, zip(*drawn)))
            for request, row in zip(ready, rows):
                request.lane.guessed = request.rows - 1
                request.future.set_result(row)
            if self.backend.decodes_async and len(drawn) == len(ready):
                self._launch(ready)

    def _launch(self, ready: list[_Request]) -> None:
        """Start decoding the drawn tokens of branches that go on with them (each
        request's row has been drawn from, so no task reads it)."""
        ends = self.backend.vocabulary.end_ids
        going = [r for r in ready if r.draw.launch and r.draw.token >= 0 and r.draw.token not in ends
                 and len(r.lane.sequence.tokens) < self.backend.context_size]
        if not going:
            return
        self._before_decode()
        try:
            step = LaunchedStep(self.backend.advance_many_later(
                [(r.lane.sequence, [r.draw.token]) for r in going]))
        except Exception:           # the branches' own next step meets the failure and says why
            return
        for index, request in enumerate(going):
            launched = _Launched(request.draw.token, step, index)
            step.waiting.append(launched)
            request.lane.launched = launched
            request.lane.guessed += 1
        self._in_flight = step
        self.steps += 1

    def _prefill(self, lane: Lane, context: list[int], rows: int,
                 prefilled: dict[tuple[int, ...], tuple[Lane, Any]]) -> Any:
        """Bring the lane's sequence to `context`, forking the lane that holds the longest
        prefix of it when that is more than the lane's own slot holds. Branches asking for
        the same context in one step share its row: nothing is evaluated again. `rows` > 1:
        the rows after each of the last `rows` tokens."""
        key = (rows, *context)
        same = prefilled.get(key)
        if same is not None and same[0].sequence is not None and same[0].sequence.tokens == context:
            if lane.sequence is not None:
                lane.sequence.release()
            lane.sequence = same[0].sequence.fork()
            lane.guessed = rows - 1
            self._lanes.add(lane)
            return same[1]
        if lane.sequence is None:
            lane.sequence = self.backend.sequence()
        shared, donor = common_prefix(lane.sequence.tokens, context), None
        for other in self._lanes:
            if other is not lane:
                common = common_prefix(other.sequence.tokens, context)
                if common > shared:
                    shared, donor = common, other
        if donor is not None:
            lane.sequence.release()
            lane.sequence = donor.sequence.fork()
        self._lanes.add(lane)
        row = (lane.sequence.rows(context, rows) if rows > 1 else
               np.array(lane.sequence.logits(context)))
        lane.guessed = rows - 1
        prefilled[key] = (lane, row)
        return row


def _settle(future: asyncio.Future, function, *args) -> None:
    try:
        future.set_result(function(*args))
    except Exception as error:
        future.set_exception(error)


_schedulers: "weakref.WeakKeyDictionary[Backend, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()
_leases: "weakref.WeakKeyDictionary[Backend, _ModelLease]" = weakref.WeakKeyDictionary()
_registry_lock = threading.RLock()


class _ModelLease:
    """Which event loop an in-process model serves: one at a time, from its first live
    lane to its last. Rows are views of the engine's buffer that a loop's tasks read
    outside any lock, valid until the next decode: a query of another thread decoding
    meanwhile would rewrite them, so another loop's queries wait for the model (on an
    executor thread: their own loop goes on). Concurrent queries of one loop batch
    together as before. A loop closed while holding the lease (a run that died) frees it."""

    #: seconds between looks at whether the holder's loop was closed
    POLL_S = 0.5

    def __init__(self) -> None:
        self.decoding = threading.Lock()     # a decode and the reading of its rows
        self._changed = threading.Condition()
        self._holder: "weakref.ref[asyncio.AbstractEventLoop] | None" = None

    def _taken_by_another(self, loop: asyncio.AbstractEventLoop) -> bool:
        holder = self._holder() if self._holder is not None else None
        return holder is not None and holder is not loop and not holder.is_closed()

    def take(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Hold the lease for `loop`, unless another loop holds it (False)."""
        with self._changed:
            if self._taken_by_another(loop):
                return False
            self._holder = weakref.ref(loop)
            return True

    def wait(self, loop: asyncio.AbstractEventLoop) -> None:
        """Block until `loop` could take the lease."""
        with self._changed:
            while self._taken_by_another(loop):
                self._changed.wait(self.POLL_S)

    def give_back(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._changed:
            if self._holder is not None and self._holder() is loop:
                self._holder = None
                self._changed.notify_all()


def _lease(backend: Backend) -> _ModelLease:
    with _registry_lock:
        lease = _leases.get(backend)
        if lease is None:
            lease = _leases[backend] = _ModelLease()
        return lease


def scheduler_for(backend: Backend) -> ModelScheduler:
    """The scheduler of `backend` on the running event loop (made on first use)."""
    loop = asyncio.get_running_loop()
    with _registry_lock:
        per_loop = _schedulers.get(backend)
        if per_loop is None:
            per_loop = _schedulers[backend] = weakref.WeakKeyDictionary()
        scheduler = per_loop.get(loop)
        if scheduler is None:
            scheduler = per_loop[loop] = ModelScheduler(backend, loop)
        return scheduler


class DirectLane(_Guesses):
    """A lane on a bare sequence that evaluates at once (no scheduler, no event loop):
    what a synchronous caller of the decoding coroutine drives it with."""

    def __init__(self, sequence: Sequence):
        self.sequence = sequence
        self.replaying = False

    def logits(self, context: list[int], rows: int = 1) -> "_Later":
        row = self.sequence.rows(context, rows) if rows > 1 else self.sequence.logits(context)
        self.guessed = rows - 1
        return _Later(lambda: row)

    def advance(self, tokens: list[int], draw: DrawAhead | None = None, rows: int = 1) -> "_Later":
        if len(tokens) == 1:
            return _Later(self.sequence.advance_later(tokens[0]))
        return self.logits(self.sequence.tokens + tokens, rows)


class _Later:
    """An awaitable whose value is computed when awaited, without suspending (the row of
    a decode already under way, or one already read), under the backend's lock where
    there is one."""

    __slots__ = ("compute", "lock")

    def __init__(self, compute: Callable[[], Any], lock: threading.Lock | None = None):
        self.compute = compute
        self.lock = lock

    def __await__(self):
        if self.lock is None:
            return self.compute()
        with self.lock:
            return self.compute()
        yield  # a generator that returns at once


def run_ready(coroutine) -> Any:
    """Run a coroutine that awaits only resolved awaitables, synchronously."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the decoding coroutine waited for a scheduler: drive it in an event loop")
