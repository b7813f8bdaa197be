"""The raw loop of `performance.md`: the physical limit every lmq figure is compared with.

Same GGUF, same process, same threads, no constraint and no other work: one `llama_decode`
per generated token on a one-token batch, the logits row read zero-copy through
`llama_get_logits_ith`, `numpy.argmax`. `RawLoop` owns a llama.cpp context of its own on
a model lmq loaded (`LlamaModel`: sharing its weights, a copy of its context parameters,
flash attention and offload included), so lmq's backend and the raw loop differ only in
what they do per token.

The n-sequence form (`generate_batch`) decodes n sequences together, one token each per
`llama_decode` (the reference of the branching and server benches).

Timing starts with the prompt's last token: everything before it is evaluated first,
untimed, so n generated tokens cost exactly n decodes, as in an lmq hole whose prompt is
already in the cache.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import llama_cpp
import numpy as np

from lmq.backends.llama_model import LlamaModel


@dataclass(frozen=True)
class RawRun:
    """What one timed run produced: the tokens of each sequence and the decoding time."""

    tokens: list[list[int]]
    seconds: float

    @property
    def token_count(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        """Aggregate throughput over every sequence."""
        return self.token_count / self.seconds


class RawLoop:
    """A llama.cpp context on a loaded model, decoded with nothing but the C API."""

    def __init__(self, model: LlamaModel, n_seq_max: int = 1, owned: bool = False):
        self.model = model
        self.owned = owned
        self.ctx = model.new_context(n_seq_max=n_seq_max, kv_unified=n_seq_max > 1)
        self.n_seq_max = n_seq_max
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(model.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.n_batch = llama_cpp.llama_n_batch(self.ctx)
        self._batch = llama_cpp.llama_batch_init(max(self.n_batch, n_seq_max), 0, 1)

    @classmethod
    def load(cls, path: str, *, n_seq_max: int = 1, **options) -> "RawLoop":
        """Load `path` on its own with lmq's llama.cpp defaults and `options` (the model
        keywords of `local:llama.cpp:`); closing the loop frees the model."""
        return cls(LlamaModel(path, **options), n_seq_max, owned=True)

    def tokenize(self, text: str) -> list[int]:
        """The prompt tokens of `text` as the model sees them (BOS added where it wants one)."""
        data = text.encode("utf-8")
        buffer = (llama_cpp.llama_token * (len(data) + 16))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), True, False)
        return buffer[:n]

    def generate(self, prompt: Sequence[int], n_tokens: int,
                 follow: Sequence[int] | None = None) -> RawRun:
        """Greedy decoding of `n_tokens` after `prompt`, timed from the prompt's last token.
        With `follow`, those tokens are fed instead of the argmax (which is still taken)."""
        return self.generate_batch(prompt, n_tokens, 1, None if follow is None else [follow])

    def generate_batch(self, prompt: Sequence[int], n_tokens: int, n_sequences: int,
                       follow: Sequence[Sequence[int]] | None = None) -> RawRun:
        """`n_sequences` copies of `prompt` decoded together, one `llama_decode` of one token
        per sequence per step, each row read and argmaxed; `follow[k]` feeds sequence k."""
        if not 1 <= n_sequences <= self.n_seq_max:
            raise ValueError(f"{n_sequences} sequences: this loop has room for 1 … {self.n_seq_max}")
        if len(prompt) + n_sequences * n_tokens > self.n_ctx:
            raise ValueError(f"{len(prompt)} prompt tokens + {n_sequences} × {n_tokens} do not fit "
                             f"the context of {self.n_ctx}")
        if follow is not None and (len(follow) != n_sequences or any(len(f) < n_tokens for f in follow)):
            raise ValueError(f"follow needs {n_sequences} token lists of at least {n_tokens} tokens")
        self._prefill(prompt, n_sequences)
        generated: list[list[int]] = [[] for _ in range(n_sequences)]
        feed = [prompt[-1]] * n_sequences
        position = len(prompt) - 1
        ctx, batch, n_vocab = self.ctx, self._batch, self.n_vocab
        decode, logits_ith = llama_cpp.llama_decode, llama_cpp.llama_get_logits_ith
        as_array = np.ctypeslib.as_array
        start = time.perf_counter()
        for step in range(n_tokens):
            for k in range(n_sequences):
                batch.token[k] = feed[k]
                batch.pos[k] = position
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = k
                batch.logits[k] = 1
            batch.n_tokens = n_sequences
            if decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed at position {position}")
            for k in range(n_sequences):
                choice = int(as_array(logits_ith(ctx, k), shape=(n_vocab,)).argmax())
                token = choice if follow is None else follow[k][step]
                generated[k].append(token)
                feed[k] = token
            position += 1
        return RawRun(generated, time.perf_counter() - start)

    def _prefill(self, prompt: Sequence[int], n_sequences: int) -> None:
        """Clear the cache and evaluate all but the prompt's last token into every sequence."""
        if not prompt:
            raise ValueError("the raw loop needs a prompt of at least one token")
        llama_cpp.llama_memory_clear(self.memory, True)
        head = list(prompt[:-1])
        batch = self._batch
        for offset in range(0, len(head), self.n_batch):
            chunk = head[offset:offset + self.n_batch]
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = offset + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 0
            batch.n_tokens = len(chunk)
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on the prompt")
        for k in range(1, n_sequences):
            llama_cpp.llama_memory_seq_cp(self.memory, 0, k, 0, -1)
        llama_cpp.llama_synchronize(self.ctx)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self.ctx)
            self._batch = None
            if self.owned:
                self.model.close()

