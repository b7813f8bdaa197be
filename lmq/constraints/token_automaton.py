"""The per-token contract between the constraint engine and the decoder."""

from __future__ import annotations

from typing import Hashable, Protocol

from lmq.constraints.token_masks import TokenMask


class TokenAutomaton(Protocol):
    """The per-hole token automaton of the constraint engine.

    `mask(state)` is the state's `TokenMask` (computed once per state and cached by the
    engine; end tokens are never in it); `accepts(state)` says whether the value may end
    there. `advance` may consume the state it is given (grammar states are mutable): a
    caller that keeps a state for another branch takes `fork(state)` first. `forced` is
    the text every value must continue with (fast-forward).
    """

    def initial(self) -> Hashable: ...

    def mask(self, state: Hashable) -> TokenMask: ...

    def advance(self, state: Hashable, token: int) -> Hashable: ...

    def accepts(self, state: Hashable) -> bool: ...

    def forced(self, state: Hashable) -> bytes: ...

    def fork(self, state: Hashable) -> Hashable: ...
