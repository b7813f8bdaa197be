"""`lmq trace show FILE`: a trace (runtime/trace.py) as a readable table, one row per token.

Holes, values, branches and the result are lines of their own between the token rows; a
token row shows its branch, variable, position in the value, id and text, its
log-probability under the mask and under the model alone, how many tokens the mask
allowed, whether it was forced, and the best alternatives before and after the mask.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

from lmq.errors import LmqError

#: widest a token's text is shown in its own column
TEXT_WIDTH = 14


class TraceFileError(LmqError):
    """A trace file that is not one JSON object per line."""


def read_trace(lines: Iterable[str], name: str) -> Iterator[dict[str, Any]]:
    """The events of a trace file, a malformed line an error naming it."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceFileError(f"{name}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(event, dict) or not isinstance(event.get("event"), str):
            raise TraceFileError(f"{name}, line {number}: not a trace event (a JSON object with "
                                 "an \"event\" name)")
        yield event


def render(events: Iterable[dict[str, Any]], top: int = 3) -> Iterator[str]:
    """The table's lines; `top` alternatives are shown before and after the mask."""
    positions: dict[tuple[int, str], int] = {}
    header = (f"{'br':>3} {'var':<8} {'#':>3} {'id':>6} {'token':<{TEXT_WIDTH}} {'logprob':>8} "
              f"{'model':>8} {'allowed':>13}  {'':6} top before mask | top after mask")
    shown_header = False
    for event in events:
        kind = event["event"]
        branch = event.get("branch", 0)
        if kind == "token":
            if not shown_header:
                yield header
                shown_header = True
            key = (branch, event.get("variable"))
            position = positions.get(key, 0)
            positions[key] = position + 1
            yield _token_row(event, branch, position, top)
            continue
        shown_header = False
        if kind == "hole":
            positions[(branch, event.get("variable"))] = 0
        elif kind == "branch":
            positions[(branch, event.get("variable"))] = event.get("tokens") or 0
        yield _line(kind, event, branch)


def _token_row(event: dict[str, Any], branch: int, position: int, top: int) -> str:
    allowed = f"{_or_dash(event.get('allowed'))}/{_or_dash(event.get('vocabulary'))}"
    how = "forced" if event.get("forced") else "chosen"
    alternatives = (f"{_alternatives(event.get('top'), top)} | "
                    f"{_alternatives(event.get('masked_top'), top)}")
    return (f"{branch:>3} {_cut(str(event.get('variable')), 8):<8} {position:>3} {event.get('id'):>6} "
            f"{_cut(repr(event.get('text', '')), TEXT_WIDTH):<{TEXT_WIDTH}} "
            f"{_number(event.get('logprob')):>8} {_number(event.get('model_logprob')):>8} "
            f"{allowed:>13}  {how:6} {alternatives}")


def _line(kind: str, event: dict[str, Any], branch: int) -> str:
    if kind == "query":
        indent = "  " * event.get("depth", 0)
        what = f"{indent}query {event.get('name')}"
        if event.get("depth", 0) == 0:
            settings = ", ".join(f"{k}={v!r}" for k, v in (event.get("settings") or {}).items())
            what += f" on {event.get('model')}, decoder {event.get('decoder')}({settings})"
        return what
    if kind == "text":
        role = f" ({event['role']})" if event.get("role") else ""
        return f"[{branch}] text{role} {event.get('text')!r}"
    if kind == "hole":
        stops = ", ".join(repr(s.get("phrase")) for s in event.get("stops") or [])
        return (f"[{branch}] hole {event.get('variable')} where {event.get('constraint') or '(none)'}"
                f"; budget {event.get('budget') if event.get('budget') is not None else 'none'}"
                + (f"; stops {stops}" if stops else ""))
    if kind == "value":
        return f"[{branch}] {event.get('variable')} = {event.get('value')!r} ({event.get('finish')})"
    if kind == "branch":
        return (f"[{branch}] branch split off {event.get('parent')} in {event.get('variable')} "
                f"after {event.get('tokens')} tokens")
    if kind == "pruned":
        return f"[{branch}] pruned by the search"
    if kind == "result":
        if "results" in event:
            return "result: " + "; ".join(f"logprob {r.get('logprob', 0):.4f} {r.get('variables')!r}"
                                          for r in event["results"])
        if "variables" in event:
            return f"result: logprob {event.get('logprob', 0):.4f} {event.get('variables')!r}"
        indent = "  " * event.get("depth", 0)
        label = "returned" if event.get("depth", 0) else "result: returned"
        return f"{indent}{label} {event.get('return')!r}"
    if kind == "error":
        where = f" (line {event['line']})" if "line" in event else ""
        return f"error{where}: {event.get('type')}: {event.get('message')}"
    return f"[{branch}] {kind} {json.dumps(event, ensure_ascii=False)}"


def _alternatives(pairs: list | None, count: int) -> str:
    if pairs is None:
        return "-"
    return ", ".join(f"{_cut(repr(text), TEXT_WIDTH)} {logprob:.2f}" for _, text, logprob in pairs[:count])


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def _or_dash(value: Any) -> str:
    """What a trace left null (the server did not say it) as `-`."""
    return "-" if value is None else str(value)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
