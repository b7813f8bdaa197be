"""Token masks of a byte automaton over a model vocabulary: `DfaTokenAutomaton`, `TokenMask`.

A token is allowed in a DFA state iff walking its bytes from there never reaches DEAD
(state 0). The DFA is trimmed (every state that cannot reach an accepting or exit state is
DEAD) and exit states are absorbing, so this is exact: an allowed token always has a
completion to a value, and a token reaching an exit state mid-way is allowed with the rest
of it as overshoot.

A mask is computed once per state, walking the vocabulary trie (`VocabularyIndex`) one
level at a time: the live (node, state) pairs of a level are expanded to their children
and pushed through the transition table in one gather, pairs reaching DEAD are dropped,
and a node whose whole subtree keeps its state alive (an exit state, or only bytes the
state loops on) contributes its subtree of tokens without being walked further. The cost
is proportional to the part of the trie that decides, not to V. Automata whose states
keep nearly every token alive, with few byte classes (`len(X) < N`), switch to the much
smaller trie of class strings (`lmq.constraints.class_patterns`).

A mask is sparse (its sorted allowed ids) up to `DENSE_FRACTION` of the vocabulary, else
dense (a packed bit row); lmq/constraints/token_choice.py applies either to a logits row
and picks or draws a token.

End tokens are never in a mask (their bytes are empty): the decoder allows them itself
when `accepts(state)` holds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from lmq.backends.base import Vocabulary
from lmq.constraints import token_choice
from lmq.constraints.byte_dfa import ByteDfa, forced_bytes
from lmq.constraints.class_patterns import ClassPatterns, class_patterns
from lmq.constraints.token_budget import BudgetLengths, TokenWindow
from lmq.constraints.vocabulary_cache import VocabularyCache, vocabulary_cache
from lmq.constraints.vocabulary_index import (GROUP_BITS, VocabularyIndex, concatenated_ranges,
                                              vocabulary_index)

#: a mask allowing more than this fraction of the vocabulary is dense (a packed bit row,
#: V/8 bytes): a pick over a sparse mask's k allowed scores touches only those, a dense
#: one is a pass over the whole row (measured at V = 151,936, gathering beats the pass up
#: to about 4,000 allowed tokens)
DENSE_FRACTION = 1 / 32
#: dense masks kept per automaton by default (a bit row each, and a 4V-byte bias row where
#: the numpy fallback of token_choice.py applies it); the oldest is dropped first (`len(X) < N` visits its N states once each, in order)
DENSE_MASKS_KEPT = 64
#: at most this many live (node, state) pairs of a trie level are walked in plain Python
PYTHON_FRONTIER = 48
DEAD = 0
_BIT_NUMBERS = np.arange(32)              # a bit word's bits, lowest first
ALL_GROUPS = (int(np.bitwise_or.reduce(GROUP_BITS[0])), int(np.bitwise_or.reduce(GROUP_BITS[1])))
#: a state with at most this many allowed tokens finds their successors one token at a time
FEW_SUCCESSORS = 2048
#: (state → successors) and (state, window → budget mask) entries kept per automaton
SUCCESSORS_KEPT = 16
BUDGET_MASKS_KEPT = 4096
#: a live pair whose subtree holds at most this many tokens is walked depth first at once
SMALL_SUBTREE = 32
#: a trie walk visiting more (node, state) pairs than this fraction of the trie's nodes
#: is handed to the class-pattern trie ...
WALK_BUDGET = 1 / 16
#: ... if the DFA has at most this many byte classes (else patterns are nearly the trie)
PATTERN_CLASSES = 16
#: a walk whose next level holds more (node, state) pairs than this is done by the
#: compiled kernel where it is built (a few ns per pair against numpy's tens), unless the
#: DFA has few enough byte classes for the class patterns
COMPILED_WALK_PAIRS = 2048


@dataclass(frozen=True, eq=False)
class TokenMask:
    """The tokens allowed in one automaton state (computed once, shared, never mutated)."""

    size: int                    # vocabulary size V
    count: int                   # how many tokens are allowed
    bits: np.ndarray | None = field(repr=False)   # dense masks only: uint32 words, bit
                                                  # t % 32 of word t // 32 set iff t is allowed

    @staticmethod
    def of(allowed: np.ndarray, size: int) -> "TokenMask":
        """A mask of sorted int32 `allowed` ids; dense above `DENSE_FRACTION`."""
        if len(allowed) > DENSE_FRACTION * size:
            flags = np.zeros(size, dtype=bool)
            flags[allowed] = True
            return TokenMask.of_flags(flags)
        allowed.flags.writeable = False
        mask = TokenMask(size, len(allowed), None)
        mask.__dict__["allowed"] = allowed
        return mask

    @staticmethod
    def of_flags(flags: np.ndarray) -> "TokenMask":
        """A mask of a bool row (True: allowed); dense above `DENSE_FRACTION`."""
        count = int(np.count_nonzero(flags))
        if count <= DENSE_FRACTION * len(flags):
            return TokenMask.of(np.flatnonzero(flags).astype(np.int32), len(flags))
        packed = np.packbits(flags, bitorder="little")
        words = np.zeros(-(-len(flags) // 32), dtype="<u4")
        words.view(np.uint8)[:len(packed)] = packed
        words.flags.writeable = False
        return TokenMask(len(flags), count, words)

    @staticmethod
    def of_bits(words: np.ndarray, size: int) -> "TokenMask":
        """A mask of a packed bit row (32-bit words, bit t % 32 of word t // 32 set iff
        token t is allowed: llguidance's form; copied); dense above `DENSE_FRACTION`."""
        set_words = np.flatnonzero(words)
        if len(set_words) * 32 <= DENSE_FRACTION * size:    # surely sparse: unpack those words
            bits = np.unpackbits(words.view(np.uint8).reshape(-1, 4)[set_words], axis=1,
                                 bitorder="little")
            return TokenMask.of((set_words[:, None] * 32 + _BIT_NUMBERS)[bits.view(bool)]
                                .astype(np.int32), size)
        flags = np.unpackbits(words.view(np.uint8), count=size, bitorder="little").view(bool)
        count = int(np.count_nonzero(flags))
        if count <= DENSE_FRACTION * size:
            return TokenMask.of(np.flatnonzero(flags).astype(np.int32), size)
        copy = words.astype("<u4")
        copy.flags.writeable = False
        return TokenMask(size, count, copy)

    @cached_property
    def allowed(self) -> np.ndarray:
        """The allowed token ids, sorted (int32; built on first use for a dense mask)."""
        allowed = np.flatnonzero(self.flags).astype(np.int32)
        allowed.flags.writeable = False
        return allowed

    @property
    def flags(self) -> np.ndarray:
        """A bool row over the vocabulary, True where allowed (built per call)."""
        if self.bits is None:
            flags = np.zeros(self.size, dtype=bool)
            flags[self.allowed] = True
            return flags
        return np.unpackbits(self.bits.view(np.uint8), count=self.size, bitorder="little").view(bool)

    @cached_property
    def bias(self) -> np.ndarray:
        """float32 (V,): 0 where allowed, -inf elsewhere (the numpy fallback's dense masks)."""
        bias = np.where(self.flags, np.float32(0.0), np.float32(-np.inf))
        bias.flags.writeable = False
        return bias

    @property
    def dense(self) -> bool:
        return self.bits is not None

    def __contains__(self, token: int) -> bool:
        if not 0 <= token < self.size:
            return False
        if self.bits is not None:
            return bool(int(self.bits[token >> 5]) >> (token & 31) & 1)
        position = int(np.searchsorted(self.allowed, token))
        return position < self.count and int(self.allowed[position]) == token


class DfaTokenAutomaton:
    """The token automaton of a trimmed `ByteDfa` over one vocabulary: states are the DFA's
    state numbers; masks, successors and forced bytes are computed on first use and
    cached, so a decoding step on a visited state is two dictionary lookups."""

    exact_budget = True

    def __init__(self, dfa: ByteDfa, index: VocabularyIndex, token_bytes: tuple[bytes, ...],
                 cache: VocabularyCache | None = None, dense_kept: int | None = None):
        self.dfa = dfa
        # dense masks kept (state masks, and budget masks apart)
        self.dense_kept = DENSE_MASKS_KEPT if dense_kept is None else dense_kept
        self.index = index
        self.token_bytes = token_bytes
        self.cache = cache if cache is not None else VocabularyCache()   # the vocabulary's
        self._flat = np.ascontiguousarray(dfa.transitions, dtype=np.int32).ravel()
        self._accepting = dfa.accepting.tolist()
        self._exits = dfa.exits.tolist()
        self._table = memoryview(self._flat)     # state * 256 + byte → state, as Python ints
        self._live: dict[int, list[int]] = {}
        self._masks: dict[int, TokenMask] = {}
        self._dense_states: deque[int] = deque()    # cached dense masks, oldest first
        self._next: dict[tuple[int, int], int] = {}
        self._budgeted: dict[tuple[int, TokenWindow], TokenMask] = {}
        self._dense_budgeted: deque[tuple[int, TokenWindow]] = deque()
        self._successors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._distinct: dict[int, list[int]] = {}
        self._lengths: BudgetLengths | None = None
        self._forced: dict[int, bytes] = {}
        self._open_table: np.ndarray | None = None
        self._filterable: np.ndarray | None = None  # per state: only loops or dies, by whole groups
        self._filtering = False                     # some state is filterable
        self._open_words: dict[int, tuple[int, int, bool]] = {}
        self._walked = 0                         # (node, state) pairs of the current walk
        self._patterns: ClassPatterns | None | bool = None   # False: too many byte classes
        self._views = index.views

    @classmethod
    def for_vocabulary(cls, dfa: ByteDfa, vocabulary: Vocabulary,
                       dense_kept: int | None = None) -> "DfaTokenAutomaton":
        """The automaton of `dfa` over `vocabulary` (its index shared and disk-cached)."""
        return cls(dfa, vocabulary_index(vocabulary), vocabulary.token_bytes,
                   vocabulary_cache(vocabulary), dense_kept)

    def initial(self) -> int:
        return int(self.dfa.initial)

    def accepts(self, state: int) -> bool:
        return self._accepting[state]

    def complete(self, state: int) -> bool:
        return self._accepting[state] and self.mask(state).count == 0

    def is_exit(self, state: int) -> bool:
        return self._exits[state]

    def fork(self, state: int) -> int:
        return state                    # states are plain ints: nothing to copy

    def budget_mask(self, state: int, window: TokenWindow) -> TokenMask:
        """The tokens of the state's mask after which some value still ends within
        `window` (the token counts the budget allows from `state`, this token included):
        the whole mask where every reachable state fits or every successor does, else
        the tokens whose successor fits."""
        key = (state, window)
        mask = self._budgeted.get(key)
        if mask is None:
            lengths = self._budget_lengths()
            after = window.after(1)
            mask = self.mask(state)
            if not lengths.fits_everywhere(state, after):
                fitting = {s for s in self.successor_states(state) if lengths.can_finish(s, after)}
                if len(fitting) < len(self.successor_states(state)):
                    tokens, targets = self.successors(state)
                    kept = np.isin(targets, np.fromiter(fitting, dtype=np.int32, count=len(fitting)))
                    mask = TokenMask.of(tokens[kept], self.index.size)
            if len(self._budgeted) > BUDGET_MASKS_KEPT:
                self._budgeted.clear()
                self._dense_budgeted.clear()
            self._budgeted[key] = mask
            if mask.dense:                       # bounded like the dense state masks
                self._dense_budgeted.append(key)
                if len(self._dense_budgeted) > self.dense_kept:
                    self._budgeted.pop(self._dense_budgeted.popleft(), None)
        return mask

    def can_finish(self, state: int, window: TokenWindow) -> bool:
        """Whether some token string from `state` ends a value within `window`."""
        return self._budget_lengths().can_finish(state, window)

    @cached_property
    def strands_nothing(self) -> bool:
        """Whether the plain masks strand no value (some token string ends a value from
        every state an allowed token leads to), so an unbudgeted hole needs no
        `budget_mask`: true when every byte on the automaton's edges is a token of its
        own, else as `BudgetLengths` finds on the single-byte tokens (conservative)."""
        single, _ = self.index.byte_kinds
        inner = self.dfa.transitions[~self.dfa.exits & (np.arange(self.dfa.n_states) != DEAD)]
        if single[(inner != DEAD).any(axis=0)].all():
            return True
        return self._budget_lengths().strands_nothing(self.initial())

    def _budget_lengths(self) -> BudgetLengths:
        if self._lengths is None:
            single, present = self.index.byte_kinds
            self._lengths = BudgetLengths(self.dfa, single, present, self.successor_states)
        return self._lengths

    def successor_states(self, state: int) -> list[int]:
        """The distinct states the allowed tokens of `state` lead to, sorted."""
        distinct = self._distinct.get(state)
        if distinct is None:
            if self._exits[state]:
                distinct = [state]
            elif self.mask(state).count <= FEW_SUCCESSORS:
                distinct = np.unique(self.successors(state)[1]).tolist()
            elif isinstance(self._patterns, ClassPatterns):
                final = self._patterns.final_states(self.dfa.byte_classes[1], state)
                distinct = np.unique(final[final != DEAD]).tolist()
            else:
                _, counts, ends = self._walk_ends(state)
                distinct = np.unique(ends[counts > 0]).tolist()
            self._distinct[state] = distinct
        return distinct

    def successors(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """(the state's allowed tokens, sorted; the state each one leads to): a few are
        advanced one by one, many read from the class patterns where the masks use them,
        else from one trie walk that records end states."""
        cached = self._successors.get(state)
        if cached is not None:
            return cached
        tokens = self.mask(state).allowed
        if self._exits[state]:
            targets = np.full(len(tokens), state, dtype=np.int32)
        elif len(tokens) <= FEW_SUCCESSORS:
            targets = np.fromiter((self.advance(state, t) for t in tokens.tolist()),
                                  dtype=np.int32, count=len(tokens))
        elif isinstance(self._patterns, ClassPatterns):
            targets = self._patterns.final_states(self.dfa.byte_classes[1], state)[tokens]
        else:
            starts, counts, ends = self._walk_ends(state)
            target_of = np.zeros(self.index.size, dtype=np.int32)
            target_of[self.index.order[concatenated_ranges(starts, counts)]] = np.repeat(ends, counts)
            targets = target_of[tokens]
        if len(self._successors) >= SUCCESSORS_KEPT:
            self._successors.clear()
        self._successors[state] = (tokens, targets)
        return tokens, targets

    def _walk_ends(self, state: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The allowed tokens of `state` as sorted-position ranges (starts, counts) and the
        state the tokens of each range end in: the numpy trie walk, recording states."""
        starts: list[np.ndarray] = []
        counts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        nodes, states = self._roots(state)
        while len(nodes):
            nodes, states = self._numpy_level(nodes, states, starts, counts, ends)
        return np.concatenate(starts), np.concatenate(counts), np.concatenate(ends)

    def mask(self, state: int) -> TokenMask:
        mask = self._masks.get(state)
        if mask is None:
            allowed = self._allowed(state)
            if allowed is None:                  # the walk was handed to the class patterns
                allowed = self._patterns.final_states(self.dfa.byte_classes[1], state) != DEAD
            mask = self._masks[state] = (TokenMask.of_flags(allowed) if allowed.dtype == bool
                                         else TokenMask.of(allowed, self.index.size))
            if mask.dense:
                self._dense_states.append(state)
                if len(self._dense_states) > self.dense_kept:
                    del self._masks[self._dense_states.popleft()]
        return mask

    @cached_property
    def _few_classes(self) -> bool:
        """Whether large walks go to the class patterns (`PATTERN_CLASSES`)."""
        return self.dfa.byte_classes[1].shape[1] <= PATTERN_CLASSES

    def _over_budget(self) -> bool:
        """Whether the current walk has visited more pairs than `WALK_BUDGET` allows and
        the DFA's few byte classes make the class-pattern trie the cheaper way."""
        if self._walked <= WALK_BUDGET * self.index.node_count or self._patterns is False:
            return False
        if self._patterns is None:
            self._patterns = (class_patterns(self.index, self.dfa.byte_classes[0], self.cache)
                              if self._few_classes else False)
        return self._patterns is not False

    def advance(self, state: int, token: int) -> int:
        """The state after `token`'s bytes (DEAD if the token was not allowed; an exit
        state stays, the rest of the token being overshoot)."""
        key = (state, token)
        successor = self._next.get(key)
        if successor is None:
            successor, table = state, self._table
            for byte in self.token_bytes[token]:
                if successor == DEAD or self._exits[successor]:
                    break
                successor = table[successor * 256 + byte]
            self._next[key] = successor
        return successor

    def forced(self, state: int) -> bytes:
        """The bytes every value must continue with from `state` (see `forced_bytes`)."""
        forced = self._forced.get(state)
        if forced is None:
            forced = self._forced[state] = forced_bytes(self.dfa, state)
        return forced

    def _opened(self, state: int) -> tuple[int, int, bool]:
        """`_open_groups` of one state, as two Python ints and whether it is filterable
        (all groups, without looking further, when the state has no loop, as in most
        states of an option list)."""
        opened = (*ALL_GROUPS, False)
        if (self.dfa.transitions[state] == state).any():     # per state: a first mask meets few
            (low, high), filterable = _open_groups(self.dfa.transitions, np.array([state]))
            opened = (int(low[0]), int(high[0]), bool(filterable[0]))
        self._open_words[state] = opened
        return opened

    def _live_bytes(self, state: int) -> list[int]:
        live = self._live.get(state)
        if live is None:
            row = self._flat[state * 256:(state + 1) * 256]
            live = self._live[state] = row.nonzero()[0].tolist()
        return live

    def _allowed(self, state: int) -> np.ndarray | None:
        """The tokens whose walk from `state` never reaches DEAD: sorted ids, or a bool
        row over the vocabulary when they are many (`DENSE_FRACTION`; above half of the
        vocabulary the row is built from the ranges directly, see `_flags`); None when
        the walk grew past its budget and the class patterns take over.

        The trie is walked level by level. A live node whose subtree holds only bytes its
        state loops on (its `below` groups avoid the state's open groups; always so in an
        exit state) contributes its whole subtree without being walked further; any other
        live node contributes the tokens ending there, and its children are walked;
        except where the state only loops or dies (by whole byte groups, as in `[a-z ]+`)
        and the node's prefix only loops: then its subtree's tokens are filtered at once
        on their byte groups (`VocabularyIndex.token_groups`) instead of walked. A
        level's live (node, state) pairs are numpy arrays, or Python lists when there are
        only a handful (numpy's per-call cost would dominate). Tokens are collected as
        ranges of sorted positions."""
        index = self.index
        if state == DEAD or index.depth == 0:
            return np.empty(0, dtype=np.int32)
        starts: list[np.ndarray] = []            # sorted-position ranges
        counts: list[np.ndarray] = []
        few_starts: list[int] = []               # the same, from the Python-walked levels
        few_counts: list[int] = []
        filtered: list[tuple[np.ndarray, ...]] = []    # subtrees to filter: (starts, counts,
        few_filtered: list[tuple[int, ...]] = []       # open groups' low and high words)
        nodes, states = self._roots(state)
        pairs = None
        self._walked = 0
        while True:
            if self._over_budget():
                return None
            if pairs is None and len(nodes) > COMPILED_WALK_PAIRS and not self._few_classes:
                walk = getattr(token_choice.KERNEL, "trie_walk", None)
                if walk is not None:
                    return self._compiled_allowed(walk, state)
            if pairs is None and len(nodes) <= PYTHON_FRONTIER:
                pairs = list(zip(nodes.tolist(), states.tolist()))
            if pairs is None:
                nodes, states = self._numpy_level(nodes, states, starts, counts, filtered=filtered)
                if not len(nodes):
                    break
            else:
                pairs = self._python_level(pairs, few_starts, few_counts, few_filtered)
                if not pairs:
                    break
                if len(pairs) > PYTHON_FRONTIER:
                    nodes, states = np.array(pairs, dtype=np.int32).T
                    pairs = None
        starts.append(np.array(few_starts, dtype=np.int32))
        counts.append(np.array(few_counts, dtype=np.int32))
        starts, counts = np.concatenate(starts), np.concatenate(counts)
        kept = self._filtered_positions(filtered, few_filtered)
        total = int(counts.sum()) + len(kept)
        if total > len(index.order) // 2:
            return self._flags(starts, counts, kept)
        tokens = index.order[np.concatenate((concatenated_ranges(starts, counts), kept))]
        if total > DENSE_FRACTION * index.size:
            flags = np.zeros(index.size, dtype=bool)
            flags[tokens] = True
            return flags
        tokens.sort()
        return tokens

    def _compiled_allowed(self, walk, state: int) -> np.ndarray:
        """The bool row of `state`'s allowed tokens from the compiled level-by-level walk
        (no subtree taken whole, but a few ns per live pair instead of numpy's tens: a
        JSON string's position, alive in nearly all of the trie, 16 → 3 ms at 152k)."""
        index = self.index
        inside = np.zeros(len(index.order) + 1, dtype=np.uint8)    # + the empty tokens' rank
        walk(self._flat, index.byte, index.child_start, index.lo, index.exact,
             int(index.levels[1]), state, inside)
        return inside.view(bool)[index.rank]

    def _flags(self, starts: np.ndarray, counts: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The bool row over the vocabulary of disjoint sorted-position ranges and more
        `positions`: +1 at each start, -1 at each end, a running sum, the positions set,
        then read through each token's rank."""
        keep = counts > 0
        starts = starts[keep]
        marks = np.zeros(len(self.index.order) + 2, dtype=np.int8)
        marks[starts] = 1
        marks[starts + counts[keep]] -= 1
        inside = np.cumsum(marks, dtype=np.int8).view(bool)
        inside[positions] = True
        inside[-2:] = False                      # the rank of an empty token points here
        return inside[self.index.rank]

    def _filtered_positions(self, filtered: list[tuple[np.ndarray, ...]],
                            few: list[tuple[int, ...]]) -> np.ndarray:
        """The sorted positions, in the subtrees set aside for filtering, of the tokens
        whose byte groups avoid their state's open groups (each byte loops, none dies)."""
        if few:
            columns = list(zip(*few))
            filtered.append((np.array(columns[0], dtype=np.int32), np.array(columns[1], dtype=np.int32),
                             np.array(columns[2], dtype=np.uint64), np.array(columns[3], dtype=np.uint64)))
        if not filtered:
            return np.empty(0, dtype=np.intp)
        starts, counts, low, high = (np.concatenate(column) for column in zip(*filtered))
        positions = concatenated_ranges(starts, counts)
        if (low == low[0]).all() and (high == high[0]).all():   # one state: as scalars
            low, high = low[:1], high[:1]
        else:
            low, high = np.repeat(low, counts), np.repeat(high, counts)
        groups = self.index.token_groups
        closed = ((groups[0][positions] & low) | (groups[1][positions] & high)) == 0
        return positions[closed]

    def _roots(self, state: int) -> tuple[np.ndarray, np.ndarray]:
        """The live (node, state) pairs of the trie's first level from `state`."""
        roots = self.index.byte[:self.index.levels[1]]
        states = self._flat[state * 256 + roots]
        nodes = np.flatnonzero(states).astype(np.int32)
        return nodes, states[nodes]

    def _numpy_level(self, nodes, states, starts, counts, ends=None, filtered=None):
        """One level of live pairs as arrays: record ranges (and into `ends`, the state
        each range's tokens end in; else into `filtered`, the subtrees to filter), return
        the next level's."""
        index = self.index
        if self._open_table is None:
            self._open_table, self._filterable = _open_groups(
                self.dfa.transitions, np.arange(len(self.dfa.transitions)))
            self._filtering = bool(self._filterable.any())
        below, opened = index.below, self._open_table
        low, high = opened[0][states], opened[1][states]
        closed = ((below[0][nodes] & low) | (below[1][nodes] & high)) == 0
        done = nodes[closed]
        starts.append(index.lo[done])
        counts.append(index.hi[done] - index.lo[done])
        self._walked += len(nodes)
        walked = ~closed
        if ends is not None:
            ends += (states[closed], states[walked])
        elif filtered is not None and self._filtering:
            above = index.above
            taken = walked & self._filterable[states] \
                & (((above[0][nodes] & low) | (above[1][nodes] & high)) == 0)
            if taken.any():
                kept = nodes[taken]
                filtered.append((index.lo[kept], index.hi[kept] - index.lo[kept], low[taken], high[taken]))
                walked &= ~taken
        nodes, states = nodes[walked], states[walked]
        starts.append(index.lo[nodes])
        counts.append(index.exact[nodes])
        first = index.child_start[nodes]
        children = index.child_start[nodes + 1] - first
        nodes = concatenated_ranges(first, children)
        states = self._flat[np.repeat(states * 256, children) + index.byte[nodes]]
        keep = states != DEAD
        return nodes[keep], states[keep]

    def _python_level(self, pairs, starts, counts, filtered):
        """One level of a few live pairs in plain Python (list in, list out). A pair whose
        subtree holds at most `SMALL_SUBTREE` tokens is finished at once, depth first: a
        long chain like a run of spaces would otherwise cost a level per byte."""
        byte, child_start, lo, hi, exact, below_low, below_high, above_low, above_high = self._views
        table = self._table
        self._walked += len(pairs)
        following: list[tuple[int, int]] = []
        small: list[tuple[int, int]] = []

        def visit(node: int, state: int, out: list[tuple[int, int]]) -> None:
            opened = self._open_words.get(state) or self._opened(state)
            if not (below_low[node] & opened[0] or below_high[node] & opened[1]):
                starts.append(lo[node])
                counts.append(hi[node] - lo[node])
                return
            if opened[2] and not (above_low[node] & opened[0] or above_high[node] & opened[1]):
                filtered.append((lo[node], hi[node] - lo[node], opened[0], opened[1]))
                return
            if exact[node]:
                starts.append(lo[node])
                counts.append(exact[node])
            row = state * 256
            begin, end = child_start[node], child_start[node + 1]
            live = self._live_bytes(state) if end - begin > 8 else None
            if live is None or end - begin <= len(live):
                for child in range(begin, end):
                    target = table[row + byte[child]]
                    if target != DEAD:
                        out.append((child, target))
            else:
                for b in live:
                    child = bisect_left(byte, b, begin, end)
                    if child < end and byte[child] == b:
                        out.append((child, table[row + b]))

        for node, state in pairs:
            visit(node, state, small if hi[node] - lo[node] <= SMALL_SUBTREE else following)
        while small:
            node, state = small.pop()
            visit(node, state, small)
        return following


def _open_groups(transitions: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of `states`, the bits (`GROUP_BITS`; shape (2, len(states))) of the byte
    groups holding a byte that leaves the state: a subtree whose groups avoid them keeps
    the state on every path; and whether the state is filterable: every byte loops or
    dies, and no group holds both kinds (then a token walked from it lives exactly when
    its groups avoid the open ones). Blocks of 1024 states bound the temporary arrays."""
    open_bits = np.zeros((2, len(states)), dtype=np.uint64)
    filterable = np.zeros(len(states), dtype=bool)
    for first in range(0, len(states), 1024):
        block = states[first:first + 1024]
        rows = transitions[block]
        leaves = rows != block[:, None]
        mixed = np.zeros(len(block), dtype=bool)
        for word in range(2):
            bits = GROUP_BITS[word]
            leaving = np.bitwise_or.reduce(np.where(leaves, bits, np.uint64(0)), axis=1)
            looping = np.bitwise_or.reduce(np.where(leaves, np.uint64(0), bits), axis=1)
            open_bits[word, first:first + len(block)] = leaving
            mixed |= (leaving & looping) != 0
        filterable[first:first + len(block)] = ~mixed & ((rows == DEAD) | ~leaves).all(axis=1) \
            & (block != DEAD)
    return open_bits, filterable
