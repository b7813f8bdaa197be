"""What every remote inference engine backend shares (llama-server, OpenAI-compatible
servers): one HTTP request per hole carrying its constraint, the answer turned into the
`HoleOutput` the in-process decoder would give for the same tokens.

The engine decodes the whole hole, so these backends offer `generate_hole` (as the LMTP
client does) and no `Sequence`s: decoders that need logits rows (beam, best_k) and
`distribution` clauses fail with an error naming the feature and the engine. Requests
run on a thread pool of `max_concurrency` workers, so async queries and `sample(n)`
branches keep that many requests in flight on the engine's parallel slots. Each worker
thread keeps one keep-alive connection.

Tokenizer, token bytes and chat template come from the model's GGUF read here (the path
the server reports, or `vocab=`), checked against the server's vocabulary size.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from lmq.backends.base import Sequence
from lmq.backends.gguf import GgufBackend, load_vocab_only
from lmq.backends.sampling_settings import SamplingSettings
from lmq.constraints import byte_dfa as fa
from lmq.constraints.gbnf_export import dfa_to_gbnf
from lmq.constraints.hole_plan import HoleOutput, HolePlan, find_stop, language_holds
from lmq.constraints.languages import ANY_TEXT, character_budget, stopped_dfa
from lmq.errors import (ConstraintTooLarge, ConstraintViolation, ContextLimitError, ModelError,
                        QueryArgumentError)

#: seconds a request may wait for the engine's next bytes (a whole hole may take longer)
DEFAULT_TIMEOUT = 120.0
DEFAULT_CONCURRENCY = 8
#: llama.cpp's names of lmq's sampling knobs where they differ
ENGINE_KNOB_NAMES = {"penalty_last_n": "repeat_last_n"}


@dataclass(frozen=True)
class Generated:
    """A hole as the engine generated it: every token id, each one's log-probability, and
    whether the engine stopped at its token budget (n_predict / max_tokens)."""

    tokens: list[int]
    logprobs: list[float]
    at_budget: bool


class RemoteEngineBackend(GgufBackend):
    """A model on a remote engine that decodes whole holes; subclasses speak its API."""

    returns_rows = False

    engine = "a remote engine"

    def __init__(self, url: str, *, vocab: str | None = None, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_concurrency: int | None = None,
                 model: str | None = None, **unknown: Any):
        if unknown:
            raise QueryArgumentError(f"unknown argument{'s' if len(unknown) > 1 else ''} of a "
                                     f"{self.engine} model: {', '.join(sorted(unknown))} (vocab, "
                                     "api_key, timeout, max_concurrency, model)")
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise QueryArgumentError(f"{self.engine}: expected an http://HOST:PORT URL, not {url!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise QueryArgumentError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.url = url.rstrip("/")
        self._scheme, self._host = parsed.scheme, parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._base_path = parsed.path.rstrip("/")
        self.timeout = float(timeout)
        self.model = model
        key = api_key or os.environ.get("LMQ_API_KEY")
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self._local = threading.local()
        self._count_lock = threading.Lock()
        info = self._server_info()
        path = vocab or info.model_path
        if not path or not os.path.isfile(path):
            raise ModelError(f"the tokenizer of the model on {self.describe()} is not readable here"
                             f"{f' ({path})' if path else ''}: pass vocab=PATH.gguf (a GGUF with "
                             "the same vocabulary)")
        super().__init__(load_vocab_only(path), path)
        if info.vocab_size is not None and self.vocabulary.size != info.vocab_size:
            raise ModelError(f"the vocabulary of {path} ({self.vocabulary.size} tokens) is not the "
                             f"one of the model on {self.describe()} ({info.vocab_size} tokens)")
        if info.chat_template:
            self.chat_template = info.chat_template      # the template the server applies
        self.context_size = info.context_size
        concurrency = max_concurrency or info.slots or DEFAULT_CONCURRENCY
        if not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1:
            raise QueryArgumentError(f"max_concurrency must be an int >= 1, not {max_concurrency!r}")
        self.max_concurrency = concurrency
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="lmq-engine")

    def describe(self) -> str:
        return f"{self.engine} at {self.url}"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def sequence(self) -> Sequence:
        raise ModelError(f"{self.describe()} returns tokens, not logits rows: `distribution` "
                         "clauses and the beam and best_k decoders need those, so they do not run "
                         "there (argmax and sample do)")

    # ---------------------------------------------------------------- one hole

    async def generate_hole(self, context: list[int], plan: HolePlan, max_len: int, decoder,
                            on_text: Callable[[bytes], None] | None = None) -> HoleOutput:
        """One hole, one request: the same `HoleOutput` `decode_hole` gives in process for
        the tokens the engine chose (stop phrases cut or kept as there)."""
        if plan.max_tokens == 0:
            return HoleOutput([], b"", "length", 0.0)
        knobs = self._knobs(decoder)
        room = max_len - len(context)
        budget = room if plan.max_tokens is None else min(plan.max_tokens, room)
        body = self._request(list(context), plan, budget, knobs)
        loop = asyncio.get_running_loop()
        generated = await loop.run_in_executor(self._pool, self._generate, body, plan.name)
        output = hole_output(generated, plan, self.vocabulary)
        if output.finish == "length" and generated.at_budget and budget < (plan.max_tokens or budget + 1):
            raise ContextLimitError(f"max_len of {max_len} tokens reached while generating "
                                    f"{plan.name}", result=(output.tokens, output.value))
        if output.finish == "length" and plan.language is not None \
                and not language_holds(plan.language, output.value.decode("utf-8", "replace")):
            raise ConstraintViolation(
                f"{plan.name} = {output.value.decode('utf-8', 'replace')!r} reached its budget of "
                f"{len(output.tokens)} tokens on {self.describe()} before it satisfied its "
                "constraint (an engine cannot steer a value to end within a token budget, as lmq "
                "does in process): raise the len(TOKENS(...)) bound or drop it")
        if on_text and output.value:
            on_text(output.value)
        return output

    def _knobs(self, decoder) -> dict[str, Any]:
        """The decoder's sampling knobs under llama.cpp's names, every one set (an engine's
        own defaults, such as top_k=40, would change the distribution lmq samples from)."""
        if decoder.name not in ("argmax", "sample"):
            raise ModelError(f"the {decoder.name} decoder needs the model's logits rows, which "
                             f"{self.describe()} does not return (argmax and sample run there)")
        settings = SamplingSettings.of(decoder.settings)
        knobs = {ENGINE_KNOB_NAMES.get(name, name): getattr(settings, name)
                 for name in sorted(SamplingSettings.names())}
        if decoder.name == "argmax":
            knobs["temperature"] = 0.0
        seed = decoder.settings.get("seed")
        if seed is not None:
            # each branch of sample(n) draws its own stream, the same for the same seed
            knobs["seed"] = (seed * 1_000_003 + decoder.branch_index) % 0xFFFFFFFF
        return knobs

    def count_evaluated(self, tokens: int) -> None:
        """Add the engine's count of tokens it evaluated for one request (prompt tokens
        not in its cache, and generated ones) to `evaluated_tokens`."""
        with self._count_lock:
            self.evaluated_tokens += tokens

    def _request(self, prompt: list[int], plan: HolePlan, budget: int,
                 knobs: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _generate(self, body: dict[str, Any], hole: str) -> Generated:
        raise NotImplementedError

    # ---------------------------------------------------------------- HTTP

    def get_json(self, path: str, *, at_root: bool = False) -> Any:
        """GET `path` (below the URL's path, or below the server's root) as JSON, errors
        as ModelError."""
        answer = self._send("GET", path, None, f"GET {path}", at_root)
        try:
            data = answer.read()
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise self._unreachable(e, f"GET {path}") from None
        if answer.status != 200:
            raise ModelError(f"{self.describe()} answered GET {path} with HTTP {answer.status}: "
                             f"{_error_message(data)}")
        return _json(data, self.describe())

    def post_events(self, path: str, body: dict[str, Any], hole: str) -> Iterator[dict[str, Any]]:
        """POST `body` as a streamed request and yield its server-sent events as JSON."""
        answer = self._send("POST", path, json.dumps(body), f"while generating {hole}")
        if answer.status != 200:
            data = answer.read()
            raise ModelError(f"{self.describe()} refused the request for {hole} (HTTP "
                             f"{answer.status}): {_error_message(data)}")
        try:
            while True:
                line = answer.readline()
                if not line:
                    return
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        answer.read()
                        return
                    event = _json(payload, self.describe())
                    if isinstance(event, dict) and "error" in event:
                        raise ModelError(f"{self.describe()} failed while generating {hole}: "
                                         f"{_error_message(payload)}")
                    yield event
                elif line.startswith(b"error:"):
                    raise ModelError(f"{self.describe()} failed while generating {hole}: "
                                     f"{_error_message(line[6:])}")
        except (OSError, http.client.HTTPException) as e:
            self._drop_connection()
            raise self._unreachable(e, f"while generating {hole}") from None

    def _send(self, method: str, path: str, body: str | None, doing: str,
              at_root: bool = False) -> http.client.HTTPResponse:
        """Send one request on this thread's connection and read the answer's head. A
        kept-alive connection the server has closed meanwhile fails before any answer:
        the request is then sent once more on a new connection."""
        for attempt in (1, 2):
            reused = getattr(self._local, "connection", None) is not None
            connection = self._connection()
            try:
                connection.request(method, path if at_root else self._base_path + path, body,
                                   self._headers)
                return connection.getresponse()
            except (OSError, http.client.HTTPException) as e:
                self._drop_connection()
                stale = reused and isinstance(e, (ConnectionResetError, BrokenPipeError,
                                                  http.client.RemoteDisconnected))
                if not stale or attempt == 2:
                    raise self._unreachable(e, doing) from None
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPConnection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            kind = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            connection = self._local.connection = kind(self._host, self._port, timeout=self.timeout)
        return connection

    def _drop_connection(self) -> None:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None

    def _unreachable(self, error: Exception, doing: str) -> ModelError:
        if isinstance(error, (socket.timeout, TimeoutError)):
            return ModelError(f"{self.describe()} sent nothing for {self.timeout:g} s {doing} "
                              "(timeout=)")
        if isinstance(error, ConnectionRefusedError):
            return ModelError(f"cannot reach {self.describe()}: connection refused (is the server "
                              "running?)")
        return ModelError(f"the connection to {self.describe()} failed {doing}: "
                          f"{error or type(error).__name__}")

    def _server_info(self) -> "ServerInfo":
        raise NotImplementedError


@dataclass(frozen=True)
class ServerInfo:
    """What a backend learns from the server before its first hole."""

    model_path: str | None
    vocab_size: int | None
    context_size: int
    slots: int | None
    chat_template: str | None


def hole_output(generated: Generated, plan: HolePlan, vocabulary) -> HoleOutput:
    """The in-process decoder's `HoleOutput` for the tokens an engine generated: the value
    ends at the first end token, at the stop phrase that completes first (kept for
    STOPS_AT, cut for STOPS_BEFORE, the overshooting token kept as in process) or at the
    token budget; later tokens (the engine's stop check waits for whole characters) are
    dropped."""
    table = vocabulary.token_bytes
    ends = vocabulary.end_ids
    tokens: list[int] = []
    value = bytearray()
    logprob = 0.0
    for token, score in zip(generated.tokens, generated.logprobs):
        if token in ends:
            return HoleOutput(tokens, bytes(value), "end", logprob + score)
        tokens.append(token)
        start = len(value)
        value += table[token]
        logprob += score
        if plan.stops and plan.may_end_at(len(tokens)):
            cut = find_stop(value, plan, start)
            if cut is not None:
                return HoleOutput(tokens, bytes(value[:cut]), "stop", logprob)
        if plan.max_tokens is not None and len(tokens) >= plan.max_tokens:
            break
    return HoleOutput(tokens, bytes(value), "length", logprob)


def pushed_grammar(plan: HolePlan) -> str | None:
    """The GBNF an engine enforces for a hole: its GRAMMAR/JSON grammar, or the language
    of the streams it may generate (the value language with its stop phrases folded in as
    in process; after a completed phrase any text may follow, as the overshoot of the
    token that completed it, and the engine's `stop` ends generation there). None when
    nothing but stops and budgets constrain the hole (the engine's `stop` and budget are
    then exact on their own). An upper bound on characters too large to spell out as
    rules is left to the re-check."""
    if plan.grammar is not None:
        return plan.grammar
    if plan.language is None:
        return None
    stops = tuple((rule.phrase, rule.keep) for rule in plan.stops)
    try:
        streams = stopped_dfa(plan.language, stops)
    except ConstraintTooLarge:
        rest, limit = character_budget(plan.language)
        if limit is None:
            raise
        streams = stopped_dfa(rest or ANY_TEXT, stops)
    overshooting = fa.ByteDfa(streams.transitions, streams.accepting | streams.exits,
                              streams.exits & False, streams.initial)
    return dfa_to_gbnf(overshooting)


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ModelError(f"{where} answered something that is not JSON: {data[:200]!r}") from None


def _error_message(data: bytes) -> str:
    """The message of an engine's JSON error body (`{"error": {"message": …}}` or
    `{"error": "…"}`), else the body's start."""
    try:
        error = json.loads(data).get("error")
    except (ValueError, AttributeError):
        return data[:300].decode("utf-8", "replace").strip() or "(empty answer)"
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)
