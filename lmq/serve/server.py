"""`LmtpServer`: the LMTP websocket endpoint in front of the model workers.

The event loop only parses frames, checks them against the model (token ids in range,
prompt within the context, stream limits) and forwards streams to the model's worker
thread; elements coming back are packed into one TOKEN frame per connection and step.
Every failure a client can cause is an error answer on its own stream (or `stream_id:
null`); the server goes on serving everyone. A client that goes away has its streams
cancelled and their cache slots freed. SIGINT/SIGTERM: stop accepting, end open streams
with an error answer, close the connections, return.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import sys
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from lmq import __version__
from lmq.serve.holes import HoleStream
from lmq.serve.models import ModelRegistry
from lmq.serve.protocol import (Cancel, Generate, Limits, Logits, ModelInfo, ProtocolError, Score,
                                encode, parse_request, shown)
from lmq.serve.rows import HeldSequences
from lmq.serve.scheduler import ModelWorker
from lmq.serve.streams import GenerateStream, ScoreStream, Stream

#: websockets closes a connection on frames this many times over `--max-frame-bytes`;
#: frames between the limit and this get an error answer and the connection lives on
_HARD_FRAME_FACTOR = 4
#: the outbox kind of a ready binary frame (LOGITS answers), sent as it is
_BINARY = "binary"


class LmtpServer:
    def __init__(self, registry: ModelRegistry, host: str = "127.0.0.1", port: int = 8080,
                 token: str | None = None, limits: Limits = Limits()):
        self.registry = registry
        self.host = host
        self.port = port
        self.token = token
        self.limits = limits
        self.connections: set[Connection] = set()
        self._stopping: asyncio.Event | None = None

    async def run(self, ready_message: str = "") -> None:
        """Serve until SIGINT/SIGTERM (or `stop()`); prints the address once listening."""
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stopping.set)
        server = await serve(self._handle, self.host, self.port, compression=None,
                             max_size=self.limits.max_frame_bytes * _HARD_FRAME_FACTOR,
                             process_request=self._authorize if self.token else None)
        port = server.sockets[0].getsockname()[1]
        print(f"lmq serve-model: {ready_message}listening on ws://{self.host}:{port}/", flush=True)
        await self._stopping.wait()
        print("lmq serve-model: shutting down", file=sys.stderr, flush=True)
        server.close(close_connections=False)
        await loop.run_in_executor(None, self.registry.stop)   # ends open streams with an error
        await asyncio.gather(*(c.close() for c in list(self.connections)))
        await server.wait_closed()

    def stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    def _authorize(self, connection: ServerConnection, request) -> Any:
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            return None
        return connection.respond(HTTPStatus.UNAUTHORIZED, "a valid Authorization: Bearer token is required\n")

    async def _handle(self, websocket: ServerConnection) -> None:
        connection = Connection(self, websocket)
        self.connections.add(connection)
        try:
            await connection.serve()
        finally:
            self.connections.discard(connection)


class Connection:
    """One client: its open streams and its outgoing frames."""

    def __init__(self, server: LmtpServer, websocket: ServerConnection):
        self.server = server
        self.websocket = websocket
        self.open: dict[int, ModelWorker] = {}      # stream id → the worker running it
        self.held = HeldSequences(self)              # sequences of LOGITS requests
        self._loop = asyncio.get_running_loop()
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._sender = asyncio.create_task(self._send_loop())

    async def serve(self) -> None:
        try:
            async for frame in self.websocket:
                request = None
                try:
                    request = parse_request(frame, self.server.limits)
                    await self._dispatch(request)
                except ProtocolError as e:
                    self._error(e)
                except Exception as e:      # a server fault answers its stream, never closes
                    self._fault(e, request)
        except ConnectionClosed:
            pass
        finally:
            for worker in set(self.open.values()):
                worker.cancel(self)
            self.open.clear()
            self.held.release_all()
            self._outbox.put_nowait(None)
            await self._sender

    async def close(self) -> None:
        """Send what is queued (the shutdown errors), then close."""
        self._outbox.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._sender), 5)
        except asyncio.TimeoutError:
            self._sender.cancel()
        await self.websocket.close(1001, "server shutting down")

    def deliver(self, elements: list[dict[str, Any]]) -> None:
        """Called from a worker thread with the elements of one step."""
        try:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, ("TOKEN", elements))
        except RuntimeError:        # the event loop is gone: the server has stopped
            pass

    def deliver_frame(self, frame: bytes) -> None:
        """Called from a worker thread with one binary frame (a LOGITS answer)."""
        try:
            self._loop.call_soon_threadsafe(self._outbox.put_nowait, (_BINARY, frame))
        except RuntimeError:
            pass

    def _error(self, error: ProtocolError) -> None:
        kind = error.kind if error.stream_id is not None else "MSG"
        self._outbox.put_nowait((kind, [{"stream_id": error.stream_id, "error": str(error)}]))

    def _fault(self, error: Exception, request) -> None:
        what = f"a {type(request).__name__} request" if request is not None else "a frame"
        print(f"lmq serve-model: internal error on {what}: {shown(repr(error))}",
              file=sys.stderr, flush=True)
        answer = ProtocolError(f"internal server error: {type(error).__name__}",
                               getattr(request, "stream_id", None))
        if not isinstance(request, (Generate, Score, Logits)):
            answer.kind = "MSG"
        self._error(answer)

    async def _send_loop(self) -> None:
        while True:
            item = await self._outbox.get()
            batch = []
            while item is not None:
                batch.append(item)
                if self._outbox.empty():
                    break
                item = self._outbox.get_nowait()
            for kind, elements in _merge(batch):
                if kind == "TOKEN":
                    self._forget_finished(elements)
                try:
                    await self.websocket.send(elements if kind == _BINARY else encode(kind, elements))
                except ConnectionClosed:
                    return
            if item is None:
                return

    def _forget_finished(self, elements: list[dict[str, Any]]) -> None:
        for element in elements:
            if element.get("finish_reason") is not None or "error" in element:
                self.open.pop(element["stream_id"], None)

    async def _dispatch(self, request) -> None:
        try:
            await self._act(request)
        except ProtocolError as e:      # the request was well-formed: answer on its stream
            if e.stream_id is None:
                e.stream_id = request.stream_id
            if isinstance(request, (ModelInfo, Cancel)):
                e.kind = "MSG"
            raise

    async def _act(self, request) -> None:
        if isinstance(request, Cancel):
            worker = self.open.get(request.stream_id)
            if worker is None:
                raise ProtocolError(f"CANCEL: no open stream {request.stream_id}", kind="MSG")
            worker.cancel(self, request.stream_id)
            return
        worker = await self.server.registry.get(request.model)
        if isinstance(request, ModelInfo):
            self._outbox.put_nowait(("MSG", [{"stream_id": request.stream_id,
                                              "model_info": model_info(request.model, worker,
                                                                         self.server.limits)}]))
            return
        if request.stream_id in self.open:
            raise ProtocolError(f"stream {request.stream_id} is already open on this connection")
        if isinstance(request, Logits):
            self.held.submit(request, worker)
            return
        if len(self.open) >= self.server.limits.max_streams:
            raise ProtocolError(f"too many open streams on this connection (limit "
                                f"{self.server.limits.max_streams})")
        self.open[request.stream_id] = worker
        try:
            stream = _stream(self, request, worker)
        except Exception:
            del self.open[request.stream_id]
            raise
        worker.submit(stream)


def _stream(owner: Connection, request: Generate | Score, worker: ModelWorker) -> Stream:
    """The stream for a request, once its ids and length fit the model."""
    backend = worker.backend
    size = backend.vocabulary.size
    ids = request.token_ids()
    if ids and (min(ids) < 0 or max(ids) >= size):
        bad = next(t for t in ids if not 0 <= t < size)
        raise ProtocolError(f"token id {bad} is out of range (the vocabulary has {size} tokens)")
    context = backend.context_size
    if isinstance(request, Score):
        needed = len(request.prompt) + len(request.scored) - 1
        if needed > context:
            raise ProtocolError(f"SCORE: prompt and scored tokens ({needed} to evaluate) do not "
                                f"fit the context of {context} tokens")
        return ScoreStream(owner, request)
    if len(request.prompt) >= context:
        raise ProtocolError(f"GENERATE: the prompt of {len(request.prompt)} tokens leaves no room "
                            f"in the context of {context} tokens")
    if request.allow is not None and not set(request.allow) - set(request.deny or ()):
        raise ProtocolError("GENERATE: the mask allows no token")
    if request.constraint is not None:
        return HoleStream(owner, request, backend)
    return GenerateStream(owner, request, backend.vocabulary, context)


def model_info(model_id: str, worker: ModelWorker, limits: Limits) -> dict[str, Any]:
    """MODEL_INFO's answer: what a client needs to tokenize and decode for this model."""
    backend = worker.backend
    vocabulary = backend.vocabulary
    return {"model": model_id, "model_type": worker.model_id.split(":", 1)[0],
            "vocab_size": vocabulary.size, "bos_token_id": vocabulary.bos_id,
            "eos_token_id": vocabulary.eos_id, "eot_token_id": vocabulary.eot_id,
            "end_token_ids": sorted(vocabulary.end_ids), "add_bos": vocabulary.add_bos,
            "context_size": backend.context_size, "tokenizer_gguf": getattr(backend, "path", None),
            "backend": backend.describe(), "version": f"lmq {__version__}",
            "max_tokens": limits.max_tokens, **worker.stats()}


def _merge(batch: list[tuple[str, list]]) -> list[tuple[str, list]]:
    """Consecutive items of the same frame type become one frame."""
    merged: list[tuple[str, list]] = []
    for kind, elements in batch:
        if kind == _BINARY:
            merged.append((kind, elements))
        elif merged and merged[-1][0] == kind:
            merged[-1][1].extend(elements)
        else:
            merged.append((kind, list(elements)))
    return merged
