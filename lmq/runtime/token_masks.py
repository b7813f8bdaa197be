"""Token masks of a byte automaton over a model vocabulary: `DfaTokenAutomaton`, `TokenMask`.

A token is allowed in a DFA state iff walking its bytes from there never reaches DEAD
(state 0). The DFA is trimmed (every state that cannot reach an accepting or exit state is
DEAD) and exit states are absorbing, so this is exact: an allowed token always has a
completion to a value, and a token reaching an exit state mid-way is allowed with the rest
of it as overshoot.

A mask is computed once per state, walking the vocabulary trie (`VocabularyIndex`) one
level at a time: the live (node, state) pairs of a level are expanded to their children
and pushed through the transition table in one gather, pairs reaching DEAD are dropped,
and pairs reaching an exit state contribute their whole subtree of tokens without being
walked further. The cost is proportional to the live part of the trie, not to V.

How a decoder applies a mask to a float32 logits row, fastest first:

- greedy choice: `mask.best(row)` (sparse: argmax over the gathered `row[allowed]`;
  dense: one `np.add(row, bias)` into a scratch row, then argmax);
- a full masked row (sampling, log-probabilities): `mask.apply(row, out)` (sparse: fill
  with -inf and scatter `row[allowed]`; dense: `np.add(row, bias, out=out)`).

End tokens are never in a mask (their bytes are empty): the decoder allows them itself
when `accepts(state)` holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmq.backends.base import Vocabulary
from lmq.backends.vocabulary_index import VocabularyIndex, concatenated_ranges, vocabulary_index

#: a mask allowing more than this fraction of the vocabulary keeps a dense bias row:
#: gathering and scattering `count` scattered ids costs more than one pass over V beyond it
DENSE_FRACTION = 0.125
DEAD = 0


@dataclass(frozen=True, eq=False)
class TokenMask:
    """The tokens allowed in one automaton state (computed once, shared, never mutated)."""

    allowed: np.ndarray          # int32, sorted token ids
    size: int                    # vocabulary size V
    bias: np.ndarray | None      # float32 (V,): 0 allowed, -inf masked; dense masks only

    @staticmethod
    def of(allowed: np.ndarray, size: int) -> "TokenMask":
        """A mask of sorted `allowed` ids, dense (with a bias row) above `DENSE_FRACTION`."""
        bias = None
        if len(allowed) > DENSE_FRACTION * size:
            bias = np.full(size, -np.inf, dtype=np.float32)
            bias[allowed] = 0.0
        allowed.flags.writeable = False
        if bias is not None:
            bias.flags.writeable = False
        return TokenMask(allowed, size, bias)

    @property
    def count(self) -> int:
        return len(self.allowed)

    @property
    def dense(self) -> bool:
        return self.bias is not None

    def best(self, row: np.ndarray, scratch: np.ndarray | None = None) -> int:
        """The allowed token with the highest score in `row`, or -1 if none is allowed.
        `scratch` (float32, length V) spares a dense mask an allocation."""
        if self.count == 0:
            return -1
        if self.bias is None:
            return int(self.allowed[np.argmax(row[self.allowed])])
        if scratch is None:
            scratch = np.empty(self.size, dtype=np.float32)
        return int(np.argmax(np.add(row, self.bias, out=scratch)))

    def apply(self, row: np.ndarray, out: np.ndarray) -> np.ndarray:
        """`out` = `row` with every token not allowed at -inf (`row` is not written)."""
        if self.bias is not None:
            return np.add(row, self.bias, out=out)
        out.fill(-np.inf)
        out[self.allowed] = row[self.allowed]
        return out

    def __contains__(self, token: int) -> bool:
        position = int(np.searchsorted(self.allowed, token))
        return position < self.count and int(self.allowed[position]) == token


class DfaTokenAutomaton:
    """The token automaton of a trimmed byte DFA (`lmq.compiler.automaton.ByteDfa`) over one
    vocabulary: states are the DFA's state numbers; masks, successors and forced bytes are
    computed on first use and cached."""

    def __init__(self, dfa, index: VocabularyIndex, token_bytes: tuple[bytes, ...]):
        self.dfa = dfa
        self.index = index
        self.token_bytes = token_bytes
        self._flat = np.ascontiguousarray(dfa.transitions, dtype=np.int32).ravel()
        self._accepting = dfa.accepting.tolist()
        self._exits_array = np.asarray(dfa.exits, dtype=bool)
        self._exits = self._exits_array.tolist()
        self._has_exits = bool(self._exits_array.any())
        self._rows: dict[int, list[int]] = {}
        self._masks: dict[int, TokenMask] = {}
        self._next: dict[tuple[int, int], int] = {}
        self._forced: dict[int, bytes] = {}

    @classmethod
    def for_vocabulary(cls, dfa, vocabulary: Vocabulary) -> "DfaTokenAutomaton":
        """The automaton of `dfa` over `vocabulary` (its index shared and disk-cached)."""
        return cls(dfa, vocabulary_index(vocabulary), vocabulary.token_bytes)

    def initial(self) -> int:
        return int(self.dfa.initial)

    def accepts(self, state: int) -> bool:
        return self._accepting[state]

    def is_exit(self, state: int) -> bool:
        return self._exits[state]

    def mask(self, state: int) -> TokenMask:
        mask = self._masks.get(state)
        if mask is None:
            mask = self._masks[state] = TokenMask.of(self._allowed(state), self.index.size)
        return mask

    def advance(self, state: int, token: int) -> int:
        """The state after `token`'s bytes (DEAD if the token was not allowed)."""
        key = (state, token)
        successor = self._next.get(key)
        if successor is None:
            successor = state
            for byte in self.token_bytes[token]:
                if successor == DEAD or self._exits[successor]:
                    break
                successor = self._row(successor)[byte]
            self._next[key] = successor
        return successor

    def forced(self, state: int) -> bytes:
        """The bytes every value must continue with from `state`, up to the first state
        that accepts, exits or has a choice of bytes."""
        forced = self._forced.get(state)
        if forced is None:
            helper = getattr(self.dfa, "forced_bytes", None)
            forced = self._forced[state] = helper(state) if helper else self._forced_walk(state)
        return forced

    def _forced_walk(self, state: int) -> bytes:
        forced = bytearray()
        seen = set()
        while (state != DEAD and not self._accepting[state] and not self._exits[state]
               and state not in seen):
            seen.add(state)
            live = np.flatnonzero(self.dfa.transitions[state])
            if len(live) != 1:
                break
            forced.append(int(live[0]))
            state = self._row(state)[forced[-1]]
        return bytes(forced)

    def _row(self, state: int) -> list[int]:
        row = self._rows.get(state)
        if row is None:
            row = self._rows[state] = self._flat[state * 256:(state + 1) * 256].tolist()
        return row

    def _allowed(self, state: int) -> np.ndarray:
        """Sorted ids of the tokens whose walk from `state` never reaches DEAD."""
        index = self.index
        if state == DEAD:
            return np.empty(0, dtype=np.int32)
        flat, exits, child_start = self._flat, self._exits_array, index.child_start
        nodes = np.arange(index.root_children, dtype=np.int32)
        states = flat[state * 256 + index.byte[:index.root_children]]
        live_nodes: list[np.ndarray] = []
        exit_nodes: list[np.ndarray] = []
        while True:
            keep = states != DEAD
            nodes, states = nodes[keep], states[keep]
            if self._has_exits:
                leaving = exits[states]
                if leaving.any():
                    exit_nodes.append(nodes[leaving])
                    staying = ~leaving
                    nodes, states = nodes[staying], states[staying]
            if not nodes.size:
                break
            live_nodes.append(nodes)
            first = child_start[nodes]
            children = child_start[nodes + 1] - first
            nodes = concatenated_ranges(first, children)
            if not nodes.size:
                break
            states = flat[np.repeat(states * 256, children) + index.byte[nodes]]
        # live nodes allow the tokens that end there; exit nodes their whole subtree
        live = np.concatenate(live_nodes) if live_nodes else np.empty(0, dtype=np.int32)
        leaving = np.concatenate(exit_nodes) if exit_nodes else np.empty(0, dtype=np.int32)
        starts = np.concatenate((index.lo[live], index.lo[leaving]))
        counts = np.concatenate((index.exact[live], index.hi[leaving] - index.lo[leaving]))
        allowed = index.order[concatenated_ranges(starts, counts)]
        allowed.sort()
        return allowed
