"""Token budgets over a DFA token automaton: which states can still end a value within
the token counts a `len(TOKENS(X))` budget allows (`TokenWindow`).

A budget must never dead-end while a value fits, and must never allow a token after
which no value fits: the decoder keeps exactly the tokens whose successor state has a
token string to a value end (an accepting or exit state) whose length the window allows.
`BudgetLengths` answers that per state, cheapest first:

- byte lengths: a byte path of length n to a value end over bytes that are tokens of
  their own (nearly all bytes, in GGUF vocabularies) is a token path of n tokens; the
  shortest and the longest such path (per state, computed once over the DFA) settle
  most questions, and their maximum/minimum over every state a token walk can reach
  from a state tells that its whole mask fits (no per-token work at all);
- token lengths: otherwise the exact set of token counts ≤ a horizon, as the bits of a
  Python int, by a least fixpoint over the token-level graph (the distinct states each
  allowed token leads to, computed once per state through the automaton's trie walk),
  explored only from the states asked about.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from lmq.constraints.byte_dfa import DEAD, ByteDfa

INFINITE = float("inf")


@dataclass(frozen=True)
class TokenWindow:
    """The token counts a value may still take: `low` … `high` (None: no upper bound),
    none of `excluded` (kept only within the bounds, so equal windows compare equal)."""

    low: int
    high: int | None
    excluded: frozenset[int]

    def __post_init__(self) -> None:
        # windows key the per-step mask caches: hashed once, not per lookup
        object.__setattr__(self, "_hash", hash((self.low, self.high, self.excluded)))

    def __hash__(self) -> int:
        return self._hash

    @staticmethod
    def of(low: int, high: int | None, excluded=frozenset()) -> "TokenWindow":
        low = max(low, 0)
        kept = frozenset(n for n in excluded if n >= low and (high is None or n <= high))
        return TokenWindow(low, high, kept)

    def after(self, count: int) -> "TokenWindow":
        """The window once `count` more tokens are taken."""
        return TokenWindow.of(self.low - count, None if self.high is None else self.high - count,
                              frozenset(n - count for n in self.excluded))

    @property
    def unbounded(self) -> bool:
        """Every count is allowed (no budget left to enforce)."""
        return self.low == 0 and self.high is None and not self.excluded

    @property
    def top(self) -> int:
        """The largest count the window names: above it every count is allowed (no upper
        bound) or none is."""
        if self.high is not None:
            return self.high
        return max(self.low, max(self.excluded, default=0))

    def holds(self, count: float) -> bool:
        return (self.low <= count and (self.high is None or count <= self.high)
                and count not in self.excluded)

    def bits(self, horizon: int) -> int:
        """The allowed counts up to `horizon`, as bits of an int."""
        top = horizon if self.high is None else min(self.high, horizon)
        if top < self.low:
            return 0
        bits = (1 << (top + 1)) - (1 << self.low)
        for n in self.excluded:
            bits &= ~(1 << n)
        return bits


class BudgetLengths:
    """Per state of one DFA token automaton: whether a value can end within a window.

    `single` and `present` (bool per byte) are the bytes that are tokens of their own and
    the bytes found in any token: byte paths over `single` bytes are token paths, and no
    token walk takes a byte that is not `present`. `successors(state)` gives the distinct
    states the allowed tokens of a state lead to (the automaton's trie walk).
    """

    def __init__(self, dfa: ByteDfa, single: np.ndarray, present: np.ndarray,
                 successors: Callable[[int], Sequence[int]]):
        self._successors = successors
        self._ends = (dfa.accepting | dfa.exits).tolist()
        self._exits = dfa.exits.tolist()
        byte_class, table = dfa.byte_classes
        self._spelled = _class_successors(table, byte_class, single)
        self._walked = _class_successors(table, byte_class, present)
        self._shortest = self._shortest_paths(self._spelled)
        self._longest = self._longest_paths(self._spelled)
        self._longest_walked: list[float] | None = None
        self._reach: dict[int, tuple[float, float]] = {}
        self._graph: dict[int, tuple[int, ...]] = {}       # token-level successors
        self._lengths: dict[int, int] = {}                 # token counts to a value end
        self._horizon = -1

    def strands_nothing(self, state: int) -> bool:
        """Whether every state a token string from `state` can reach ends a value on
        single-byte tokens (then no allowed token leaves the value stranded)."""
        return self._reach_summary(state)[0] < INFINITE

    def fits_everywhere(self, state: int, window: TokenWindow) -> bool:
        """Whether every state reachable from `state` by one byte or more can end a value
        within `window` on single-byte tokens (then no allowed token needs checking)."""
        farthest, least_longest = self._reach_summary(state)
        if window.unbounded:
            return farthest < INFINITE
        if window.high is None:
            return least_longest > window.top
        return window.low == 0 and not window.excluded and farthest <= window.high

    def can_finish(self, state: int, window: TokenWindow) -> bool:
        """Whether some token string from `state` ends a value after a count `window`
        allows (0: the state itself ends one)."""
        if state == DEAD or (window.high is not None and window.high < window.low):
            return False
        shortest = self._shortest[state]            # inf: no end on single-byte tokens
        if (shortest < INFINITE and window.holds(shortest)) or window.holds(self._longest[state]):
            return True                 # (with no upper bound, a longest path above `top` holds)
        horizon = window.top
        if window.high is None:
            if self._longest_walked is None:
                self._longest_walked = self._longest_paths(self._walked)
            if self._longest_walked[state] > horizon:   # a token string longer than `top`
                horizon += len(self._ends)              # exists iff one this short does
        return self._token_lengths(state, horizon) & window.bits(horizon) != 0

    def _shortest_paths(self, successors: list[list[int]]) -> list[float]:
        """Per state, the fewest bytes to a value end over `successors` (breadth first on
        reversed edges; inf where none ends)."""
        predecessors: list[list[int]] = [[] for _ in self._ends]
        for source, targets in enumerate(successors):
            for target in targets:
                predecessors[target].append(source)
        shortest = [0.0 if end else INFINITE for end in self._ends]
        queue = deque(state for state, end in enumerate(self._ends) if end)
        while queue:
            state = queue.popleft()
            for source in predecessors[state]:
                if shortest[source] == INFINITE:
                    shortest[source] = shortest[state] + 1
                    queue.append(source)
        shortest[DEAD] = INFINITE
        return shortest

    def _longest_paths(self, edges: list[list[int]]) -> list[float]:
        """Per state, the most bytes to a value end over `edges` (inf where a cycle on
        the way to one is reachable; -inf where none ends)."""
        ending = [length < INFINITE for length in self._shortest_paths(edges)]
        successors = [[t for t in targets if ending[t]] for targets in edges]
        longest: list[float] = [-INFINITE] * len(successors)
        colour = [0] * len(successors)           # 0 new, 1 on the stack, 2 done
        for root in range(1, len(successors)):
            if colour[root] or not ending[root]:
                continue
            stack = [(root, iter(successors[root]))]
            colour[root] = 1
            while stack:
                node, children = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    colour[node] = 2
                    best = 0.0 if self._ends[node] else -INFINITE
                    for c in successors[node]:
                        best = max(best, 1.0 + longest[c])
                    longest[node] = best
                elif colour[child] == 1:
                    longest[child] = INFINITE         # a back edge: on a cycle
                elif colour[child] == 0:
                    colour[child] = 1
                    stack.append((child, iter(successors[child])))
        changed = True
        while changed:                                # whatever reaches a cycle is unbounded
            changed = False
            for node, children in enumerate(successors):
                if longest[node] != INFINITE and any(longest[c] == INFINITE for c in children):
                    longest[node] = INFINITE
                    changed = True
        return longest

    def _reach_summary(self, state: int) -> tuple[float, float]:
        """(the largest shortest and the smallest longest byte path to a value end, on
        single-byte tokens) over the states token walks reach from `state` by one byte or
        more."""
        summary = self._reach.get(state)
        if summary is None:
            seen = set(self._walked[state])
            stack = list(seen)
            while stack:
                for successor in self._walked[stack.pop()]:
                    if successor not in seen:
                        seen.add(successor)
                        stack.append(successor)
            summary = self._reach[state] = (
                max((self._shortest[s] for s in seen), default=0.0),
                min((self._longest[s] for s in seen), default=INFINITE))
        return summary

    def _token_lengths(self, state: int, horizon: int) -> int:
        """The token counts ≤ `horizon` of token strings from `state` to a value end, as
        bits: the least fixpoint of bits(s) = end(s) | bits(t) << 1 over the token-level
        successors t of s, on every state explored so far (a closed set)."""
        if state not in self._graph or horizon > self._horizon:
            self._explore(state)
            self._horizon = max(horizon, self._horizon)
            limit = (1 << (self._horizon + 1)) - 1
            lengths = {s: int(self._ends[s]) for s in self._graph}
            changed = True
            while changed:
                changed = False
                for source, targets in self._graph.items():
                    bits = lengths[source]
                    for target in targets:
                        bits |= lengths[target] << 1
                    bits &= limit
                    if bits != lengths[source]:
                        lengths[source] = bits
                        changed = True
            self._lengths = lengths
        return self._lengths[state] & ((1 << (horizon + 1)) - 1)

    def _explore(self, state: int) -> None:
        """Add the token-level successors of every state reachable from `state`."""
        stack = [state]
        while stack:
            source = stack.pop()
            if source in self._graph:
                continue
            targets = (source,) if self._exits[source] else tuple(self._successors(source))
            self._graph[source] = targets
            stack.extend(t for t in targets if t not in self._graph)


def _class_successors(table: np.ndarray, byte_class: np.ndarray, usable: np.ndarray) -> list[list[int]]:
    """Per state, the distinct live states one `usable` byte leads to (over the DFA's
    byte classes: a class is usable if one of its bytes is)."""
    classes = np.zeros(table.shape[1], dtype=bool)
    classes[byte_class[usable]] = True
    return [sorted({int(t) for t in row if t != DEAD}) for row in table[:, classes].tolist()]
