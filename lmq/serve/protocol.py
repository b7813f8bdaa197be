"""LMTP frames: parsing and validating client frames, encoding server frames.

A client frame is `TYPE JSON-object`; a server frame is `TYPE JSON-list`. Everything a
client sends is data: it is parsed as JSON and checked field by field here, so the rest of
the server only ever sees well-typed requests. A bad frame becomes a `ProtocolError`
carrying the stream id when one could be read, so the error answer reaches the right
stream (or `stream_id: null`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from lmq.backends.sampling_settings import KNOB_ALIASES, SamplingSettings
from lmq.errors import LmqError, QueryArgumentError


class ProtocolError(LmqError):
    """A frame the server cannot act on; answered with an error for `stream_id`."""

    def __init__(self, message: str, stream_id: int | None = None, kind: str = "TOKEN"):
        super().__init__(message)
        self.stream_id = stream_id
        self.kind = kind          # the frame type the error answer goes out as


@dataclass(frozen=True)
class Limits:
    """Per-server safety limits (each one a `serve-model` flag)."""

    max_frame_bytes: int = 8 * 1024 * 1024
    max_streams: int = 64             # open streams per connection
    max_tokens: int = 4096            # largest `max_tokens` a GENERATE may ask for
    max_top_logprobs: int = 20


@dataclass(frozen=True)
class Generate:
    stream_id: int
    model: str
    prompt: list[int]
    max_tokens: int = 32
    top_logprobs: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)
    allow: list[int] | None = None            # `mask: {"allow": …}`
    deny: list[int] | None = None             # `mask: {"deny": …}`
    constraint: dict[str, Any] | None = None   # an lmq constraint program (`HolePlan.to_program`)
    seed: int | None = None
    sampler_state: dict[str, Any] | None = None   # a sampler's `Sampler.state()` (lmq)
    sampling: SamplingSettings = SamplingSettings(temperature=0.0)

    def token_ids(self) -> list[int]:
        """Every token id the request names (checked against the vocabulary)."""
        return [*self.prompt, *self.logit_bias, *(self.allow or ()), *(self.deny or ())]


@dataclass(frozen=True)
class Score:
    stream_id: int
    model: str
    prompt: list[int]
    scored: list[int]

    def token_ids(self) -> list[int]:
        return [*self.prompt, *self.scored]


@dataclass(frozen=True)
class LogitsStep:
    sequence: int              # the client's handle of a held sequence
    tokens: list[int]
    reset: bool                # `tokens` are the whole sequence (else appended to it)


@dataclass(frozen=True)
class Logits:
    """LOGITS (lmq extension): rows of sequences the client holds on the server."""

    stream_id: int
    model: str
    forks: list[tuple[int, int]]      # (parent, child) handles, in order, before the steps
    releases: list[int]
    steps: list[LogitsStep]

    def token_ids(self) -> list[int]:
        return [t for step in self.steps for t in step.tokens]


@dataclass(frozen=True)
class ModelInfo:
    stream_id: int | None
    model: str


@dataclass(frozen=True)
class Cancel:
    stream_id: int


Request = Generate | Score | Logits | ModelInfo | Cancel


def parse_request(frame: str | bytes, limits: Limits) -> Request:
    """One client frame → a validated request, or a `ProtocolError`."""
    if isinstance(frame, bytes):
        raise ProtocolError("LMTP frames are text messages, not binary", kind="MSG")
    if len(frame) > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the server's limit of "
                            f"{limits.max_frame_bytes} bytes", kind="MSG")
    kind, _, body = frame.partition(" ")
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise ProtocolError(f"{_clip(kind)} frame: the body is not valid JSON", kind="MSG") from None
    if not isinstance(payload, dict):
        raise ProtocolError(f"{_clip(kind)} frame: the body must be a JSON object", kind="MSG")
    stream_id = payload.get("stream_id")
    stream_id = stream_id if _is_int(stream_id) else None
    parse = _PARSERS.get(kind)
    if parse is None:
        raise ProtocolError(f"unknown frame type {_clip(kind)!r} (expected GENERATE, SCORE, "
                            "LOGITS, MODEL_INFO or CANCEL)", stream_id, kind="MSG")
    try:
        return parse(_Fields(kind, payload), limits)
    except ProtocolError as e:
        e.stream_id = stream_id
        if kind in ("MODEL_INFO", "CANCEL"):
            e.kind = "MSG"
        raise


def encode(kind: str, elements: list[dict[str, Any]]) -> str:
    """A server frame: `TYPE [elements…]`."""
    return f"{kind} {json.dumps(elements, separators=(',', ':'))}"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "…"


def shown(text: str, limit: int = 200) -> str:
    """Client text as it may appear in a log line or an answer: quoted with every newline,
    escape and control character escaped (`repr`), cut after `limit` characters."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text) - limit} more characters)"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Fields:
    """Typed access to a frame's fields; every failure names the frame and the field."""

    def __init__(self, kind: str, payload: dict[str, Any]):
        self.kind = kind
        self.payload = payload

    def fail(self, message: str) -> ProtocolError:
        return ProtocolError(f"{self.kind}: {message}")

    def int(self, name: str, default: int | None = None, low: int | None = None,
            high: int | None = None, required: bool = False) -> int | None:
        value = self.payload.get(name, default)
        if value is None and not required:
            return None
        if not _is_int(value):
            raise self.fail(f"field {name!r} must be an integer" if name in self.payload
                            else f"missing field {name!r}")
        if low is not None and value < low:
            raise self.fail(f"field {name!r} must be at least {low}, got {value}")
        if high is not None and value > high:
            raise self.fail(f"field {name!r} must be at most {high}, got {value}")
        return value

    def string(self, name: str) -> str:
        value = self.payload.get(name)
        if not isinstance(value, str) or not value:
            raise self.fail(f"field {name!r} must be a non-empty string" if name in self.payload
                            else f"missing field {name!r}")
        return value

    def ids(self, name: str, value: Any = None, allow_empty: bool = False) -> list[int]:
        value = self.payload.get(name) if value is None else value
        if not isinstance(value, list):
            raise self.fail(f"field {name!r} must be a list of token ids" if name in self.payload
                            else f"missing field {name!r}")
        if not value and not allow_empty:
            raise self.fail(f"field {name!r} must not be empty")
        if not all(_is_int(t) for t in value):
            raise self.fail(f"field {name!r} must hold integers only")
        return value

    def bias(self, name: str) -> dict[int, float]:
        value = self.payload.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(f"field {name!r} must be an object of token id → number")
        bias = {}
        for key, number in value.items():
            try:
                token = int(key)
            except ValueError:
                raise self.fail(f"{name}: key {_clip(key)!r} is not a token id") from None
            if not isinstance(number, (int, float)) or isinstance(number, bool) or math.isnan(number):
                raise self.fail(f"{name}: the bias of token {token} must be a number")
            bias[token] = float(number)
        return bias


def _stream(fields: _Fields) -> int:
    return fields.int("stream_id", required=True)


def _generate(fields: _Fields, limits: Limits) -> Generate:
    allow = deny = None
    mask = fields.payload.get("mask")
    if mask is not None:
        if not isinstance(mask, dict) or len(mask) != 1 or not set(mask) <= {"allow", "deny"}:
            raise fields.fail('field "mask" must be {"allow": [ids]} or {"deny": [ids]}')
        if "allow" in mask:
            allow = fields.ids("mask.allow", mask["allow"])
        else:
            deny = fields.ids("mask.deny", mask["deny"], allow_empty=True)
    return Generate(
        stream_id=_stream(fields), model=fields.string("model"), prompt=fields.ids("prompt"),
        max_tokens=fields.int("max_tokens", 32, 1, limits.max_tokens),
        top_logprobs=fields.int("top_logprobs", 1, 0, limits.max_top_logprobs),
        logit_bias=fields.bias("logit_bias"), allow=allow, deny=deny,
        constraint=_constraint(fields), seed=_seed(fields), sampler_state=_sampler_state(fields),
        sampling=_sampling(fields))


def _sampler_state(fields: _Fields) -> dict[str, Any] | None:
    """`sampler_state`: a sampler's `Sampler.state()` (checked when it is restored)."""
    state = fields.payload.get("sampler_state")
    if state is not None and not isinstance(state, dict):
        raise fields.fail('field "sampler_state" must be an object {"rng": PCG64 state, "mu": number}')
    return state


def _seed(fields: _Fields) -> int | None:
    """`seed`: an int >= 0, or -1 (llama.cpp's "a fresh random seed") → None."""
    seed = fields.int("seed", low=-1, high=2 ** 64 - 1)
    return None if seed == -1 else seed


def _sampling(fields: _Fields) -> SamplingSettings:
    """The sampling knobs under llama.cpp's or LMQL's names; greedy unless `temperature`."""
    names = SamplingSettings.names()
    knobs = {key: value for key, value in fields.payload.items()
             if KNOB_ALIASES.get(key, key) in names}
    knobs.setdefault("temperature", 0.0)
    try:
        return SamplingSettings.of(knobs)
    except (QueryArgumentError, TypeError) as e:
        raise fields.fail(str(e)) from None


def _constraint(fields: _Fields) -> dict[str, Any] | None:
    """The program's shape; its language and grammar are checked when the plan is built."""
    program = fields.payload.get("constraint")
    if program is None:
        return None
    if not isinstance(program, dict):
        raise fields.fail('field "constraint" must be an object')
    inner = _Fields(f"{fields.kind} constraint", program)
    if not isinstance(program.get("grammar"), (str, type(None))):
        raise inner.fail('field "grammar" must be GBNF text or null')
    inner.int("min_tokens", 0, 0)
    inner.int("max_tokens", None, 1)
    inner.ids("excluded_counts", program.get("excluded_counts", []), allow_empty=True)
    stops = program.get("stops", [])
    if not isinstance(stops, list) or not all(
            isinstance(s, dict) and isinstance(s.get("phrase"), str) and s["phrase"]
            and isinstance(s.get("keep"), bool) for s in stops):
        raise inner.fail('"stops" must be a list of {"phrase": non-empty string, "keep": bool}')
    return program


def _score(fields: _Fields, limits: Limits) -> Score:
    return Score(stream_id=_stream(fields), model=fields.string("model"),
                 prompt=fields.ids("prompt"), scored=fields.ids("scored"))


def _logits(fields: _Fields, limits: Limits) -> Logits:
    forks = fields.payload.get("fork", [])
    if not isinstance(forks, list) or not all(
            isinstance(f, list) and len(f) == 2 and all(_is_int(h) and h >= 0 for h in f) for f in forks):
        raise fields.fail('field "fork" must be a list of [parent, child] sequence handles')
    releases = fields.ids("release", fields.payload.get("release", []), allow_empty=True)
    steps = fields.payload.get("steps", [])
    if not isinstance(steps, list):
        raise fields.fail('field "steps" must be a list')
    parsed = []
    for step in steps:
        if not isinstance(step, dict):
            raise fields.fail('each step must be {"sequence": handle, "tokens": [ids], "reset": bool}')
        inner = _Fields(f"{fields.kind} step", step)
        if not isinstance(step.get("reset", False), bool):
            raise inner.fail('field "reset" must be a boolean')
        parsed.append(LogitsStep(inner.int("sequence", low=0, required=True), inner.ids("tokens"),
                                 step.get("reset", False)))
    if len({step.sequence for step in parsed}) < len(parsed):
        raise fields.fail("a sequence may have one step per request")
    return Logits(stream_id=_stream(fields), model=fields.string("model"),
                  forks=[(parent, child) for parent, child in forks], releases=releases, steps=parsed)


def _model_info(fields: _Fields, limits: Limits) -> ModelInfo:
    data = fields.payload.get("data", {})
    if not isinstance(data, dict):
        raise fields.fail('field "data" must be an object')
    return ModelInfo(stream_id=fields.int("stream_id"), model=fields.string("model"))


def _cancel(fields: _Fields, limits: Limits) -> Cancel:
    return Cancel(stream_id=_stream(fields))


_PARSERS = {"GENERATE": _generate, "SCORE": _score, "LOGITS": _logits, "MODEL_INFO": _model_info,
            "CANCEL": _cancel}
