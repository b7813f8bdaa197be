"""The per-token contract between the constraint engine and the decoder.

`TokenAutomaton` is everything a decoder may ask of a hole's automaton; the decoder
(lmq/runtime/decoders.py) calls nothing else. An automaton whose masks are cached per
state also keeps a token budget exactly (`exact_budget`, then `BudgetedTokenAutomaton`):
a byte automaton's, with or without a character budget. A grammar's masks are computed
per call and its budget is checked on its last token only (the decoder's `_final_mask`).
"""

from __future__ import annotations

from typing import Hashable, Protocol

from lmq.constraints.token_budget import TokenWindow
from lmq.constraints.token_masks import TokenMask


class TokenAutomaton(Protocol):
    """The per-hole token automaton of the constraint engine.

    `mask(state)` is the state's `TokenMask` (end tokens are never in it); `accepts(state)`
    says whether the value may end there. `advance` may consume the state it is given
    (grammar states are mutable): a caller that keeps a state for another branch takes
    `fork(state)` first. `forced` is the text every value must continue with
    (fast-forward); `complete(state)`, a finished value nothing may extend (the decoder
    ends the hole there without evaluating anything more). `strands_nothing`: the plain masks never lead to a state from which
    no token string ends a value, so a hole without a token budget needs no budget mask.
    """

    #: masks cached per state and a token budget kept exactly (`BudgetedTokenAutomaton`)
    exact_budget: bool

    @property
    def strands_nothing(self) -> bool: ...

    def initial(self) -> Hashable: ...

    def mask(self, state: Hashable) -> TokenMask: ...

    def advance(self, state: Hashable, token: int) -> Hashable: ...

    def accepts(self, state: Hashable) -> bool: ...

    def forced(self, state: Hashable) -> bytes: ...

    def fork(self, state: Hashable) -> Hashable: ...

    def complete(self, state: Hashable) -> bool: ...


class BudgetedTokenAutomaton(TokenAutomaton, Protocol):
    """A token automaton with `exact_budget`: masks within a token budget that never
    dead-end while a value fits, and whether a value can still end within one."""

    def budget_mask(self, state: Hashable, window: TokenWindow) -> TokenMask: ...

    def can_finish(self, state: Hashable, window: TokenWindow) -> bool: ...
