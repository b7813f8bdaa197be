"""What the playground does with a query: its compiled view (the generated program and
each hole's GBNF, as `lmq compile` shows them), and runs whose trace events
(runtime/trace.py, the format of observability.md) stream to the page while they happen.

The trace is the only thing a run hands the page: `QueryRun` passes `trace=` a callable
that queues each event, and Stop makes that callable raise at the next event (the next
token, at the latest), which ends the query the way any error does.
"""

from __future__ import annotations

import json
import linecache
import queue
import secrets
import threading
from typing import Any, Iterator

from lmq.compiler.codegen import compile_query
from lmq.errors import LmqError
from lmq.runtime.hole import grammar_listing
from lmq.runtime.query import QueryFunction, run_sync_coroutine
from lmq.runtime.trace import error_event

#: the file name errors and tracebacks give a playground query (no file on disk has it)
QUERY_FILE = "<playground>"


def compiled_view(source: str) -> dict[str, Any]:
    """The generated Python program, the parameters and per hole its where clause and
    grammar text (`lmq compile --gbnf`); or the error event of a query that does not
    compile (a syntax error with its line and column, an unsatisfiable constraint)."""
    try:
        program = compile_query(source, QUERY_FILE)
    except LmqError as e:
        return {"error": error_event(e, QUERY_FILE)}
    holes = []
    for hole in program.holes:
        try:
            listing = grammar_listing(hole)
        except LmqError as e:           # a contradiction on literals: shown at its hole
            return {"error": {**error_event(e, QUERY_FILE), "line": hole.line}}
        holes.append({"index": hole.index, "name": hole.name, "line": hole.line,
                      "where": hole.where.source if hole.where else None,
                      "grammar": listing.strip("\n")})
    return {"python": program.python, "parameters": list(program.free_names),
            "decoder": program.decoder.name if program.decoder else None, "holes": holes}


class RunStopped(Exception):
    """Raised inside a run by its trace callback once Stop was asked for."""


class QueryRun:
    """One query running on its own thread (its own event loop); `events()` yields its
    trace events, then `{"event": "stopped"}` if it was stopped, then `{"event": "end"}`."""

    def __init__(self, source: str, arguments: dict[str, Any], model: Any = None):
        self.id = secrets.token_hex(8)
        self._source = source
        self._arguments = arguments
        self._model = model
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stop = threading.Event()
        self._failed = False
        self._thread = threading.Thread(target=self._work, name=f"lmq-playground-{self.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def events(self) -> Iterator[dict[str, Any]]:
        while True:
            event = self._events.get()
            yield event
            if event["event"] == "end":
                return

    def _trace(self, event: dict[str, Any]) -> None:
        """The trace callback: queue the event, or end the run once stopped (the error
        event the runtime then writes is shown as the stop)."""
        if event["event"] == "error" and event.get("type") == RunStopped.__name__:
            self._put({"event": "stopped"})
            return
        if self._stop.is_set():
            raise RunStopped("stopped")
        self._put(event)

    def _put(self, event: dict[str, Any]) -> None:
        self._failed = self._failed or event["event"] in ("error", "stopped")
        self._events.put(json.loads(json.dumps(event, ensure_ascii=False, default=str)))

    def _work(self) -> None:
        # the source as the query's "file": tracebacks of its own code show its lines
        linecache.cache[QUERY_FILE] = (len(self._source), None, self._source.splitlines(True), QUERY_FILE)
        try:
            program = compile_query(self._source, QUERY_FILE)
            query = QueryFunction(program, {}, name=QUERY_FILE)
        except LmqError as e:
            self._put(error_event(e, QUERY_FILE))
        else:
            kwargs = dict(self._arguments)
            if self._model is not None:
                kwargs["model"] = self._model
            try:
                run_sync_coroutine(query.run(trace=self._trace, **kwargs))
            except Exception as e:      # the trace has its error event (or the stop) already
                if not self._failed:
                    self._put(error_event(e, QUERY_FILE))
        finally:
            self._events.put({"event": "end"})
