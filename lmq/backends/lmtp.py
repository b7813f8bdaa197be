"""The LMTP client backend: a model served by `lmq serve-model` (ids `llama.cpp:PATH`
with `endpoint=`, and `lmtp://HOST:PORT/MODEL`).

Holes of argmax and sample use the capability `generate_hole`, which `Decoder.decode`
takes when a backend offers it: the whole hole is one GENERATE carrying the hole's
constraint program; the server masks every token itself (hard) with the same decoder, and
streams the tokens back. A sampler's state (random stream, mirostat's mu) travels with the
hole and comes back with its last element (`sampler_state`), so seeded draws continue from
hole to hole exactly as in process.

Everything else (beam, best_k, `distribution`, `model.score`) needs logits rows: this
backend's `Sequence`s are held on the server (lmq's LOGITS extension, one synchronous
connection per backend: the runtime asks for rows from inside its step, as it calls
llama.cpp), so the in-process decoders and scoring run here unchanged on the server's
rows, one round trip per batch step.
Tokenizer, vocabulary bytes and chat template come from the model's GGUF read locally
(the server names its path in MODEL_INFO; `vocab=` overrides), and are checked against
the server's vocabulary size, so prompts, stops and values see the server's bytes.

One websocket per event loop carries all concurrent holes of that loop (stream ids).
A connection lost mid-hole is a `ModelError`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import threading
import weakref
from typing import Any, Callable

import numpy as np

from websockets.asyncio.client import ClientConnection, connect as connect_async
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import connect as connect_sync

from lmq.backends.base import Sequence
from lmq.backends.gguf import GgufBackend, load_vocab_only
from lmq.backends.sampling_settings import SamplingSettings
from lmq.constraints.hole_plan import HoleOutput
import lmq.errors as errors
from lmq.errors import ContextLimitError, ModelError, QueryArgumentError

DEFAULT_ENDPOINT = "localhost:8080"
_CONNECT_TIMEOUT = 30
_LOST = object()


class LmtpBackend(GgufBackend):
    """A model on an LMTP server, decoding whole holes there."""

    def __init__(self, model: str, endpoint: str = DEFAULT_ENDPOINT, token: str | None = None,
                 vocab: str | None = None, **unknown: Any):
        if unknown:
            raise QueryArgumentError(f"unknown argument{'s' if len(unknown) > 1 else ''} of an LMTP "
                                     f"model: {', '.join(sorted(unknown))} (endpoint, token, vocab)")
        if not isinstance(endpoint, str) or not endpoint or "/" in endpoint:
            raise QueryArgumentError(f"endpoint must be HOST:PORT, not {endpoint!r}")
        self.model = model
        self.url = f"ws://{endpoint}/"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        info = self._model_info()
        path = vocab or _local_gguf(info.get("tokenizer_gguf"), model)
        if path is None:
            raise ModelError(f"the tokenizer of {model} on {self.url} is not readable here: pass "
                             "vocab=PATH.gguf (a GGUF with the same vocabulary)")
        super().__init__(load_vocab_only(path), path)
        if self.vocabulary.size != info.get("vocab_size"):
            raise ModelError(f"the vocabulary of {path} ({self.vocabulary.size} tokens) is not the "
                             f"one of {model} on {self.url} ({info.get('vocab_size')} tokens)")
        self.context_size = int(info["context_size"])
        self.max_tokens = int(info.get("max_tokens") or self.context_size)   # the server's cap
        self._clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Client]" = \
            weakref.WeakKeyDictionary()
        self._rows = _RowsClient(self)

    def describe(self) -> str:
        return f"{self.model} on {self.url}"

    def sequence(self) -> "RemoteSequence":
        return RemoteSequence(self._rows)

    def advance_many(self, steps: list[tuple[Sequence, list[int]]],
                     rows: list[int] | None = None) -> list[np.ndarray]:
        """`rows` is all ones here: an LMTP model does not `speculate`."""
        return self._rows.evaluate([(sequence, list(tokens), False) for sequence, tokens in steps])

    def _connect_sync(self, **options: Any):
        return connect_sync(self.url, additional_headers=self._headers, proxy=None,
                            compression=None, open_timeout=_CONNECT_TIMEOUT, max_size=None, **options)

    def _model_info(self) -> dict[str, Any]:
        try:
            with self._connect_sync() as ws:
                ws.send("MODEL_INFO " + json.dumps({"model": self.model, "stream_id": 0}))
                kind, _, body = ws.recv(timeout=_CONNECT_TIMEOUT).partition(" ")
        except InvalidStatus as e:
            raise ModelError(f"the LMTP server at {self.url} refused the connection "
                             f"(HTTP {e.response.status_code}; token=?)") from None
        except (OSError, TimeoutError, WebSocketException) as e:
            raise ModelError(f"cannot reach an LMTP server at {self.url}: {e}") from None
        elements = json.loads(body)
        answer = elements[0] if elements else {}
        if "error" in answer:
            raise ModelError(f"the LMTP server at {self.url}: {answer['error']}")
        if kind != "MSG" or "model_info" not in answer:
            raise ModelError(f"the server at {self.url} did not answer MODEL_INFO as LMTP does")
        return answer["model_info"]

    async def generate_hole(self, context: list[int], plan, max_len: int, decoder,
                            on_text: Callable[[bytes], None] | None = None):
        """One hole on the server: the same `HoleOutput` `decode_hole` returns in process."""
        if plan.max_tokens == 0:
            return HoleOutput([], b"", "length", 0.0)
        room = max_len - len(context)
        request = {"model": self.model, "prompt": list(context), "max_tokens": min(room, self.max_tokens),
                   "constraint": plan.to_program(), **_sampling(decoder)}
        sampler = decoder.sampler() if decoder.name == "sample" else None
        if sampler is not None:
            request["sampler_state"] = sampler.state()
        client = await self._client()
        table = self.vocabulary.token_bytes
        tokens: list[int] = []
        shown = 0                      # bytes of the value passed to on_text so far
        async for element in client.stream(request, plan.name):
            if "error" in element:
                if element.get("error_type") == "ContextLimitError" and room > self.max_tokens:
                    raise ModelError(f"{plan.name} needs more than the {self.max_tokens} tokens "
                                     f"the server at {self.url} allows a hole (its --max-tokens)")
                raise _server_error(self.url, element, tokens, table)
            token = element.get("token")
            hole = element.get("hole")
            if decoder.tracer is not None and token is not None:
                decoder.tracer.remote(plan.name, token, element.get("logprob"))
            if hole is None:
                tokens.append(token)
                if on_text:
                    on_text(table[token])
                shown += len(table[token])
                continue
            if token is not None and token not in self.vocabulary.end_ids:
                tokens.append(token)          # a value's last token (not the end token)
            if sampler is not None and "sampler_state" in hole:     # (absent: greedy, no draw)
                sampler.restore(hole["sampler_state"])
            value = b"".join(table[t] for t in tokens)[:hole["value_bytes"]]
            if on_text and len(value) > shown:
                on_text(value[shown:])
            return HoleOutput(tokens, value, hole["finish"], float(hole["logprob"]))
        raise ModelError(f"the LMTP server at {self.url} ended {plan.name} without its last token")

    async def _client(self) -> "_Client":
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.closed:
            try:
                websocket = await connect_async(self.url, additional_headers=self._headers, proxy=None,
                                                compression=None, open_timeout=_CONNECT_TIMEOUT,
                                                max_size=None)
            except (OSError, TimeoutError, WebSocketException) as e:
                raise ModelError(f"cannot reach the LMTP server at {self.url}: {e}") from None
            client = self._clients[loop] = _Client(websocket, self.url)
        return client


class _Client:
    """One websocket: sends requests, routes each element to its stream's queue."""

    def __init__(self, websocket: ClientConnection, url: str):
        self.websocket = websocket
        self.url = url
        self.closed = False
        self._ids = itertools.count(1)
        self._streams: dict[int, asyncio.Queue] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def stream(self, request: dict[str, Any], name: str):
        """Send one GENERATE and yield its elements until the last; cancel it on the server
        when the consumer stops early."""
        stream_id = next(self._ids)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[stream_id] = queue
        finished = False
        try:
            await self.websocket.send("GENERATE " + json.dumps({**request, "stream_id": stream_id}))
            while True:
                element = await queue.get()
                if element is _LOST:
                    raise ModelError(f"the connection to the LMTP server at {self.url} was lost "
                                     f"while generating {name}")
                finished = "error" in element or element.get("finish_reason") is not None
                yield element
                if finished:
                    return
        except ConnectionClosed:
            raise ModelError(f"the connection to the LMTP server at {self.url} was lost while "
                             f"generating {name}") from None
        finally:
            self._streams.pop(stream_id, None)
            if not finished and not self.closed:
                try:
                    await self.websocket.send("CANCEL " + json.dumps({"stream_id": stream_id}))
                except ConnectionClosed:
                    pass

    async def _read(self) -> None:
        try:
            async for frame in self.websocket:
                kind, _, body = frame.partition(" ")
                elements = json.loads(body)
                for element in elements if isinstance(elements, list) else ():
                    queue = self._streams.get(element.get("stream_id"))
                    if queue is not None:
                        queue.put_nowait(element)
        except (ConnectionClosed, ValueError):
            pass
        finally:
            self.closed = True
            for queue in self._streams.values():
                queue.put_nowait(_LOST)


def _sampling(decoder) -> dict[str, Any]:
    """The decoder's sampling knobs as GENERATE fields (argmax: temperature 0); a seed
    travels as the sampler's state."""
    if decoder.name == "argmax":
        return {"temperature": 0.0}
    knobs = {k: v for k, v in decoder.settings.items() if k in SamplingSettings.names()}
    knobs.setdefault("temperature", 1.0)
    return knobs


class RemoteSequence(Sequence):
    """A sequence held on the server: its tokens mirrored here, each evaluation a LOGITS
    request (`held` once the server has it)."""

    def __init__(self, client: "_RowsClient"):
        super().__init__()
        self.client = client
        self.handle = next(client.handles)
        self.held = False

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.client.evaluate([(self, list(tokens), True)])[0]

    def advance(self, token: int) -> np.ndarray:
        return self.client.evaluate([(self, [token], False)])[0]

    def fork(self) -> "RemoteSequence":
        child = RemoteSequence(self.client)
        child.tokens = list(self.tokens)
        if self.held:
            self.client.fork(self, child)
        return child

    def release(self) -> None:
        if self.held:
            self.client.release(self)
        self.tokens = []


class _RowsClient:
    """The synchronous connection of one backend's LOGITS requests. Forks wait for the
    next request; a release is sent at once (its slot serves other clients), and its empty
    answer is skipped when the next request reads. Every error on this connection is one of
    its requests' (a failed fork or release surfaces at the next request)."""

    def __init__(self, backend: LmtpBackend):
        self.backend = backend
        self.handles = itertools.count()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._websocket = None
        self._forks: list[list[int]] = []
        self._releases: list[int] = []

    def fork(self, parent: RemoteSequence, child: RemoteSequence) -> None:
        with self._lock:
            self._forks.append([parent.handle, child.handle])
            child.held = True

    def release(self, sequence: RemoteSequence) -> None:
        with self._lock:
            self._releases.append(sequence.handle)
            sequence.held = False
            try:
                self._send([])
            except ModelError:            # the connection is gone, and its slots with it
                pass

    def evaluate(self, steps: list[tuple[RemoteSequence, list[int], bool]]) -> list[np.ndarray]:
        """The rows after each step (`reset`: the tokens are the whole sequence, else
        appended), in one engine step on the server."""
        with self._lock:
            stream_id = self._send([{"sequence": s.handle, "tokens": tokens, "reset": reset}
                                    for s, tokens, reset in steps])
            rows = self._answer(stream_id)
            for sequence, tokens, reset in steps:
                if reset:
                    sequence.tokens = tokens
                    sequence.held = True
                else:
                    sequence.tokens.extend(tokens)
            return list(rows)

    def _send(self, steps: list[dict[str, Any]]) -> int:
        stream_id = next(self._ids)
        request = {"model": self.backend.model, "stream_id": stream_id, "fork": self._forks,
                   "release": self._releases, "steps": steps}
        self._forks, self._releases = [], []
        try:
            if self._websocket is None:
                self._websocket = self.backend._connect_sync(legacy=True)    # held open
            self._websocket.send("LOGITS " + json.dumps(request))
        except (OSError, TimeoutError, WebSocketException) as e:
            self._websocket = None
            raise ModelError(f"cannot reach the LMTP server at {self.backend.url}: {e}") from None
        return stream_id

    def _answer(self, stream_id: int) -> np.ndarray:
        try:
            while True:
                frame = self._websocket.recv()
                if isinstance(frame, bytes):
                    head, _, body = frame.partition(b"\n")
                    header = json.loads(head.partition(b" ")[2])
                    if header["stream_id"] == stream_id:
                        return np.frombuffer(body, dtype="<f4").reshape(header["rows"], header["width"])
                    continue
                for element in json.loads(frame.partition(" ")[2]):
                    if "error" in element:
                        raise _server_error(self.backend.url, element, [], ())
        except (OSError, WebSocketException) as e:
            self._websocket = None
            raise ModelError(f"the connection to the LMTP server at {self.backend.url} was lost "
                             f"(the sequences it held are gone): {e}") from None


def _server_error(url: str, element: dict[str, Any], tokens: list[int], table) -> Exception:
    """The lmq error the server's decoder raised (by class name), else a ModelError."""
    message = f"LMTP server {url}: {element['error']}"
    cls = getattr(errors, str(element.get("error_type")), None)
    if cls is ContextLimitError:
        return ContextLimitError(message, result=(tokens, b"".join(table[t] for t in tokens)))
    if isinstance(cls, type) and issubclass(cls, errors.LmqError):
        return cls(message)
    return ModelError(message)


def _local_gguf(server_path: str | None, model: str) -> str | None:
    """A GGUF readable here with the model's tokenizer: the server's path, else the
    model id's own path."""
    own = model.split("llama.cpp:", 1)[1] if "llama.cpp:" in model else None
    for path in (server_path, own):
        if path and os.path.isfile(path):
            return path
    return None
