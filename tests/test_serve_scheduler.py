"""The server's batching loop (`ModelWorker`) on a backend whose logits are a function of
the tokens alone: streams that outgrow the shared cache are preempted and resumed with
exactly the tokens they would have had, the cache is never overfilled, and waiting
streams are admitted round robin across owners."""

import json
import threading
import zlib

import numpy as np

from lmq.backends import default_model_path
from lmq.backends.base import Sequence
from lmq.backends.gguf import GgufBackend, load_vocab_only
from lmq.runtime.decoders import DECODERS
from lmq.runtime.hole import plan_from_program
from lmq.serve.holes import HoleStream
from lmq.serve.protocol import Limits, parse_request
from lmq.serve.scheduler import FairQueue, ModelWorker
from lmq.serve.streams import GenerateStream

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
                                    backend, worker.executor)
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
