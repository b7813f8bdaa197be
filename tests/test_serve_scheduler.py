"""The server's batching loop (`ModelWorker`) on a backend whose logits are a function of
the tokens alone: streams that outgrow the shared cache are preempted and resumed with
exactly the tokens they would have had, the cache is never overfilled, and waiting
streams are admitted round robin across owners."""

import json
import threading
import time
import zlib

import numpy as np

from lmq.backends import default_model_path
from lmq.backends.base import Sequence
from lmq.backends.gguf import GgufBackend, load_vocab_only
from lmq.constraints.hole_plan import plan_from_program
from lmq.runtime.decoders import DECODERS
from lmq.serve.holes import HoleStream
from lmq.serve.protocol import Limits, parse_request
from lmq.serve.rows import HeldSequences
from lmq.serve.scheduler import FairQueue, ModelWorker
from lmq.serve.streams import GenerateStream, Stream

PATH = default_model_path()
VOCAB = load_vocab_only(PATH)
HOLE = {"grammar": None, "min_tokens": 30, "max_tokens": 30, "stops": []}


class HashedBackend(GgufBackend):
    """Logits hashed from the tokens (the same row for the same tokens, whatever the
    batch or the order), over `n_ctx` cells shared by all its sequences; `peak_cells`
    is the most they ever held at once."""

    def __init__(self, n_ctx: int):
        super().__init__(VOCAB, PATH)
        self.context_size = n_ctx
        self.sequences: list[HashedSequence] = []
        self.peak_cells = 0

    def sequence(self) -> "HashedSequence":
        sequence = HashedSequence(self)
        self.sequences.append(sequence)
        return sequence

    def row(self, tokens: list[int]) -> np.ndarray:
        seed = zlib.crc32(np.asarray(tokens, dtype=np.int64).tobytes())
        return np.random.default_rng(seed).standard_normal(self.vocabulary.size, dtype=np.float32)


class HashedSequence(Sequence):
    def __init__(self, backend: HashedBackend):
        super().__init__()
        self.backend = backend

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.tokens = list(tokens)
        backend = self.backend
        backend.peak_cells = max(backend.peak_cells, sum(len(s.tokens) for s in backend.sequences))
        return backend.row(tokens)

    def advance(self, token: int) -> np.ndarray:
        return self.logits(self.tokens + [token])

    def fork(self) -> Sequence:
        raise NotImplementedError

    def release(self) -> None:
        self.tokens = []


class Collector:
    """An owner that keeps each stream's tokens and notes when all have finished."""

    def __init__(self, streams: int):
        self.tokens: dict[int, list[int]] = {}
        self.order: list[int] = []               # stream ids in the order they finished
        self.errors: list[dict] = []
        self.streams = streams
        self.done = threading.Event()
        self._lock = threading.Lock()

    def deliver(self, elements: list[dict]) -> None:
        with self._lock:
            for element in elements:
                if "error" in element:
                    self.errors.append(element)
                if element.get("token") is not None:
                    self.tokens.setdefault(element["stream_id"], []).append(element["token"])
                if element.get("finish_reason") is not None or "error" in element:
                    self.order.append(element["stream_id"])
            if len(self.order) == self.streams:
                self.done.set()


def request(stream_id: int, prompt: list[int], **fields):
    frame = {"model": "m", "prompt": prompt, "stream_id": stream_id, "temperature": 0, **fields}
    return parse_request("GENERATE " + json.dumps(frame), Limits())


def greedy(backend: HashedBackend, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(backend.row(tokens).argmax()))
    return tokens[len(prompt):]


def test_preempted_streams_resume_with_the_tokens_they_would_have_had():
    backend = HashedBackend(n_ctx=96)
    worker = ModelWorker("hashed", backend, slots=4)
    prompts = [[1 + i, 100 + i, 200, 300, 400] for i in range(6)]
    owner = Collector(len(prompts))
    try:
        for i, prompt in enumerate(prompts):         # 4 fit at first (prompt + reserve)
            if i % 2:
                stream = HoleStream(owner, request(i, prompt, max_tokens=500, constraint=HOLE),
                                    backend)
            else:
                stream = GenerateStream(owner, request(i, prompt, max_tokens=30), backend.vocabulary,
                                        backend.context_size)
            worker.submit(stream)
        assert owner.done.wait(60), owner.order
    finally:
        worker.stop()
    assert not owner.errors
    assert worker.preemptions >= 1 and worker.max_batch_width == 4
    assert backend.peak_cells <= backend.context_size
    in_process = HashedBackend(n_ctx=96)
    for i, prompt in enumerate(prompts):
        if i % 2:
            plan = plan_from_program(HOLE, in_process.vocabulary)
            output = DECODERS["argmax"]().decode_hole(in_process.sequence(), prompt, plan,
                                                      in_process, 96)
            assert owner.tokens[i] == output.tokens, i
        else:
            assert owner.tokens[i] == greedy(in_process, prompt, 30), i


def test_waiting_streams_are_taken_round_robin_across_owners():
    waiting = FairQueue()
    many, one = Collector(0), Collector(0)
    streams = [GenerateStream(many, request(i, [5, 6], max_tokens=1), VOCAB.vocabulary(), 64)
               for i in range(5)]
    late = GenerateStream(one, request(9, [5, 6], max_tokens=1), VOCAB.vocabulary(), 64)
    for stream in streams:
        waiting.push(stream)
    waiting.push(late)
    assert [waiting.pop() for _ in range(3)] == [streams[0], late, streams[1]]
    assert len(waiting) == 3
    assert waiting.remove(many, lambda s: s.stream_id == 3) == [streams[3]]
    assert list(waiting) == [streams[2], streams[4]]
    waiting.push(late)
    assert waiting.pop(busy={many}) is late           # a busy owner is passed over
    assert waiting.pop(busy={many}) is None           # only a busy owner waits
    assert waiting.pop() is streams[2]


class GatedStream(Stream):
    """Appends one token per step, one step per permit, up to `length` tokens."""

    def __init__(self, owner, prompt: list[int], length: int):
        super().__init__(owner, 0, prompt, length)
        self.permits = threading.Semaphore(0)
        self.length = length
        self.count = 0

    def step(self, row: np.ndarray) -> list[dict]:
        if self.count == self.length:
            return [self.finish({"stream_id": 0}, "length")]
        self.count += 1
        self.next_tokens = [7]
        return []

    def request(self) -> list[int] | None:
        self.permits.acquire()
        return super().request()


class RowsCollector(Collector):
    def __init__(self):
        super().__init__(0)
        self.frames: list[bytes] = []

    def deliver_frame(self, frame: bytes) -> None:
        self.frames.append(frame)


def logits_request(stream_id: int, **fields):
    return parse_request("LOGITS " + json.dumps({"model": "m", "stream_id": stream_id, **fields}), Limits())


def test_held_sequences_wait_for_room_beside_active_streams():
    """A LOGITS request whose cells do not fit beside an active stream waits until the
    stream leaves room, then gets its rows; with no stream to wait for it is an error; the
    shared cache never overflows and a disconnect gives every held slot back."""
    backend = HashedBackend(n_ctx=64)
    worker = ModelWorker("hashed", backend, slots=4)
    owner = RowsCollector()
    held = HeldSequences(owner)
    stream = GatedStream(Collector(1), list(range(1, 9)), 40)
    try:
        worker.submit(stream)
        for _ in range(34):
            stream.permits.release()
        deadline = time.monotonic() + 30
        while stream.count < 34 and time.monotonic() < deadline:
            time.sleep(0.01)
        tokens = list(range(100, 130))
        held.submit(logits_request(1, steps=[{"sequence": 0, "tokens": tokens, "reset": True}]), worker)
        time.sleep(0.3)
        assert owner.frames == []                     # 42 + 30 cells do not fit in 64
        for _ in range(10):
            stream.permits.release()
        while not owner.frames and time.monotonic() < deadline:
            time.sleep(0.01)
        head, _, body = owner.frames[0].partition(b"\n")
        assert json.loads(head.removeprefix(b"ROWS ")) == {"stream_id": 1, "rows": 1,
                                                           "width": backend.vocabulary.size}
        assert np.array_equal(np.frombuffer(body, dtype="<f4"), backend.row(tokens))
        assert stream.finished and worker.stats()["held_sequences"] == 1
        held.submit(logits_request(2, steps=[{"sequence": 1, "tokens": tokens * 2, "reset": True}]), worker)
        while not owner.errors and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "no room" in owner.errors[0]["error"]
        assert worker.stats()["held_sequences"] == 1           # the failed one holds nothing
        held.release_all()
        while worker.stats()["held_sequences"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert worker.stats()["held_sequences"] == 0
    finally:
        worker.stop()
    assert backend.peak_cells <= backend.context_size
