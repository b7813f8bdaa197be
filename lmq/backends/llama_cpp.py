"""llama.cpp in process, through llama-cpp-python's low-level API.

The weights and the context are lmq's own (`LlamaModel`: llama_model_load_from_file and
llama_init_from_model with lmq's parameters); decoding is our own `llama_batch`,
`llama_decode`, and the logits row read zero-copy from `llama_get_logits_ith`. The batch
lives in numpy arrays, so filling it is a few slice assignments, not per-field ctypes
writes. Each `Sequence` is a KV-cache sequence id of one unified cache; bringing it to a
new token list removes only the divergent tail from the cache and evaluates only the new
suffix, so a prompt is never evaluated twice.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import llama_cpp
import numpy as np

from lmq.backends.base import Sequence, common_prefix
from lmq.backends.gguf import GgufBackend, GgufVocab, check_gguf, show_llama_log
from lmq.backends.llama_model import LlamaModel
from lmq.errors import ContextLimitError, ModelError


class TokenBatch:
    """A `llama_batch` whose arrays are numpy arrays (one sequence id per token)."""

    def __init__(self, capacity: int):
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        int32_p = ctypes.POINTER(ctypes.c_int32)
        base, size = self.seq.ctypes.data, self.seq.itemsize
        self._seq_pointers = (int32_p * capacity)(*(ctypes.cast(base + i * size, int32_p)
                                                    for i in range(capacity)))
        self.batch = llama_cpp.llama_batch(
            n_tokens=0, token=self.token.ctypes.data_as(int32_p), embd=None,
            pos=self.pos.ctypes.data_as(int32_p), n_seq_id=self.n_seq_id.ctypes.data_as(int32_p),
            seq_id=self._seq_pointers, logits=self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8)))

    def fill(self, tokens, positions, seq_ids, outputs=0) -> None:
        """`tokens` at `positions` of `seq_ids` (array-likes, or one id for all), with
        logits where `outputs` is set; the last token always has them."""
        n = len(tokens)
        self.token[:n] = tokens
        self.pos[:n] = positions
        self.seq[:n] = seq_ids
        self.logits[:n] = outputs
        self.logits[n - 1] = 1
        self.batch.n_tokens = n

    def fill_one(self, seq_id: int, token: int, position: int) -> None:
        """The per-token case: one token of one sequence."""
        self.token[0] = token
        self.pos[0] = position
        self.seq[0] = seq_id
        self.logits[0] = 1
        self.batch.n_tokens = 1


#: the longest run decoded a token at a time on a GPU (`single_decode_run`): a batch of k
#: tokens costs about 3.2 ms of graph captures plus its decode, k single decodes 1.1 ms each
SINGLE_DECODE_RUN = 4


class LlamaCppBackend(GgufBackend):
    """A GGUF model evaluated by llama.cpp in this process."""

    #: sequences of the unified KV cache: branches of a query and concurrent queries decode
    #: together (a single sequence measured no slower with 16 than with 1)
    DEFAULT_SEQUENCES = 16
    speculates = True
    #: llama_decode calls so far (tests and benchmarks)
    decodes = 0

    def __init__(self, path: str, n_seq_max: int = DEFAULT_SEQUENCES, **kwargs):
        self.path = check_gguf(path)
        show_llama_log(bool(kwargs.get("verbose")))
        self.model = LlamaModel(self.path, **kwargs)
        try:
            self.ctx = self.model.new_context(n_seq_max=n_seq_max, kv_unified=n_seq_max > 1)
        except ModelError:
            self.model.close()
            raise
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        super().__init__(GgufVocab(self.model.model), self.path)
        self.context_size = llama_cpp.llama_n_ctx(self.ctx)
        self.wrong_guesses_cheap = self.model.model_params.n_gpu_layers > 0
        self.decodes_async = self.wrong_guesses_cheap
        #: one sequence's runs of at most this many tokens are decoded a token at a time:
        #: on a GPU llama.cpp replays the CUDA graph it captured for the last batch's
        #: shape, and capturing one for another shape costs about 1.6 ms, going to a batch
        #: and coming back (a decode of SmolLM2 on an H200 takes 1.1 ms)
        self.single_decode_run = SINGLE_DECODE_RUN if self.wrong_guesses_cheap else 1
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self.n_seq_max = llama_cpp.llama_n_seq_max(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.gguf.vocab)
        self._batch = TokenBatch(self.n_batch)
        self._decode_batch = llama_cpp.llama_decode
        self._logits_ith = llama_cpp.llama_get_logits_ith
        self._free_ids = list(range(self.n_seq_max))
        self._kept: dict[int, list[int]] = {}    # tokens a released sequence left in the cache
        self._logits_owner: tuple[int, int] | None = None   # (seq id, length) of current logits
        self._rows: dict[int, np.ndarray] = {}

    def describe(self) -> str:
        return f"llama.cpp {self.path}"

    def sequence(self) -> "LlamaSequence":
        if not self._free_ids:
            raise ModelError(f"all {self.n_seq_max} llama.cpp sequences are in use (branches and "
                             "concurrent queries): load the model with a larger n_seq_max=")
        sequence = LlamaSequence(self, self._free_ids.pop(0))
        sequence.tokens = self._kept.pop(sequence.seq_id, [])
        return sequence

    def _decode(self, seq_id: int, tokens: list[int], start: int) -> None:
        """Evaluate `tokens` at positions start… of `seq_id`, in chunks of n_batch."""
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset:offset + self.n_batch]
            first = start + offset
            self._batch.fill(chunk, np.arange(first, first + len(chunk)), seq_id)
            self._run_batch()
        self.evaluated_tokens += len(tokens)

    def _run_batch(self) -> None:
        """One llama_decode of the filled batch."""
        batch = self._batch.batch
        self.decodes += 1
        status = self._decode_batch(self.ctx, batch)
        if status == 1 and self._forget_kept():       # 1: no room in the KV cache
            status = self._decode_batch(self.ctx, batch)
        if status != 0:
            raise ModelError(f"llama_decode failed with status {status} "
                             f"(context {self.context_size} tokens)")

    def _forget_kept(self) -> bool:
        """Give back the cells that released sequences kept (only to spare re-evaluating a
        repeated prompt) when the cache, shared by every sequence, is full; True if any."""
        freed = False
        for seq_id, tokens in self._kept.items():
            if tokens:
                llama_cpp.llama_memory_seq_rm(self.memory, seq_id, 0, -1)
                self._kept[seq_id] = []
                freed = True
        return freed

    def advance_many(self, steps: list[tuple["LlamaSequence", list[int]]],
                     rows: list[int] | None = None) -> list:
        """All sequences' new tokens in one llama_decode (chunked by n_batch), logits
        kept only where asked (`rows[k]` trailing positions of sequence k, else its
        last); each row is a zero-copy view when one decode sufficed, else a copy."""
        return self.advance_many_later(steps, rows)()

    def advance_many_later(self, steps: list[tuple["LlamaSequence", list[int]]],
                           rows: list[int] | None = None) -> Callable[[], list]:
        """`advance_many` with the rows read (waiting for the decode) when the returned
        function is called, where the tokens fit one decode."""
        if len(steps) == 1 and 1 < len(steps[0][1]) <= self.single_decode_run:
            return self._advance_singly(*steps[0], rows[0] if rows is not None else 1,
                                        rows is None or rows[0] == 1)
        seq_ids, tokens, positions = [], [], []
        wanted, owner = [], {}
        for k, (sequence, new) in enumerate(steps):
            if not new:
                raise ModelError("advance_many needs at least one token per sequence")
            start = len(sequence.tokens)
            if start + len(new) > self.context_size:
                raise ContextLimitError(f"the context of {self.context_size} tokens is full")
            seq_ids.extend([sequence.seq_id] * len(new))
            positions.extend(range(start, start + len(new)))
            tokens.extend(new)
            count = rows[k] if rows is not None else 1
            for index in range(len(tokens) - min(count, len(new)), len(tokens)):
                wanted.append(index)
                owner[index] = k
        out: list = [None if rows is None or rows[k] == 1 else [] for k in range(len(steps))]
        batch, size = self._batch, self.n_batch
        single = len(tokens) <= size
        outputs = np.zeros(len(tokens), dtype=np.int8)
        outputs[wanted] = 1

        def read(offset: int, n: int) -> list:
            for i in np.flatnonzero(outputs[offset:offset + n]).tolist():
                row = self._logits_row(i)
                k = owner[offset + i]
                if not single:
                    row = row.copy()
                if out[k] is None:
                    out[k] = row
                else:
                    out[k].append(row)
            return out

        for offset in range(0, len(tokens), size):
            n = min(size, len(tokens) - offset)
            part = slice(offset, offset + n)
            batch.fill(tokens[part], positions[part], seq_ids[part], outputs[part])
            self._run_batch()
            if not single:
                read(offset, n)
        for sequence, new in steps:
            sequence.tokens.extend(new)
        self.evaluated_tokens += len(tokens)
        self._logits_owner = None
        return (lambda: out) if not single else (lambda: read(0, len(tokens)))

    def _advance_singly(self, sequence: "LlamaSequence", new: list[int], count: int,
                        one: bool) -> Callable[[], list]:
        """`advance_many_later` of one sequence's short run, a decode per token (see
        `single_decode_run`): the rows of the last `count` tokens, the earlier ones copied
        before the next decode rewrites them; the last one read when asked."""
        if len(sequence.tokens) + len(new) > self.context_size:
            raise ContextLimitError(f"the context of {self.context_size} tokens is full")
        kept = []
        for position, token in enumerate(new):
            if position and len(new) - position < count:     # the previous token's row
                kept.append(self._logits_row().copy())
            later = sequence.advance_later(token)
        return lambda: [later() if one else kept + [later()]]

    def _logits_row(self, index: int = -1) -> np.ndarray:
        """The row as a zero-copy view; views are kept per address (making one costs
        more than a small model's whole per-token bookkeeping)."""
        address = ctypes.cast(self._logits_ith(self.ctx, index), ctypes.c_void_p).value
        row = self._rows.get(address)
        if row is None:
            if len(self._rows) >= 4 * self.n_seq_max:
                self._rows.clear()
            row = self._rows[address] = np.ctypeslib.as_array(
                (ctypes.c_float * self.n_vocab).from_address(address))
        return row

    def close(self) -> None:
        if self.ctx is not None:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
            self.model.close()


class LlamaSequence(Sequence):
    def __init__(self, backend: LlamaCppBackend, seq_id: int):
        super().__init__()
        self.backend = backend
        self.seq_id = seq_id

    def logits(self, tokens: list[int]) -> np.ndarray:
        backend = self.backend
        if len(tokens) > backend.context_size:
            raise ContextLimitError(f"{len(tokens)} tokens do not fit the context of "
                                    f"{backend.context_size} tokens (over by "
                                    f"{len(tokens) - backend.context_size})")
        if not tokens:
            raise ModelError("cannot evaluate an empty token sequence")
        cached = self.tokens
        common = common_prefix(cached, tokens)
        if common == len(tokens) and backend._logits_owner == (self.seq_id, common) and common == len(cached):
            return backend._logits_row()
        common = min(common, len(tokens) - 1)     # the last token must be evaluated for logits
        if common < len(cached):
            llama_cpp.llama_memory_seq_rm(backend.memory, self.seq_id, common, -1)
        backend._decode(self.seq_id, tokens[common:], common)
        self.tokens = list(tokens)
        backend._logits_owner = (self.seq_id, len(tokens))
        return backend._logits_row()

    def advance(self, token: int) -> np.ndarray:
        return self.advance_later(token)()

    def advance_later(self, token: int) -> Callable[[], np.ndarray]:
        """llama_decode returns once the work is queued (on a GPU, before it is done); the
        row is read, which waits for it, when the caller asks."""
        backend = self.backend
        position = len(self.tokens)
        if position >= backend.context_size:
            raise ContextLimitError(f"the context of {backend.context_size} tokens is full")
        backend._batch.fill_one(self.seq_id, token, position)
        backend._run_batch()
        backend.evaluated_tokens += 1
        self.tokens.append(token)
        owner = backend._logits_owner = (self.seq_id, position + 1)

        def row() -> np.ndarray:
            if backend._logits_owner != owner:       # another sequence decoded meanwhile
                return self.logits(self.tokens)
            return backend._logits_row()
        return row

    def truncate(self, length: int) -> bool:
        if length < len(self.tokens):
            llama_cpp.llama_memory_seq_rm(self.backend.memory, self.seq_id, length, -1)
            del self.tokens[length:]
            if self.backend._logits_owner is not None and self.backend._logits_owner[0] == self.seq_id:
                self.backend._logits_owner = None
        return True

    def rows(self, tokens: list[int], count: int) -> list[np.ndarray]:
        """The cache brought to `tokens` with the last `count` of them evaluated in one
        batch (with what else is not cached), keeping their rows."""
        if len(tokens) > self.backend.context_size:
            raise ContextLimitError(f"{len(tokens)} tokens do not fit the context of "
                                    f"{self.backend.context_size} tokens")
        common = min(common_prefix(self.tokens, tokens), len(tokens) - count)
        self.truncate(common)
        rows = self.backend.advance_many([(self, tokens[common:])], [count])[0]
        return [row.copy() for row in rows]

    def fork(self) -> "LlamaSequence":
        child = self.backend.sequence()
        child.copy_from(self)
        return child

    def copy_from(self, other: "LlamaSequence") -> None:
        """The cells of `other` shared into this slot (`llama_memory_seq_cp`: no copy)."""
        backend = self.backend
        llama_cpp.llama_memory_seq_rm(backend.memory, self.seq_id, 0, -1)
        llama_cpp.llama_memory_seq_cp(backend.memory, other.seq_id, self.seq_id, 0, -1)
        self.tokens = list(other.tokens)
        if backend._logits_owner is not None and backend._logits_owner[0] == self.seq_id:
            backend._logits_owner = None

    def release(self) -> None:
        """Give the slot back but leave its tokens in the cache: the next query on this
        slot re-evaluates only what differs (a repeated prompt costs nothing)."""
        self.backend._kept[self.seq_id] = self.tokens
        self.tokens = []
        self.backend._free_ids.insert(0, self.seq_id)
