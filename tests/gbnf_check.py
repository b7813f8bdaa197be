"""llama.cpp's own GBNF engine as a test oracle: does a grammar accept a byte string?

`GbnfOracle(vocab_path)` loads a vocabulary-only GGUF whose vocabulary has a token for
every single byte (GPT-2's byte-level BPE does), then feeds a string byte by byte through
llama.cpp's grammar sampler (`llama_sampler_init_grammar`): a byte is allowed when
`llama_sampler_apply` leaves its one-candidate logit finite, and only allowed bytes are
accepted (accepting a rejected token aborts the process). The string is in the language
when every byte was allowed and, at the end, the end-of-generation token is allowed.
llama.cpp decodes partial UTF-8 across tokens itself, so multi-byte characters work.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import llama_cpp

from lmq.backends.gguf import load_vocab_only
from vocab_paths import vocab

VOCAB_DIR = Path(vocab("gpt-2")).parent
BYTE_VOCAB = VOCAB_DIR / "ggml-vocab-gpt-2.gguf"


class GbnfOracle:
    def __init__(self, vocab_path: str | Path = BYTE_VOCAB):
        self._gguf = load_vocab_only(str(vocab_path))     # keeps the model alive
        self.vocab = self._gguf.vocab
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.byte_tokens = self._single_byte_tokens()
        self._candidate = (llama_cpp.llama_token_data * 1)()
        self._array = llama_cpp.llama_token_data_array(
            data=self._candidate, size=1, selected=-1, sorted=False)

    def _single_byte_tokens(self) -> dict[int, int]:
        tokens: dict[int, int] = {}
        buffer = ctypes.create_string_buffer(64)
        for token in range(llama_cpp.llama_vocab_n_tokens(self.vocab)):
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, False)
            if n == 1 and buffer.raw[0] not in tokens:
                tokens[buffer.raw[0]] = token
        missing = sorted(set(range(256)) - set(tokens))
        if missing:
            raise ValueError(f"vocabulary has no single-byte token for bytes {missing[:8]}…")
        return tokens

    def sampler(self, grammar: str):
        """A fresh grammar sampler; ValueError if llama.cpp's parser rejects the grammar."""
        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not sampler:
            raise ValueError(f"llama.cpp rejected the grammar:\n{grammar}")
        return sampler

    def allowed(self, sampler, token: int) -> bool:
        self._candidate[0].id = token
        self._candidate[0].logit = 0.0
        self._candidate[0].p = 0.0
        self._array.size = 1
        self._array.selected = -1
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(self._array))
        return not math.isinf(self._candidate[0].logit)

    def accepts(self, grammar: str, data: bytes) -> bool:
        """Whether the grammar derives exactly `data` (every byte allowed, then the end)."""
        return self._feed(grammar, data, then_end=True)

    def allowed_prefix(self, grammar: str, data: bytes) -> bool:
        """Whether every byte of `data` is allowed (a prefix of some derivation)."""
        return self._feed(grammar, data, then_end=False)

    def _feed(self, grammar: str, data: bytes, then_end: bool) -> bool:
        sampler = self.sampler(grammar)
        try:
            for byte in data:
                token = self.byte_tokens[byte]
                if not self.allowed(sampler, token):
                    return False
                llama_cpp.llama_sampler_accept(sampler, token)
            return self.allowed(sampler, self.eos) if then_end else True
        finally:
            llama_cpp.llama_sampler_free(sampler)
