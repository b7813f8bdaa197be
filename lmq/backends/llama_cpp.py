"""llama.cpp in process, through llama-cpp-python's low-level API.

`Llama(...)` loads the model and context (so every llama.cpp keyword works as documented
there); decoding bypasses its high-level loop: our own `llama_batch`, `llama_decode`, and
the logits row read zero-copy from `llama_get_logits_ith`. Each `Sequence` is a KV-cache
sequence id; bringing it to a new token list removes only the divergent tail from the
cache and evaluates only the new suffix, so a prompt is never evaluated twice.
"""

from __future__ import annotations

import inspect
import os

import llama_cpp
import numpy as np

from lmq.backends.base import Sequence, common_prefix
from lmq.backends.gguf import GgufBackend, GgufVocab, check_gguf, silence_llama_log
from lmq.errors import ContextLimitError, ModelError, QueryArgumentError

_LLAMA_KEYWORDS = frozenset(inspect.signature(llama_cpp.Llama.__init__).parameters) - {"self", "kwargs", "model_path"}
_DEFAULTS = {"n_ctx": 4096, "n_threads": os.cpu_count() or 1}


class LlamaCppBackend(GgufBackend):
    """A GGUF model evaluated by llama.cpp in this process."""

    #: sequences of the unified KV cache: branches of a query and concurrent queries decode
    #: together (a single sequence measured no slower with 16 than with 1)
    DEFAULT_SEQUENCES = 16

    def __init__(self, path: str, n_seq_max: int = DEFAULT_SEQUENCES, **kwargs):
        unknown = sorted(set(kwargs) - _LLAMA_KEYWORDS)
        if unknown:
            raise QueryArgumentError(f"unknown llama.cpp argument{'s' if len(unknown) > 1 else ''}: "
                                     f"{', '.join(unknown)}")
        self.path = check_gguf(path)
        silence_llama_log()
        options = {**_DEFAULTS, **kwargs, "verbose": False}
        try:
            self.llama = llama_cpp.Llama(self.path, **options)
        except (ValueError, RuntimeError) as e:
            raise ModelError(f"llama.cpp could not load {path}: {e}") from None
        if n_seq_max > 1:
            self._use_sequences(n_seq_max)
        self.ctx = self.llama._ctx.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        super().__init__(GgufVocab(self.llama._model.model), self.path)
        self.context_size = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = self.llama.n_batch
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.gguf.vocab)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._free_ids = list(range(self.llama.context_params.n_seq_max))
        self._kept: dict[int, list[int]] = {}    # tokens a released sequence left in the cache
        self._logits_owner: tuple[int, int] | None = None   # (seq id, length) of current logits

    def _use_sequences(self, n_seq_max: int) -> None:
        """Llama() makes a one-sequence context; replace it by a unified multi-sequence one."""
        from llama_cpp import _internals

        params = self.llama.context_params
        params.n_seq_max = n_seq_max
        params.kv_unified = True
        self.llama._ctx.close()
        self.llama._ctx = _internals.LlamaContext(model=self.llama._model, params=params, verbose=False)

    def describe(self) -> str:
        return f"llama.cpp {self.path}"

    def sequence(self) -> "LlamaSequence":
        if not self._free_ids:
            raise ModelError(f"all {self.llama.context_params.n_seq_max} llama.cpp sequences are in "
                             "use (branches and concurrent queries): load the model with a larger "
                             "n_seq_max=")
        sequence = LlamaSequence(self, self._free_ids.pop(0))
        sequence.tokens = self._kept.pop(sequence.seq_id, [])
        return sequence

    def _decode(self, seq_id: int, tokens: list[int], start: int) -> None:
        """Evaluate `tokens` at positions start… of `seq_id`, in chunks of n_batch."""
        for offset in range(0, len(tokens), self.n_batch):
            chunk = tokens[offset:offset + self.n_batch]
            self._run_batch([(seq_id, token, start + offset + i, False) for i, token in enumerate(chunk)])
        self.evaluated_tokens += len(tokens)

    def _run_batch(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (seq id, token, position, wants logits) entries; the last
        entry always gets logits (row -1)."""
        batch = self._batch
        for i, (seq_id, token, position, wants_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = position
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = wants_logits
        batch.logits[len(entries) - 1] = 1
        batch.n_tokens = len(entries)
        status = llama_cpp.llama_decode(self.ctx, batch)
        if status == 1 and self._forget_kept():       # 1: no room in the KV cache
            status = llama_cpp.llama_decode(self.ctx, batch)
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

    def advance_many(self, steps: list[tuple["LlamaSequence", list[int]]]) -> list[np.ndarray]:
        """All sequences' new tokens in one llama_decode (chunked by n_batch); each row is
        a zero-copy view when one decode sufficed, else a copy."""
        entries = []
        for k, (sequence, tokens) in enumerate(steps):
            if not tokens:
                raise ModelError("advance_many needs at least one token per sequence")
            start = len(sequence.tokens)
            if start + len(tokens) > self.context_size:
                raise ContextLimitError(f"the context of {self.context_size} tokens is full")
            last = len(tokens) - 1
            entries.extend((k, sequence.seq_id, token, start + i, i == last) for i, token in enumerate(tokens))
        rows: list[np.ndarray] = [None] * len(steps)   # type: ignore[list-item]
        single = len(entries) <= self.n_batch
        for offset in range(0, len(entries), self.n_batch):
            chunk = entries[offset:offset + self.n_batch]
            self._run_batch([e[1:] for e in chunk])
            for i, (k, _, _, _, wants_logits) in enumerate(chunk):
                if wants_logits:
                    row = self._logits_row(i)
                    rows[k] = row if single else row.copy()
        for sequence, tokens in steps:
            sequence.tokens.extend(tokens)
        self.evaluated_tokens += len(entries)
        self._logits_owner = None
        return rows

    def _logits_row(self, index: int = -1) -> np.ndarray:
        pointer = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        self.llama.close()


class LlamaSequence(Sequence):
    def __init__(self, backend: LlamaCppBackend, seq_id: int):
        super().__init__()
        self.backend = backend
        self.seq_id = seq_id

    def logits(self, tokens: list[int]) -> np.ndarray:
        backend = self.backend
        if len(tokens) > backend.context_size:
            raise ContextLimitError(f"{len(tokens)} tokens do not fit the context of "
                                    f"{backend.context_size} tokens")
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
        backend = self.backend
        if len(self.tokens) >= backend.context_size:
            raise ContextLimitError(f"the context of {backend.context_size} tokens is full")
        backend._decode(self.seq_id, [token], len(self.tokens))
        self.tokens.append(token)
        backend._logits_owner = (self.seq_id, len(self.tokens))
        return backend._logits_row()

    def fork(self) -> "LlamaSequence":
        child = self.backend.sequence()
        llama_cpp.llama_memory_seq_rm(self.backend.memory, child.seq_id, 0, -1)
        llama_cpp.llama_memory_seq_cp(self.backend.memory, self.seq_id, child.seq_id, 0, -1)
        child.tokens = list(self.tokens)
        return child

    def release(self) -> None:
        """Give the slot back but leave its tokens in the cache: the next query on this
        slot re-evaluates only what differs (a repeated prompt costs nothing)."""
        self.backend._kept[self.seq_id] = self.tokens
        self.tokens = []
        self.backend._free_ids.insert(0, self.seq_id)

