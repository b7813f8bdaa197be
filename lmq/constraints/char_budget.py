"""`CharBudgetAutomaton`: a DFA token automaton under an upper bound on the value's
characters (`len(X) < n`, `len(X) <= n`), counted by the decoder instead of by n automaton
states, so `len(X) < 10**9` costs what the rest of the constraint costs.

A state is (DFA state, characters so far). A token is allowed iff the DFA allows it and
the value can still be completed within the budget: its characters (up to a stop phrase
it completes, the rest being overshoot) plus the fewest characters the DFA needs from
the state it leads to (`fewest_characters`) fit in what is left. That is exact: the
fewest characters are reachable, so an allowed token never leads to a dead end, and a
token that passes is never blocked. Far from the bound no token can matter and the
DFA's own mask is used unchanged; near it, the tokens' end states and characters from
the state are computed once for the whole vocabulary (one walk over the vocabulary trie)
and the mask is narrowed by one comparison per token.

Characters are counted as in Python's `len`: UTF-8 bytes that are not continuation
bytes. A STOPS_BEFORE phrase completed inside a token counts toward the budget (the
automaton does not say which phrase ended the value); such a value can still end with an
end token instead, so no value is lost.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np

from lmq.constraints.byte_dfa import DEAD, fewest_characters
from lmq.constraints.token_budget import TokenWindow
from lmq.constraints.token_masks import DfaTokenAutomaton, TokenMask
from lmq.constraints.vocabulary_index import VocabularyIndex

#: per-state token walks kept (each holds two int32 rows over the vocabulary)
WALKS_KEPT = 16
#: narrowed masks kept per automaton (a dense one holds a V/8-byte bit row)
NARROWED_KEPT = 32

State = tuple[int, int]      # (DFA state, characters of the value so far)


class CharBudgetAutomaton:
    """The token automaton of `base` under "at most `limit` characters" (see module doc)."""

    exact_budget = True

    def __init__(self, base: DfaTokenAutomaton, limit: int):
        self.base = base
        self.limit = limit
        self.index = base.index
        self._chars = token_characters(base.index, base.token_bytes)
        self._widest = int(self._chars.max(initial=0))
        self._fewest = fewest_characters(base.dfa)
        #: below this many characters left, a token may not fit: masks are narrowed
        self._margin = self._widest + int(self._fewest[1:].max(initial=0))
        self._exits = base.dfa.exits
        self._walks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._narrowed: OrderedDict[tuple[int, int, str], TokenMask] = OrderedDict()
        self._longest = np.empty((0, base.dfa.n_states))

    def initial(self) -> State:
        return (self.base.initial(), 0)

    def accepts(self, state: State) -> bool:
        return self.base.accepts(state[0])

    def complete(self, state: State) -> bool:
        return self.accepts(state) and self.mask(state).count == 0

    def fork(self, state: State) -> State:
        return state

    def forced(self, state: State) -> bytes:
        return self.base.forced(state[0])       # on every completion, so it always fits

    def advance(self, state: State, token: int) -> State:
        dfa_state, used = state
        following = self.base.advance(dfa_state, token)
        if self.base.is_exit(following):        # the value ended inside the token
            return following, used + self._chars_until_exit(dfa_state, token)
        return following, used + int(self._chars[token])

    def mask(self, state: State) -> TokenMask:
        dfa_state, used = state
        left = self.limit - used
        if left >= self._margin:
            return self.base.mask(dfa_state)
        return self._narrow(dfa_state, left, "any")

    def budget_mask(self, state: State, window: TokenWindow) -> TokenMask:
        """The tokens within both budgets: the DFA's token-budget mask (`window`, the token
        counts the budget allows from here, this token included) narrowed to the tokens
        that fit the characters left — completing the value where `window` makes this
        token the last, leaving room for its minimum of tokens where it has one."""
        dfa_state, used = state
        left = self.limit - used
        tokens = self.base.budget_mask(dfa_state, window)
        if window.high == 1 and not window.holds(2):
            characters = self._narrow(dfa_state, left, "final") if left < self._margin else None
        elif window.low > 1:
            characters = self._viable(dfa_state, left, window.low - 1)
        else:
            characters = self._narrow(dfa_state, left, "any") if left < self._margin else None
        if characters is None or characters is tokens:
            return tokens
        key = (dfa_state, left, window)
        mask = self._narrowed.get(key)
        if mask is None:
            flags = np.zeros(self.index.size, dtype=bool)
            flags[tokens.allowed] = True
            kept = np.zeros(self.index.size, dtype=bool)
            kept[characters.allowed] = True
            mask = self._narrowed[key] = TokenMask.of_flags(flags & kept)
            if len(self._narrowed) > NARROWED_KEPT:
                self._narrowed.popitem(last=False)
        return mask

    def can_finish(self, state: State, window: TokenWindow) -> bool:
        """Whether a value can still end within `window` (the character budget is kept by
        every mask, so the DFA's answer is the budget's)."""
        return self.base.can_finish(state[0], window)

    @property
    def strands_nothing(self) -> bool:
        return self.base.strands_nothing

    def _viable(self, dfa_state: int, left: int, more: int) -> TokenMask | None:
        """The tokens after which the value can still grow by `more` tokens (a minimum
        token count) within the characters left, or None where any token can. Every byte
        is a token of its own, so that is a path of at least `more` bytes to a value's
        end, of few enough characters. With `more` + the most characters any state needs
        to spare, any path of `more` bytes can be cut short and completed in budget."""
        if more <= 0 or left >= self._margin + more:
            return None
        key = (dfa_state, left, f"viable {more}")
        mask = self._narrowed.get(key)
        if mask is None:
            ends, chars = self._walk(dfa_state)
            room = left - chars
            longest = self._longest_within(max(left, 0))
            fits = (ends != DEAD) & (room >= 0)
            fits[fits] = longest[room[fits], ends[fits]] >= more
            mask = self._narrowed[key] = TokenMask.of_flags(fits)
            if len(self._narrowed) > NARROWED_KEPT:
                self._narrowed.popitem(last=False)
        return mask

    def _longest_within(self, most: int) -> np.ndarray:
        """(at least most + 1, n_states) float: the longest byte path from each state to a
        value's end using at most c characters (row c); inf from an exit state (held back
        by a token minimum, it absorbs every byte), -inf where there is none. Rows are
        built once, as far as asked (at most `_margin` + the token minimum)."""
        if len(self._longest) > most:
            return self._longest
        byte_class, table = self.base.dfa.byte_classes
        free = np.zeros(table.shape[1], bool)            # a class with a continuation byte
        free[np.unique(byte_class[0x80:0xC0])] = True
        ends = np.where(self._exits, np.inf, np.where(self.base.dfa.accepting, 0.0, -np.inf))
        ends[DEAD] = -np.inf
        rows = list(self._longest)
        for chars in range(len(rows), most + 1):
            row = ends.copy()
            if chars:                                    # one more character: paid edges
                paid = 1 + rows[chars - 1][table[:, ~free]]
                row = np.maximum(row, paid.max(axis=1, initial=-np.inf))
            for _ in range(8):                           # continuation bytes: 3 in a row at most
                step = np.maximum(row, (1 + row[table[:, free]]).max(axis=1, initial=-np.inf))
                step[DEAD] = -np.inf
                if np.array_equal(step, row):
                    break
                row = step
            row[DEAD] = -np.inf
            rows.append(row)
        self._longest = np.array(rows)
        return self._longest

    def _narrow(self, dfa_state: int, left: int, kind: str) -> TokenMask:
        key = (dfa_state, left, kind)
        mask = self._narrowed.get(key)
        if mask is None:
            ends, chars = self._walk(dfa_state)
            fits = (ends != DEAD) & (chars + self._fewest[ends] <= left)
            if kind == "final":
                fits &= self.base.dfa.accepting[ends] | self._exits[ends]
            mask = TokenMask.of_flags(fits)
            self._narrowed[key] = mask
            if len(self._narrowed) > NARROWED_KEPT:
                self._narrowed.popitem(last=False)
        return mask

    def _walk(self, dfa_state: int) -> tuple[np.ndarray, np.ndarray]:
        """(the DFA state after each token, each token's characters up to an exit) from
        `dfa_state`, for the whole vocabulary; empty tokens end at DEAD."""
        walk = self._walks.get(dfa_state)
        if walk is None:
            walk = self._walks[dfa_state] = walk_vocabulary(self.index, self.base.dfa.transitions,
                                                            self._exits, dfa_state)
            if len(self._walks) > WALKS_KEPT:
                self._walks.popitem(last=False)
        else:
            self._walks.move_to_end(dfa_state)
        return walk

    def _chars_until_exit(self, dfa_state: int, token: int) -> int:
        count, state = 0, dfa_state
        for byte in self.base.token_bytes[token]:
            if self.base.is_exit(state):
                break
            count += not 0x80 <= byte <= 0xBF
            state = int(self.base.dfa.transitions[state, byte])
        return count


_characters: "weakref.WeakKeyDictionary[VocabularyIndex, np.ndarray]" = weakref.WeakKeyDictionary()
_parents: "weakref.WeakKeyDictionary[VocabularyIndex, np.ndarray]" = weakref.WeakKeyDictionary()
_STARTS_CHARACTER = np.ones(256, bool)
_STARTS_CHARACTER[0x80:0xC0] = False          # UTF-8 continuation bytes


def token_characters(index: VocabularyIndex, token_bytes: tuple[bytes, ...]) -> np.ndarray:
    """Each token's characters (bytes that are not UTF-8 continuation bytes), int64 (V,),
    built once per vocabulary."""
    chars = _characters.get(index)
    if chars is None:
        lengths = np.fromiter(map(len, token_bytes), dtype=np.int64, count=len(token_bytes))
        joined = np.frombuffer(b"".join(token_bytes), dtype=np.uint8)
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        chars = np.zeros(len(token_bytes), np.int64)
        filled = lengths > 0
        chars[filled] = np.add.reduceat(_STARTS_CHARACTER[joined].astype(np.int64),
                                        starts[filled])
        chars.flags.writeable = False
        _characters[index] = chars
    return chars


def walk_vocabulary(index: VocabularyIndex, transitions: np.ndarray, exits: np.ndarray,
                    state: int) -> tuple[np.ndarray, np.ndarray]:
    """(end state, characters read before reaching an exit) of every token walked from
    `state` through `transitions` (exit and DEAD states are absorbing), int32 (V,) each;
    DEAD and 0 for empty tokens. One gather per trie level."""
    parent = _parent(index)
    ends = np.zeros(index.node_count, np.int64)
    chars = np.zeros(index.node_count, np.int64)
    levels = index.levels.tolist()
    byte = index.byte
    for depth, (low, high) in enumerate(zip(levels, levels[1:])):
        before = np.full(high - low, state, np.int64) if depth == 0 else ends[parent[low:high]]
        read = chars[parent[low:high]] if depth else 0
        level_bytes = byte[low:high]
        ends[low:high] = transitions[before, level_bytes]
        chars[low:high] = read + (_STARTS_CHARACTER[level_bytes] & ~exits[before])
    token_ends = np.zeros(index.size, np.int32)
    token_chars = np.zeros(index.size, np.int32)
    token_ends[index.order] = ends[index.terminal]
    token_chars[index.order] = chars[index.terminal]
    return token_ends, token_chars


def _parent(index: VocabularyIndex) -> np.ndarray:
    """The parent of each trie node (-1 at depth 1)."""
    parent = _parents.get(index)
    if parent is None:
        children = np.diff(index.child_start.astype(np.int64))
        below = np.repeat(np.arange(index.node_count), children)
        parent = np.full(index.node_count, -1, np.int64)
        parent[index.node_count - len(below):] = below
        _parents[index] = parent
    return parent
