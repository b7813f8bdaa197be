"""The `random` backend: seeded logits with a real GGUF vocabulary, for tests.

Logits are i.i.d. Gumbel noise from a seeded generator, so the argmax over any allowed set
of tokens is a uniform draw from that set. The vocabulary and tokenizer come from a GGUF
(`vocab=PATH`, default: the default model's), so masks and stops see real token bytes.
"""

from __future__ import annotations

import functools

import numpy as np

from lmq.backends.base import Sequence, common_prefix
from lmq.backends.gguf import GgufBackend, GgufVocab, load_vocab_only
from lmq.errors import ContextLimitError


@functools.lru_cache(maxsize=8)
def _vocab(path: str) -> GgufVocab:
    return load_vocab_only(path)


class RandomBackend(GgufBackend):
    """Uniform over allowed tokens; counts evaluated tokens like a real engine would."""

    speculates = True
    wrong_guesses_cheap = True      # every guess is made, so tests see guesses rejected
    decodes_async = True            # the scheduler starts steps ahead, so tests see it

    def __init__(self, vocab: str, seed: int = 0, n_ctx: int = 4096, end_probability: float = 0.0):
        super().__init__(_vocab(vocab), vocab)
        self.context_size = n_ctx
        self.rng = np.random.default_rng(seed)
        self.end_probability = end_probability
        self._end_ids = np.fromiter(sorted(self.vocabulary.end_ids), dtype=np.int64)
        self._row = np.empty(self.vocabulary.size, dtype=np.float32)

    def describe(self) -> str:
        return f"random (vocabulary of {self.path})"

    def sequence(self) -> "RandomSequence":
        return RandomSequence(self)

    def _logits(self, tokens: list[int]) -> np.ndarray:
        """The row after `tokens` (a fresh draw: the noise does not depend on them)."""
        row = self._row
        row[:] = self.rng.gumbel(size=row.shape[0])
        if self.end_probability and self.rng.random() < self.end_probability:
            row[self._end_ids] = row.max() + 1.0
        return row


class RandomSequence(Sequence):
    def __init__(self, backend: RandomBackend):
        super().__init__()
        self.backend = backend

    def logits(self, tokens: list[int]) -> np.ndarray:
        backend = self.backend
        if len(tokens) > backend.context_size:
            raise ContextLimitError(f"{len(tokens)} tokens do not fit the context of "
                                    f"{backend.context_size} tokens")
        common = min(common_prefix(self.tokens, tokens), len(tokens) - 1)
        backend.evaluated_tokens += len(tokens) - common
        self.tokens = list(tokens)
        return backend._logits(self.tokens)

    def truncate(self, length: int) -> bool:
        del self.tokens[length:]
        return True

    def advance(self, token: int) -> np.ndarray:
        if len(self.tokens) >= self.backend.context_size:
            raise ContextLimitError(f"the context of {self.backend.context_size} tokens is full")
        self.tokens.append(token)
        self.backend.evaluated_tokens += 1
        return self.backend._logits(self.tokens)

    def fork(self) -> "RandomSequence":
        child = RandomSequence(self.backend)
        child.tokens = list(self.tokens)
        return child

    def release(self) -> None:
        self.tokens = []
