"""The backend protocol: what the runtime needs from a model engine.

A backend tokenizes to and from exact bytes, exposes its vocabulary as bytes (the masks
of the constraint engine are built from it), names its end tokens and chat template, and
hands out `Sequence`s: token streams whose evaluated prefix stays in the engine's cache.
`Sequence.logits(tokens)` makes the cache hold exactly `tokens` (evaluating only what is
not there yet) and returns the logits row after the last one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmq.errors import ModelError


@dataclass(frozen=True)
class Vocabulary:
    """Token ids → bytes, and the special ids a decoder needs."""

    token_bytes: tuple[bytes, ...]
    end_ids: frozenset[int]          # every end-of-generation token (EOS, EOT, …)
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool

    @property
    def size(self) -> int:
        return len(self.token_bytes)

    @property
    def prompt_start(self) -> list[int]:
        """The tokens every prompt begins with: BOS where the model adds one."""
        return [self.bos_id] if self.add_bos and self.bos_id is not None else []

    def nonempty(self, tokens: list[int]) -> list[int]:
        """`tokens`, or for an empty prompt what llama.cpp gives one: BOS where the model
        has one, else its document separator (EOS), so a query may begin with a hole on
        every model."""
        if tokens:
            return tokens
        start = self.bos_id if self.bos_id is not None else self.eos_id
        if start is None:
            raise ModelError("the prompt is empty and the model has neither a BOS nor an EOS "
                             "token to start from")
        return [start]


class Sequence(ABC):
    """One token stream in the backend's cache (a KV-cache sequence for llama.cpp)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    @abstractmethod
    def logits(self, tokens: list[int]) -> np.ndarray:
        """Bring the cache to exactly `tokens` (reusing the common prefix) and return the
        float32 logits row that follows the last token. The row is valid until the next
        call on any sequence of this backend."""

    @abstractmethod
    def advance(self, token: int) -> np.ndarray:
        """Append one token to the cached ones and return the logits row after it (the
        per-token hot path: no list comparison, no copy)."""

    def advance_later(self, token: int) -> Callable[[], np.ndarray]:
        """Start appending one token; the returned function gives the row after it. An
        engine that computes asynchronously (llama.cpp on a GPU) works while the caller
        prepares its next step before asking; here it is evaluated at once."""
        row = self.advance(token)
        return lambda: row

    def copy_from(self, other: "Sequence") -> None:
        """Hold exactly `other`'s tokens (a fork into this existing slot); engines that can
        copy cache cells override it to evaluate nothing."""
        self.logits(other.tokens)

    def truncate(self, length: int) -> bool:
        """Keep only the first `length` tokens' cells, evaluating nothing; False where the
        engine cannot (the caller then brings the cache to its tokens with `logits`)."""
        return False

    def rows(self, tokens: list[int], count: int) -> list[np.ndarray]:
        """`logits`, with the rows after each of the last `count` tokens (copies, in
        order). Engines that keep several rows of one batch (a backend that `speculates`)
        evaluate the tokens together; here the last ones are evaluated one by one."""
        first = len(tokens) - count + 1
        rows = [np.array(self.logits(tokens[:first]))]
        rows += [np.array(self.advance(token)) for token in tokens[first:]]
        return rows

    @abstractmethod
    def fork(self) -> "Sequence":
        """A new sequence sharing this one's cached tokens (no re-evaluation)."""

    @abstractmethod
    def release(self) -> None:
        """Free this sequence's cache slot."""


class Backend(ABC):
    """A model engine behind the runtime."""

    vocabulary: Vocabulary
    chat_template: str | None = None
    context_size: int
    #: prompt and generated tokens evaluated so far (each evaluation counts once)
    evaluated_tokens: int = 0
    #: whether `sequence()` gives logits rows; a backend without them decodes every hole
    #: itself (`generate_hole`: an inference engine that returns tokens)
    returns_rows: bool = True
    #: whether one evaluation returns rows at several positions (`advance_many`'s `rows`,
    #: `Sequence.rows`) and `Sequence.truncate` drops cells: the decoder then evaluates
    #: forced text together with a guess of the tokens after it (speculative evaluation)
    speculates: bool = False
    #: whether a wrong guess costs little next to a decode (an engine whose decode time is
    #: mostly fixed per call, as on a GPU); else the decoder guesses only a token the mask
    #: allows alone, since where compute is the cost (a CPU) every evaluated token and
    #: kept row costs as much in a batch as alone
    wrong_guesses_cheap: bool = False
    #: whether a decode runs while the caller goes on (llama.cpp with layers on a GPU):
    #: the scheduler then starts the next step of branches whose tokens it has drawn
    #: before their tasks take them (`advance_many_later`)
    decodes_async: bool = False

    @abstractmethod
    def tokenize(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of `text`, without BOS; `special` parses control-token text."""

    def detokenize(self, tokens: list[int]) -> bytes:
        """The exact bytes of `tokens` (control tokens contribute nothing)."""
        table = self.vocabulary.token_bytes
        return b"".join(table[t] for t in tokens)

    @abstractmethod
    def token_text(self, token: int) -> str:
        """The text form of a token, control tokens included (`<|im_end|>`)."""

    @abstractmethod
    def sequence(self) -> Sequence:
        """A new, empty sequence."""

    def advance_many(self, steps: list[tuple[Sequence, list[int]]],
                     rows: list[int] | None = None) -> list:
        """Append tokens to several sequences in one engine step (one multi-sequence batch
        where the engine has one) and return each sequence's logits row after its last new
        token, in order; where `rows[k]` > 1 (a backend that `speculates`), the list of
        rows after each of sequence k's last `rows[k]` new tokens. Rows are valid until the
        next call on this backend. Engines without batches evaluate the sequences one
        after another."""
        out: list = []
        for k, (sequence, tokens) in enumerate(steps):
            count = rows[k] if rows is not None else 1
            context = sequence.tokens + list(tokens)
            out.append(sequence.rows(context, count) if count > 1 else np.array(sequence.logits(context)))
        return out

    def advance_many_later(self, steps: list[tuple[Sequence, list[int]]],
                           rows: list[int] | None = None) -> Callable[[], list]:
        """Start `advance_many`; the returned function, called once, gives its rows
        (waiting for the engine where it computes asynchronously). The tokens are the
        sequences' at once; the rows are valid until the next call on this backend. Here
        it is evaluated at once."""
        out = self.advance_many(steps, rows)
        return lambda: out

    def describe(self) -> str:
        return type(self).__name__


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix; the usual case (b extends a) is one C-level compare."""
    if len(a) <= len(b) and b[:len(a)] == a:
        return len(a)
    n = min(len(a), len(b))
    common = 0
    while common < n and a[common] == b[common]:
        common += 1
    return common
