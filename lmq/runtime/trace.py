"""Traces: what a query did, one JSON object per line, written as it happens.

`trace=` on any query call (and `lmq run --trace`) opens a `TraceSink` for that call;
each program instance (the one run, or each branch of a branching decoder) gets a
`Tracer`, carried by its decoder, so the runtime's hooks are one `if tracer is not None`
where text is written, a hole starts or ends and a token is chosen or forced. Everything
the trace shows beyond what the decoder computes anyway (the top tokens before and after
the mask, the mask's count) is computed here, and only while tracing.

Events (docs/tracing.md): `query`, `text`, `hole`, `token`, `value`, `branch`, `pruned`,
`result`, `error`.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import traceback
from typing import IO, Any, Callable

import numpy as np

from lmq.backends.base import Backend
from lmq.compiler.constraints import Constraint, conjuncts
from lmq.constraints.hole_plan import HolePlan
from lmq.constraints.token_choice import candidates, log_normalizer
from lmq.constraints.token_masks import TokenMask
from lmq.errors import ConstraintTooLarge, LmqSyntaxError, QueryArgumentError
from lmq.runtime.decoders import _step_mask
from lmq.runtime.result import LMQResult

#: how many of the most likely tokens `top` and `masked_top` list
TOP = 5


class TraceSink:
    """Where one query call's events go: a file named by a path (created, written and
    flushed per event, closed at the end of the call), an open text stream (flushed, left
    open) or a callable given each event as a dict."""

    def __init__(self, target: Any):
        self._file: IO[str] | None = None
        self._owned = False
        self._call: Callable[[dict[str, Any]], None] | None = None
        if isinstance(target, (str, os.PathLike)):
            try:
                self._file = open(target, "w", encoding="utf-8")
            except OSError as e:
                raise QueryArgumentError(f"cannot write the trace to {os.fspath(target)}: "
                                         f"{e.strerror}") from None
            self._owned = True
        elif hasattr(target, "write"):
            self._file = target
        elif callable(target):
            self._call = target
        else:
            raise QueryArgumentError("trace must be a file path, an open text file or a callable "
                                     f"taking each event, not {target!r}")
        self._branches = itertools.count(1)

    def emit(self, event: dict[str, Any]) -> None:
        if self._call is not None:
            self._call(event)
            return
        self._file.write(json.dumps(event, ensure_ascii=False, default=str) + "\n")
        self._file.flush()

    def new_branch(self) -> int:
        """A branch number not used yet in this call (beam splits)."""
        return next(self._branches)

    def close(self) -> None:
        if self._owned:
            self._file.close()


class Tracer:
    """The trace of one program instance (branch `branch`). A branch that a beam search
    split off replays its parent's program first: it stays `muted` until its own first
    token, so the parent's text, holes and tokens are not written twice."""

    def __init__(self, sink: TraceSink, branch: int = 0):
        self.sink = sink
        self.branch = branch
        self.muted = False
        self.depth = 0                   # nesting of `[X: query(...)]` calls
        self.variable: str | None = None    # the hole in progress
        self._backend: Backend | None = None
        self._table: tuple[bytes, ...] = ()
        self._ends: frozenset[int] = frozenset()
        self._scores: _StepScores | None = None

    def emit(self, event: str, **fields: Any) -> None:
        if not self.muted:
            self.sink.emit({"event": event, "branch": self.branch, **fields})

    # the branches of a run --------------------------------------------------------------

    def for_branch(self, index: int) -> "Tracer":
        """The tracer of branch `index` of a run with several results."""
        return Tracer(self.sink, index)

    def split(self, tokens: int) -> "Tracer":
        """The tracer of a branch split off this one after `tokens` tokens of the hole in
        progress; its first own token is the one it was split for, scored by this
        branch's latest step."""
        child = Tracer(self.sink, self.sink.new_branch())
        child.emit("branch", parent=self.branch, variable=self.variable, tokens=tokens)
        child.muted = True               # its replay sets its hole, table and nesting depth
        child._scores = self._scores
        return child

    def pruned(self) -> None:
        self.emit("pruned")

    # the program's events ---------------------------------------------------------------

    def text(self, text: str, role: str | None) -> None:
        if role is None:
            self.emit("text", text=text)
        else:
            self.emit("text", text=text, role=role)

    def nested(self, name: str, source: str) -> None:
        self.depth += 1
        self.emit("query", name=name, source=source, depth=self.depth)

    def nested_result(self, returned: Any) -> None:
        self.emit("result", depth=self.depth, **{"return": returned})
        self.depth -= 1

    def hole(self, plan: HolePlan, where: Constraint | None, backend: Backend) -> None:
        self._backend = backend
        self._table, self._ends = backend.vocabulary.token_bytes, backend.vocabulary.end_ids
        self.variable = plan.name
        constraint = " and ".join(item.source for item in conjuncts(where)
                                  if plan.name in item.variables)
        self.emit("hole", variable=plan.name, constraint=constraint or None, gbnf=_gbnf(plan),
                  budget=plan.max_tokens, min_tokens=plan.min_tokens,
                  stops=[{"phrase": r.phrase.decode("utf-8"), "keep": r.keep} for r in plan.stops])

    def value(self, variable: str, value: Any, finish: str) -> None:
        self.emit("value", variable=variable, value=value, finish=finish)

    # tokens -----------------------------------------------------------------------------

    def capture(self, row: np.ndarray, mask: TokenMask | None, hidden: np.ndarray | None,
                end_list: np.ndarray) -> None:
        """Take a step's scores now: a search decoder waits for the other branches before
        it chooses, and the row is not kept valid that long."""
        if not self.muted:
            self._scores = _StepScores(row.copy(), mask, hidden, end_list)

    def token(self, variable: str, row: np.ndarray | None, mask: TokenMask | None,
              hidden: np.ndarray | None, end_list: np.ndarray, token: int, logprob: float) -> None:
        """A token the decoder chose from `row` under `mask` (end tokens `hidden`)."""
        if self.muted:
            return
        scores, self._scores = self._scores, None
        if scores is None:
            scores = _StepScores(row, mask, hidden, end_list)
        self.emit("token", variable=variable, id=token, text=self._text(token), logprob=logprob,
                  model_logprob=scores.model_logprob(token), allowed=scores.allowed,
                  vocabulary=len(scores.row), forced=scores.allowed == 1,
                  top=self._listed(scores.top), masked_top=self._listed(scores.masked_top))

    def forced(self, automaton, state, plan: HolePlan, count: int, token: int) -> None:
        """A token fast-forward took without the model's scores (the only text the
        constraint allows, tokenized canonically): probability 1 under the constraint.
        `allowed` counts what the step's mask would have allowed."""
        if self.muted:
            return
        mask = _step_mask(automaton, state, plan, count, None)
        may_end = plan.may_end_at(count) and automaton.accepts(state)
        self.emit("token", variable=plan.name, id=token, text=self._text(token), logprob=0.0,
                  model_logprob=None, allowed=mask.count + (len(self._ends) if may_end else 0),
                  vocabulary=mask.size, forced=True, top=None, masked_top=None)

    def remote(self, variable: str, token: int, logprob: float | None) -> None:
        """A token an LMTP server chose or forced: the server says its id and its
        log-probability under the mask (0 for a forced one), nothing of its row or mask."""
        self.emit("token", variable=variable, id=token, text=self._text(token), logprob=logprob,
                  model_logprob=None, allowed=None, vocabulary=len(self._table),
                  forced=logprob == 0.0, top=None, masked_top=None)

    def _text(self, token: int) -> str:
        """A token's text: its bytes (a byte that is no whole UTF-8 character as `\\xNN`),
        or for a control token without bytes (end of text) its name in the vocabulary."""
        data = self._table[token]
        if not data:
            return self._backend.token_text(token)
        return data.decode("utf-8", "backslashreplace")

    def _listed(self, pairs: list[tuple[int, float]]) -> list[list[Any]]:
        return [[token, self._text(token), logprob] for token, logprob in pairs]


class _StepScores:
    """What one step's row says, for the trace: the model's log-normalizer, how many
    tokens the step allowed, and the top tokens before and after the mask. The decoder's
    own candidate buffers are in use, so the masked scores are built here again (the
    same rule: the mask's tokens, the end tokens unless `hidden`)."""

    __slots__ = ("row", "normalizer", "allowed", "top", "masked_top")

    def __init__(self, row: np.ndarray, mask: TokenMask | None, hidden: np.ndarray | None,
                 end_list: np.ndarray):
        self.row = row
        self.normalizer = log_normalizer(row)
        self.top = _best(row, self.normalizer, None)
        ends = len(end_list) if hidden is None else 0
        if mask is None and hidden is None:
            self.allowed, self.masked_top = len(row), self.top
            return
        values, ids = candidates(row, mask, end_list if hidden is None else None, hidden,
                                 np.empty_like(row))
        if ids is not None:
            self.allowed = len(ids)
        else:
            self.allowed = len(row) - len(hidden) if mask is None else mask.count + ends
        self.masked_top = _best(values, log_normalizer(values), ids)

    def model_logprob(self, token: int) -> float:
        return float(self.row[token]) - self.normalizer


def _best(values: np.ndarray, normalizer: float, ids: np.ndarray | None) -> list[tuple[int, float]]:
    """The `TOP` entries of `values` with the highest finite scores, best first, as (token
    id, log-probability); `ids` are the entries' token ids (None: their positions). A few
    argmax passes over a copy: for a handful of entries much faster than a partition."""
    work = values.copy()
    best = []
    for _ in range(min(TOP, len(work))):
        index = int(work.argmax())
        if not np.isfinite(work[index]):
            break
        best.append((int(ids[index]) if ids is not None else index, float(values[index]) - normalizer))
        work[index] = -np.inf
    return best


def _gbnf(plan: HolePlan) -> str | None:
    return _cached_gbnf(plan.language, plan.stops, plan.grammar)


@functools.lru_cache(maxsize=64)
def _cached_gbnf(language, stops, grammar) -> str | None:
    """A hole's GBNF (a hole in a loop is exported once); None where the language is too
    large to write as rules (the query itself runs on, as it does untraced)."""
    try:
        return HolePlan("trace", stops=stops, language=language, grammar=grammar).gbnf()
    except ConstraintTooLarge:
        return None


def query_event(name: str, source: str, model_id: str | None, decoder: Any) -> dict[str, Any]:
    """The first event of a call: what runs, on which model, under which decoder."""
    from lmq import __version__
    return {"event": "query", "name": name, "source": source, "model": model_id,
            "decoder": decoder.name, "settings": {"n": decoder.n, **decoder.settings},
            "lmq": __version__, "depth": 0}


def result_event(returned: Any) -> dict[str, Any]:
    """The last event of a call that returned: its result(s) as `LMQResult.to_json` gives
    them (several results: `results`), or what the query returned (`return`)."""
    if isinstance(returned, list) and returned and all(isinstance(r, LMQResult) for r in returned):
        return {"event": "result", "depth": 0, "results": [r.to_json() for r in returned]}
    if isinstance(returned, LMQResult):
        return {"event": "result", "depth": 0, **returned.to_json()}
    return {"event": "result", "depth": 0, "return": returned}


def error_event(error: BaseException, filename: str | None = None) -> dict[str, Any]:
    """The last event of a call that failed: the error's type and message, and its line
    (and column) in the query where it has one: a syntax error's place, or the deepest
    line of the query's own code in the traceback (`filename`: the query's)."""
    event = {"event": "error", "type": type(error).__name__, "message": str(error)}
    if isinstance(error, LmqSyntaxError):
        event.update(line=error.line, column=error.column)
    elif filename is not None:
        lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == filename]
        if lines:
            event["line"] = lines[-1]
    return event


def trace_failure(target: Any, error: BaseException) -> None:
    """Write the error event of a call that failed before it could run (a query that
    does not compile) to its trace."""
    sink = TraceSink(target)
    try:
        sink.emit(error_event(error))
    finally:
        sink.close()
