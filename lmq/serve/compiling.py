"""`ConstraintCompiler`: a server compiles the constraint programs of its holes in child
processes, under time and memory budgets, before a hole takes a cache slot.

Compiling a constraint (a regex's DFA, a grammar's Lark text and llguidance lexer) is
pure CPU and memory work that depends on the client's input; the engine's own limits
(`lmq.constraints.limits`, in the child set from `--max-automaton-states` and
`--max-grammar-rules`) refuse the large ones at once, and the child enforces the rest:
a process is the only place where a runaway can be stopped (killed) and kept within a
memory budget, and its work holds no lock and no GIL of the server. So a hole
reaches the model's batching loop only once its automaton is ready: the loop never waits
for a compile, and the other clients' streams decode at their usual pace.

Each of `--compile-workers` lanes owns one child (started with the server, niced, started
anew after it was killed) and watches it while it compiles: past `--max-compile-seconds`,
or once it holds `--max-compile-memory` MiB more than when it started, the child is
killed and the hole answered with a `ConstraintTooLarge` error (Linux; the child's
address space is also limited, to twice that, against an allocation too fast to watch).
Waiting holes are taken round robin across connections, and a connection compiles on one
lane at a time, so a client sending many costly constraints leaves the other lanes to
everyone else. A hole cancelled or whose client left is dropped from the queue, or its
compile killed.

The child returns the vocabulary-free `CompiledConstraint`; the lane finishes the
automaton over the model's vocabulary and caches the plan (plans are never changed by
decoding, so holes share them) by the program's hash (LRU, `CACHE_BYTES` of automata), so
a repeated constraint costs nothing. Errors that do not depend on load (malformed, too
large, unsatisfiable) are cached too; a timeout is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from lmq.backends.base import Vocabulary
from lmq.constraints import limits as engine_limits
from lmq.constraints.grammar_automaton import GrammarTokenAutomaton
from lmq.constraints.hole_plan import (CompiledConstraint, HolePlan, attach_automaton,
                                       compile_constraint, program_plan)
from lmq.errors import ConstraintTooLarge, LmqError
from lmq.serve.holes import HoleStream
from lmq.serve.scheduler import FairQueue
from lmq.serve.streams import Owner, Stream

#: how much the cached plans of one model may hold (their DFAs and grammars, estimated)
CACHE_BYTES = 256 * 1024 * 1024
#: how long a child may take to start (import lmq) before its lane reports a fault
START_SECONDS = 120
#: how often a lane looks at its compile's clock and resident memory
WATCH_SECONDS = 0.05
_TOO_LARGE = "ConstraintTooLarge"


@dataclass(frozen=True)
class CompileLimits:
    """The budgets of one constraint compile (each a `serve-model` flag)."""

    seconds: float = 10.0
    memory_mb: int = 1024
    states: int = engine_limits.MAX_STATES
    grammar_rules: int = engine_limits.MAX_GRAMMAR_RULES
    workers: int = 2


@dataclass(frozen=True)
class _Failure:
    """A compile's error answer: the message and the lmq error class name."""

    message: str
    error_type: str | None
    cached: bool = True


class ConstraintCompiler:
    """The compile stage in front of one model's batching loop (see module doc)."""

    def __init__(self, vocabulary: Vocabulary, limits: CompileLimits = CompileLimits()):
        self.vocabulary = vocabulary
        self.limits = limits
        self.compiles = 0                    # programs compiled by a child
        self.cache_hits = 0
        self._cache: OrderedDict[str, tuple[HolePlan | _Failure, int]] = OrderedDict()
        self._cached_bytes = 0
        self._waiting = FairQueue()
        self._ready: dict[Stream, tuple[str, Callable[[Stream], None]]] = {}
        self._running: dict[Owner, _Lane] = {}
        self._condition = threading.Condition()
        self._stopping = False
        self._lanes = [_Lane(self, i) for i in range(limits.workers)]

    def wait_started(self, timeout: float = START_SECONDS) -> None:
        """Return once every lane's child has started (or failed to)."""
        for lane in self._lanes:
            lane.started.wait(timeout)

    def submit(self, stream: Stream, ready: Callable[[Stream], None]) -> None:
        """Hand `stream` to `ready` once its constraint is compiled (at once for other
        streams and for a cached constraint), or answer its error."""
        if not isinstance(stream, HoleStream):
            ready(stream)
            return
        key = hashlib.sha256(json.dumps(stream.program, sort_keys=True).encode()).hexdigest()
        with self._condition:
            if not self._finish_cached(stream, key, ready):
                self._ready[stream] = (key, ready)
                self._waiting.push(stream)
                self._condition.notify()

    def cancel(self, owner: Owner, stream_id: int | None = None) -> None:
        """Drop the owner's compiling streams (one, or all of them: it went away); a
        compile already running is killed."""
        def matches(stream: Stream) -> bool:
            return stream_id is None or stream.stream_id == stream_id

        with self._condition:
            dropped = self._waiting.remove(owner, matches)
            lane = self._running.get(owner)
            if lane is not None and matches(lane.stream):
                dropped.append(lane.stream)
                lane.kill()
            for stream in dropped:
                self._ready.pop(stream, None)
                owner.deliver([stream.cancelled()])

    def stop(self, timeout: float = 5.0) -> None:
        """End the lanes and their children; compiling streams get an error answer."""
        with self._condition:
            self._stopping = True
            streams = [*self._waiting, *(lane.stream for lane in self._running.values())]
            self._waiting.clear()
            self._ready.clear()
            for stream in streams:
                stream.owner.deliver([stream.failed("the server is shutting down")])
            self._condition.notify_all()
        for lane in self._lanes:
            lane.kill()
        for lane in self._lanes:          # a child starting now is killed once it has started
            lane.thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        return {"compiling_streams": len(self._waiting) + len(self._running),
                "constraint_compiles": self.compiles, "constraint_cache_hits": self.cache_hits}

    # --- the lanes' threads ----------------------------------------------------------------

    def _next(self, lane: "_Lane") -> HoleStream | None:
        """The next stream to compile on `lane` (waits for one; None once stopping)."""
        with self._condition:
            while not self._stopping:
                stream = self._waiting.pop(busy=self._running)
                if stream is None:
                    self._condition.wait()
                    continue
                key, ready = self._ready[stream]
                if self._finish_cached(stream, key, ready):     # compiled while it waited
                    del self._ready[stream]
                    continue
                lane.stream = stream
                self._running[stream.owner] = lane
                return stream
            return None

    def _done(self, lane: "_Lane", outcome: HolePlan | _Failure) -> None:
        """Record a lane's result: cache it, answer the stream unless it was cancelled."""
        stream = lane.stream
        with self._condition:
            lane.stream = None
            del self._running[stream.owner]
            self._condition.notify_all()       # the owner's next stream may go now
            entry = self._ready.pop(stream, None)
            if entry is None:                  # cancelled, or the server is stopping
                return
            key, ready = entry
            if not isinstance(outcome, _Failure) or outcome.cached:
                self._store(key, outcome)
            self._answer(stream, outcome, ready)

    def _finish_cached(self, stream: HoleStream, key: str, ready: Callable[[Stream], None]) -> bool:
        entry = self._cache.get(key)
        if entry is None:
            return False
        self._cache.move_to_end(key)
        self.cache_hits += 1
        self._answer(stream, entry[0], ready)
        return True

    def _answer(self, stream: HoleStream, outcome: HolePlan | _Failure,
                ready: Callable[[Stream], None]) -> None:
        if isinstance(outcome, _Failure):
            stream.owner.deliver([stream.failed(outcome.message, outcome.error_type)])
        else:
            stream.plan = outcome
            ready(stream)

    def _store(self, key: str, outcome: HolePlan | _Failure) -> None:
        size = _estimated_bytes(outcome)
        self._cache[key] = (outcome, size)
        self._cached_bytes += size
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1][1]

    def _plan(self, program: dict[str, Any],
              compiled: CompiledConstraint | None) -> HolePlan | _Failure:
        """The plan over the model's vocabulary from what the child compiled."""
        try:
            plan = program_plan(program)
            attach_automaton(plan, compiled, self.vocabulary)
            return plan
        except LmqError as e:
            return _Failure(str(e), type(e).__name__)


def _estimated_bytes(outcome: HolePlan | _Failure) -> int:
    """What a cached entry holds, roughly: a DFA's tables, a grammar's text many times over."""
    automaton = getattr(outcome, "automaton", None)
    automaton = getattr(automaton, "base", automaton)          # a character budget's DFA
    dfa = getattr(automaton, "dfa", None)
    if dfa is not None:
        return 2 * dfa.transitions.nbytes + 4096
    grammar = getattr(outcome, "grammar", None)
    return 64 * len(grammar) + 4096 if grammar else 1024


class _Lane:
    """One compile at a time in one child process, on a thread of its own."""

    def __init__(self, compiler: ConstraintCompiler, number: int):
        self.compiler = compiler
        self.stream: HoleStream | None = None         # the stream compiling now
        self._process: subprocess.Popen | None = None
        self._connection: Connection | None = None
        self._most_resident = 0                       # the child's resident bytes allowed
        self._stale = False                           # the child was killed from outside
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"lmq-compile-{number}", daemon=True)
        self.thread.start()

    def kill(self) -> None:
        """Stop the child now (the lane starts another for its next compile)."""
        self._stale = True
        process = self._process
        if process is not None:
            process.kill()

    def _run(self) -> None:
        self._start()                   # ready before the first hole comes
        self.started.set()
        while (stream := self.compiler._next(self)) is not None:
            if self._process is not None or self._start():
                outcome = self._compile(stream.program)
            else:
                outcome = _Failure("internal server error: the constraint compiler did not "
                                   "start", None, cached=False)
            self.compiler._done(self, outcome)
            if (self._process is None or self._stale) and not self.compiler._stopping:
                self._end_child()           # killed: a fresh child for the next compile
                self._start()
        self.kill()

    def _start(self) -> bool:
        """A fresh child, ready to compile (False if it did not start). A plain
        subprocess running this module, not multiprocessing's spawn, which would import the
        server's `__main__` again (impossible when the server was started from stdin or a
        notebook)."""
        self._stale = False
        ours, theirs = socket.socketpair()
        with theirs:
            main = f"from lmq.serve.compiling import child; child({theirs.fileno()})"
            process = subprocess.Popen([sys.executable, "-c", main], pass_fds=[theirs.fileno()],
                                       stdin=subprocess.DEVNULL, env=_child_environment())
        self._process = process
        self._connection = Connection(ours.detach())
        compiler = self.compiler
        try:
            self._connection.send((compiler.vocabulary, compiler.limits))
            if self._connection.poll(START_SECONDS) and self._connection.recv() == "ready":
                budget = compiler.limits.memory_mb * 2 ** 20
                self._most_resident = _resident_bytes(process.pid) + budget
                return True
        except (EOFError, OSError):
            pass
        self._end_child()
        return False

    def _compile(self, program: dict[str, Any]) -> HolePlan | _Failure:
        limits = self.compiler.limits
        self.compiler.compiles += 1
        deadline = time.monotonic() + limits.seconds
        try:
            self._connection.send(program)
            while not self._connection.poll(WATCH_SECONDS):
                if time.monotonic() > deadline:
                    self._end_child()
                    return _Failure(f"constraint too large: compiling it took longer than the "
                                    f"server's limit of {limits.seconds:g} s "
                                    "(--max-compile-seconds)", _TOO_LARGE, cached=False)
                if _resident_bytes(self._process.pid) > self._most_resident:
                    self._end_child()
                    return _out_of_memory_failure(limits)
            answer = self._connection.recv()
        except (EOFError, OSError):         # out of memory outside Python, or cancelled
            code = self._end_child()
            return _Failure(f"constraint too large: compiling it stopped the compiler process "
                            f"(exit code {code}; its memory limit is {limits.memory_mb} MiB, "
                            "--max-compile-memory)", _TOO_LARGE, cached=False)
        if isinstance(answer, _Failure):
            return answer
        return self.compiler._plan(program, answer)

    def _end_child(self) -> int | None:
        """Kill the child (if any) and wait for it to go; its exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        process.kill()
        code = process.wait()
        self._connection.close()
        return code


def _child_environment() -> dict[str, str]:
    """The server's environment, with this lmq first on the module path."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {**os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


# --- the child process ----------------------------------------------------------------------

def child(descriptor: int) -> None:
    """The child's main: read the vocabulary and the limits from the socket `descriptor`,
    say "ready", then compile programs until the socket closes, answering each with its
    `CompiledConstraint` (or None) or a `_Failure`."""
    connection = Connection(descriptor)
    vocabulary, limits = connection.recv()
    try:
        os.nice(5)                      # decoding goes first
    except OSError:
        pass
    engine_limits.MAX_STATES = limits.states
    engine_limits.MAX_GRAMMAR_RULES = limits.grammar_rules
    _limit_memory(limits.memory_mb)
    connection.send("ready")
    while True:
        try:
            program = connection.recv()
        except EOFError:
            return
        connection.send(_compile_in_child(program, vocabulary, limits))


def _compile_in_child(program: dict[str, Any], vocabulary: Vocabulary,
                      limits: CompileLimits) -> CompiledConstraint | _Failure | None:
    try:
        plan = program_plan(program)
        compiled = compile_constraint(plan)
        if compiled is not None and compiled.grammar is not None:
            # llguidance compiles (and builds its lexer for the first mask) here, where a
            # failure or a runaway costs the server nothing
            automaton = GrammarTokenAutomaton(compiled.grammar, vocabulary, variable=plan.name,
                                              lark=compiled.lark)
            automaton.mask(automaton.initial())
        return compiled
    except ConstraintTooLarge as e:
        return _Failure(f"{e} (this server's limits: --max-automaton-states {limits.states}, "
                        f"--max-grammar-rules {limits.grammar_rules})", type(e).__name__)
    except LmqError as e:
        return _Failure(str(e), type(e).__name__)
    except RecursionError:
        return _Failure("constraint too large: it is nested too deeply to compile", _TOO_LARGE)
    except MemoryError:                 # the address-space backstop
        return _out_of_memory_failure(limits)
    except Exception as e:              # a fault on one program, never the end of the child
        return _Failure(f"internal server error: {type(e).__name__} while compiling the "
                        "constraint", None)


def _out_of_memory_failure(limits: CompileLimits) -> _Failure:
    return _Failure(f"constraint too large: compiling it needs more than the server's limit "
                    f"of {limits.memory_mb} MiB (--max-compile-memory)", _TOO_LARGE)


def _resident_bytes(pid: int) -> int:
    """Resident memory of process `pid` (Linux /proc; 0 where it cannot be read)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _limit_memory(megabytes: int) -> None:
    """Limit this process's address space to its size now plus twice `megabytes`: a
    backstop for an allocation too large and too fast for the lane's watch of the resident
    memory (Linux; where /proc is missing the limit is not set)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[0])
    except (OSError, ValueError, IndexError):
        return
    size = pages * os.sysconf("SC_PAGE_SIZE") + 2 * megabytes * 2 ** 20
    resource.setrlimit(resource.RLIMIT_AS, (size, resource.getrlimit(resource.RLIMIT_AS)[1]))
