"""GGUF files through llama.cpp's C API: validation, vocabulary, tokenizer, chat template.

Shared by the in-process llama.cpp backend (full model) and the random backend
(vocabulary only), so both see exactly the same token bytes.
"""

from __future__ import annotations

import ctypes
import os
import threading

import llama_cpp

from lmq.backends.base import Backend, Vocabulary
from lmq.errors import ModelError


@llama_cpp.llama_log_callback
def _drop_log(level, text, user_data):
    return None


def show_llama_log(shown: bool = False) -> None:
    """llama.cpp logs every load to stderr; lmq's own messages are what a user reads, so
    the log goes nowhere unless asked for (`verbose=True` on a model, or LMQ_DEBUG set)."""
    if shown or os.environ.get("LMQ_DEBUG"):
        llama_cpp.llama_log_set(None, ctypes.c_void_p(0))
    else:
        llama_cpp.llama_log_set(_drop_log, ctypes.c_void_p(0))


def check_gguf(path: str) -> str:
    """The resolved path of a readable GGUF file, else a `ModelError` naming the path."""
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(resolved):
        raise ModelError(f"model file not found: {path}")
    try:
        with open(resolved, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"model file {path} cannot be read: {e.strerror}") from None
    if magic != b"GGUF":
        raise ModelError(f"model file {path} is not a GGUF file")
    return resolved


class GgufVocab:
    """Tokenizer and vocabulary of a loaded llama.cpp model (`llama_model *`)."""

    def __init__(self, model: llama_cpp.llama_model_p):
        self.model = model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self._buffer = (llama_cpp.llama_token * 4096)()
        self._buffer_lock = threading.Lock()     # queries in several threads share the buffer
        self._vocabulary: Vocabulary | None = None

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        with self._buffer_lock:
            if capacity > len(self._buffer):
                self._buffer = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), self._buffer,
                                         len(self._buffer), False, special)
            if n < 0:
                raise ModelError(f"tokenization of {len(data)} bytes failed")
            return self._buffer[:n]

    def vocabulary(self) -> Vocabulary:
        if self._vocabulary is None:
            self._vocabulary = self._read_vocabulary()
        return self._vocabulary

    def _read_vocabulary(self) -> Vocabulary:
        vocab = self.vocab
        n = llama_cpp.llama_vocab_n_tokens(vocab)
        buffer = ctypes.create_string_buffer(512)
        table = []
        for token in range(n):
            length = llama_cpp.llama_token_to_piece(vocab, token, buffer, 512, 0, False)
            table.append(buffer.raw[:max(length, 0)])
        ends = frozenset(t for t in range(n) if llama_cpp.llama_vocab_is_eog(vocab, t))

        def special(token: int) -> int | None:
            return token if token >= 0 else None

        return Vocabulary(token_bytes=tuple(table), end_ids=ends,
                          bos_id=special(llama_cpp.llama_vocab_bos(vocab)),
                          eos_id=special(llama_cpp.llama_vocab_eos(vocab)),
                          eot_id=special(llama_cpp.llama_vocab_eot(vocab)),
                          add_bos=bool(llama_cpp.llama_vocab_get_add_bos(vocab)))

    def token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self.model, None)
        return template.decode("utf-8") if template else None

    def metadata(self, key: str) -> str | None:
        buffer = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buffer, 256)
        return buffer.value.decode("utf-8", "replace") if n >= 0 else None


def load_vocab_only(path: str) -> GgufVocab:
    """Load just the tokenizer of a GGUF (no weights, no context)."""
    resolved = check_gguf(path)
    show_llama_log()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(resolved.encode(), params)
    if not model:
        raise ModelError(f"model file {path} could not be loaded by llama.cpp")
    return GgufVocab(model)


class GgufBackend(Backend):
    """A backend whose tokenizer, vocabulary and chat template come from a GGUF."""

    def __init__(self, gguf: GgufVocab, path: str):
        self.gguf = gguf
        self.path = path
        self.vocabulary = gguf.vocabulary()
        self.chat_template = gguf.chat_template()

    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        return self.gguf.tokenize(text, special=special)

    def token_text(self, token: int) -> str:
        return self.gguf.token_text(token)
