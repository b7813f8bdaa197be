"""llama.cpp's GBNF grammar sampler as the reference for whole token masks: a walk
through a `GrammarTokenAutomaton` whose every mask must equal what llama.cpp allows."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class LlamaGrammar:
    """llama.cpp's own GBNF grammar sampler over a vocabulary: the reference semantics."""

    def __init__(self, gguf, text: str):
        self.gguf = gguf
        self.sampler = llama_cpp.llama_sampler_init_grammar(gguf.vocab, text.encode(), b"root")

    @property
    def valid(self) -> bool:
        return bool(self.sampler)

    def allowed(self, candidates: np.ndarray) -> np.ndarray:
        """The candidate ids the grammar leaves at a finite logit."""
        data = np.zeros(len(candidates), dtype=_TOKEN_DATA)
        data["id"] = candidates
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
            size=len(data), selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(array))
        return candidates[np.isfinite(data["logit"])]

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def __del__(self):
        if self.sampler:
            llama_cpp.llama_sampler_free(self.sampler)


#: completions of any unfinished UTF-8 sequence (a second byte from each range some lead
#: byte requires, then plain continuation bytes)
_COMPLETIONS = [b""] + [bytes([first]) + b"\x80" * more for more in range(3) for first in (0x80, 0x90, 0xA0)]


def _valid_utf8_prefix(data: bytes) -> bool:
    for completion in _COMPLETIONS:
        try:
            (data + completion).decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def checked_walk(automaton, reference, vocabulary, rng, steps: int, tokens_out: list[int]) -> bool:
    """Follow random allowed tokens (mostly short ones), checking at every step that the
    mask equals the tokens llama.cpp allows and that `accepts` agrees with llama.cpp
    allowing end-of-sequence; True when the walk ended in an accepting state."""
    ends = np.array(sorted(vocabulary.end_ids), dtype=np.int32)
    texted = np.array([t for t, data in enumerate(vocabulary.token_bytes) if data], dtype=np.int32)
    lengths = np.array([len(data) for data in vocabulary.token_bytes])
    state = automaton.initial()
    for _ in range(steps):
        mask = automaton.mask(state)
        expected = np.setdiff1d(reference.allowed(texted), ends)
        text = b"".join(vocabulary.token_bytes[t] for t in tokens_out)
        extra = [vocabulary.token_bytes[t] for t in np.setdiff1d(mask.allowed, expected)]
        # llama.cpp's UTF-8 decoder is lax (overlong forms, bytes F5-FF match negated
        # classes); lmq never produces invalid UTF-8, so such tokens are not missing
        missing = [data for data in (vocabulary.token_bytes[t] for t in np.setdiff1d(expected, mask.allowed))
                   if _valid_utf8_prefix(text + data)]
        if extra or missing:
            pytest.fail(f"after {text!r}: only lmq allows {extra[:8]}, only llama.cpp {missing[:8]}")
        assert automaton.accepts(state) == (len(reference.allowed(ends[:1])) == 1)
        if automaton.accepts(state) and (mask.count == 0 or rng.random() < 0.5):
            return True
        if mask.count == 0:
            return False
        choices = mask.allowed
        if rng.random() < 0.7:       # mostly short tokens, so that walks reach their end
            short = choices[lengths[choices] <= 1]
            choices = short if len(short) else choices
        token = int(choices[rng.integers(len(choices))])
        tokens_out.append(token)
        state = automaton.advance(state, token)
        reference.accept(token)
    return automaton.accepts(state)
