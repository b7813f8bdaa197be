"""`ByteDfa`: the deterministic automaton over bytes that every regular constraint compiles
to, and the operations that build and combine them.

The token-mask engine walks token bytes through `transitions`, so the automaton is over
bytes, not characters: a value is constrained exactly as the bytes it becomes, including
UTF-8 characters split across tokens.

Invariants of every ByteDfa handed out (all constructors and operations return trimmed,
minimal automata): state 0 is DEAD (absorbing, neither accepting nor exit) and every state
from which no accepting or exit state can be reached is state 0, so "this prefix can still
become a valid value" is `state != 0`. Exit states are absorbing over every byte and never
accepting (the value has already ended there). States are numbered in breadth-first order
from `initial`; the arrays are read-only.

Constructors: `literal(s)`, `options(strings)`, `any_bytes()`, `empty()`, `contains(s)`,
`char_count(op, n)`, `valid_utf8()`.
Operations: `intersect(a, b)`, `union(a, b)`, `complement(a)`, `concat(a, b)`,
`with_stops(a, phrases)` (exit states for STOPS_AT / STOPS_BEFORE), `stop_values(a, phrases)`
(the language of final values under those stops).
Helpers: `run`, `matches`, `is_empty`, `forced_bytes`.
`lmq.compiler.regex.regex_dfa` compiles regexes; `lmq.compiler.gbnf.dfa_to_gbnf` exports.

Internally automata are built in "classed" form: a table over byte classes (bytes that
behave alike in every state) plus the byte → class map, which keeps products and
minimization proportional to the number of distinct behaviours, not to 256.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Sequence

import numpy as np

from lmq.errors import ConstraintError

DEAD = 0
CHAR_COUNT_OPS = ("<", "<=", "==", "!=", ">", ">=")


@dataclass(frozen=True, eq=False)
class ByteDfa:
    transitions: np.ndarray  # int32 (n_states, 256)
    accepting: np.ndarray    # bool (n_states,): the value may end here
    exits: np.ndarray        # bool (n_states,): a stop phrase just completed, the value ended
    initial: int

    @property
    def n_states(self) -> int:
        return int(self.transitions.shape[0])

    @cached_property
    def byte_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """(class of each byte (256,), table over classes (n_states, k)): bytes in one
        class lead every state to the same state."""
        table, byte_class = np.unique(self.transitions, axis=1, return_inverse=True)
        return byte_class.reshape(256).astype(np.intp), np.ascontiguousarray(table)

    @property
    def has_exits(self) -> bool:
        return bool(self.exits.any())

    def __repr__(self) -> str:
        return (f"ByteDfa({self.n_states} states, initial={self.initial}, "
                f"{int(self.accepting.sum())} accepting, {int(self.exits.sum())} exits)")


# ---------------------------------------------------------------- normal form


def _finish(table: np.ndarray, byte_class: np.ndarray, accepting: np.ndarray,
            exits: np.ndarray, initial: int) -> ByteDfa:
    """Trim, minimize and renumber a classed automaton into a ByteDfa with the invariants.

    `table` (n, k) may use any state as dead; `exits` rows are made absorbing here."""
    table = np.array(table, dtype=np.int32, copy=True)
    exits = np.asarray(exits, dtype=bool)
    accepting = np.asarray(accepting, dtype=bool) & ~exits
    own = np.arange(table.shape[0], dtype=np.int32)
    table[exits] = own[exits, None]
    useful = _reachable(table, initial) & _coreachable(table, accepting | exits)
    if not useful[initial]:
        return empty()
    # Keep the useful states (1..m) and one dead state 0 that every other state becomes.
    keep = np.flatnonzero(useful)
    remap = np.zeros(table.shape[0], dtype=np.int32)
    remap[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    table = np.concatenate([np.zeros((1, table.shape[1]), np.int32), remap[table[keep]]])
    accepting = np.concatenate([[False], accepting[keep]])
    exits = np.concatenate([[False], exits[keep]])
    # Moore refinement from dead / other / accepting / exit; the dead block stays 0.
    block = (1 + accepting + 2 * exits).astype(np.int32)
    block[0] = 0
    block = _refine(table, block)
    order = _bfs_order(table, block, int(block[remap[initial]]))
    new_id = np.zeros(order.size + 1, dtype=np.int32)
    new_id[order] = np.arange(1, order.size + 1, dtype=np.int32)
    representative = np.zeros(order.size + 1, dtype=np.int64)
    representative[block] = np.arange(table.shape[0])
    rows = np.concatenate([[0], representative[order]])
    return _seal(new_id[block[table[rows]]], byte_class, accepting[rows], exits[rows],
                 int(new_id[block[remap[initial]]]))


def _seal(table: np.ndarray, byte_class: np.ndarray, accepting: np.ndarray,
          exits: np.ndarray, initial: int) -> ByteDfa:
    transitions = np.ascontiguousarray(table[:, byte_class], dtype=np.int32)
    for array in (transitions, accepting, exits):
        array.setflags(write=False)
    dfa = ByteDfa(transitions, accepting, exits, initial)
    dfa.__dict__["byte_classes"] = (np.asarray(byte_class, dtype=np.intp), table)
    return dfa


def _reachable(table: np.ndarray, initial: int) -> np.ndarray:
    seen = np.zeros(table.shape[0], dtype=bool)
    seen[initial] = True
    frontier = np.array([initial])
    while frontier.size:
        targets = np.unique(table[frontier])
        frontier = targets[~seen[targets]]
        seen[frontier] = True
    return seen


def _coreachable(table: np.ndarray, goal: np.ndarray) -> np.ndarray:
    live = goal.copy()
    while True:
        grown = live | live[table].any(axis=1)
        if np.array_equal(grown, live):
            return live
        live = grown


def _refine(table: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Coarsest stable refinement of `block` under `table` (Moore's algorithm)."""
    count = int(np.unique(block).size)
    while True:
        signature = np.column_stack((block, block[table]))
        if signature.shape[0] <= 64:
            seen: dict[tuple, int] = {}
            new = np.array([seen.setdefault(tuple(row), len(seen))
                            for row in signature.tolist()], dtype=np.int32)
        else:
            new = np.unique(signature, axis=0, return_inverse=True)[1].reshape(-1)
            new = new.astype(np.int32)
        new_count = int(new.max()) + 1
        if new_count == count:
            return new
        block, count = new, new_count


def _bfs_order(table: np.ndarray, block: np.ndarray, first: int) -> np.ndarray:
    """The live blocks (all but the dead block 0) in breadth-first order from `first`."""
    block_table = np.zeros((int(block.max()) + 1, table.shape[1]), dtype=np.int32)
    block_table[block] = block[table]
    order = [first]
    seen = {0, first}
    for current in order:
        for target in block_table[current].tolist():
            if target not in seen:
                seen.add(target)
                order.append(target)
    return np.array(order, dtype=np.int64)


# ---------------------------------------------------------------- constructors


def empty() -> ByteDfa:
    """The empty language: the initial state is DEAD."""
    return _seal(np.zeros((1, 1), np.int32), np.zeros(256, np.intp),
                 np.zeros(1, bool), np.zeros(1, bool), DEAD)


def any_bytes() -> ByteDfa:
    """Σ*: every byte string."""
    return _seal(np.array([[0], [1]], np.int32), np.zeros(256, np.intp),
                 np.array([False, True]), np.zeros(2, bool), 1)


def literal(data: bytes) -> ByteDfa:
    """Exactly `data`."""
    return options([data])


def options(strings: Iterable[bytes]) -> ByteDfa:
    """Exactly one of `strings` (a trie, minimized: shared suffixes merge). An option that
    is a prefix of another both accepts and continues."""
    children: list[dict[int, int]] = [{}, {}]
    accepting = [False, False]
    for data in strings:
        if not isinstance(data, (bytes, bytearray)):
            raise ConstraintError(f"an option must be bytes, not {data!r}")
        node = 1
        for byte in data:
            node = children[node].get(byte) or _add_child(children, accepting, node, byte)
        accepting[node] = True
    byte_set = sorted({byte for edges in children for byte in edges})
    byte_class = np.zeros(256, np.intp)
    byte_class[byte_set] = np.arange(1, len(byte_set) + 1)
    column = {byte: i + 1 for i, byte in enumerate(byte_set)}
    table = np.zeros((len(children), len(byte_set) + 1), np.int32)
    for node, edges in enumerate(children):
        for byte, child in edges.items():
            table[node, column[byte]] = child
    return _finish(table, byte_class, np.array(accepting), np.zeros(len(children), bool), 1)


def _add_child(children: list[dict[int, int]], accepting: list[bool], node: int,
               byte: int) -> int:
    children.append({})
    accepting.append(False)
    children[node][byte] = len(children) - 1
    return len(children) - 1


def contains(data: bytes) -> ByteDfa:
    """Σ* data Σ*: every byte string containing `data`."""
    if not data:
        return any_bytes()
    table, winner = _phrase_matcher([data])
    done = winner >= 0
    table[done] = np.flatnonzero(done)[:, None]
    return _finish(table, np.arange(256, dtype=np.intp), done, np.zeros_like(done), 1)


def char_count(op: str, n: int) -> ByteDfa:
    """Byte strings whose number of UTF-8 characters (bytes that are not continuation bytes
    0x80–0xBF) compares with `n` by `op` (`len(X) op n`)."""
    if op not in CHAR_COUNT_OPS:
        raise ConstraintError(f"unknown comparison {op!r} for a character count "
                              f"(use one of {', '.join(CHAR_COUNT_OPS)})")
    if not isinstance(n, int) or isinstance(n, bool):
        raise ConstraintError(f"a character count bound must be an int, not {n!r}")
    top = max(n, -1) + 1          # counts 0..top; top stands for "more than n"
    counts = np.arange(top + 1)
    test = {"<": counts < n, "<=": counts <= n, "==": counts == n, "!=": counts != n,
            ">": counts > n, ">=": counts >= n}[op]
    if op in ("<", "<=", "=="):
        test[top] = False
    states = np.arange(1, top + 2, dtype=np.int32)           # state i + 1 = count i
    table = np.zeros((top + 2, 2), np.int32)                 # class 0: starter, 1: continuation
    table[1:, 0] = np.minimum(states + 1, top + 1)
    table[1:, 1] = states
    byte_class = np.zeros(256, np.intp)
    byte_class[0x80:0xC0] = 1
    accepting = np.concatenate([[False], test])
    return _finish(table, byte_class, accepting, np.zeros(top + 2, bool), 1)


def valid_utf8() -> ByteDfa:
    """Every well-formed UTF-8 byte string (no overlongs, surrogates or stray bytes)."""
    from lmq.compiler.regex import regex_dfa
    return regex_dfa(r"(?s).*")


# ---------------------------------------------------------------- products


def _joint_classes(dfas: Sequence[ByteDfa]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The coarsest byte classes refining those of every automaton, and each automaton's
    table over them."""
    code = np.zeros(256, np.int64)
    for dfa in dfas:
        byte_class, table = dfa.byte_classes
        code = code * table.shape[1] + byte_class
    _, first, byte_class = np.unique(code, return_index=True, return_inverse=True)
    return byte_class.reshape(256).astype(np.intp), [dfa.transitions[:, first] for dfa in dfas]


Classifier = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _product(dfas: Sequence[ByteDfa], classify: Classifier) -> ByteDfa:
    """The reachable product of `dfas`. `classify(states)` gets an (m, len(dfas)) array of
    component states and returns (accepting, exits, terminal): terminal states are not
    expanded (they become absorbing, so a terminal non-exit state is dead)."""
    byte_class, tables = _joint_classes(dfas)
    sizes = np.array([dfa.n_states for dfa in dfas], np.int64)
    strides = np.concatenate([np.cumprod(sizes[::-1])[::-1][1:], [1]]).astype(np.int64)
    k = tables[0].shape[1]
    start = np.array([[dfa.initial for dfa in dfas]], np.int64)
    levels, codes = [], [start @ strides]
    frontier = start
    seen = codes[0]
    accepting, exits, next_codes = [], [], []
    while frontier.size:
        acc, ex, term = classify(frontier)
        nxt = np.zeros((frontier.shape[0], k), np.int64)
        for i, table in enumerate(tables):
            nxt += table[frontier[:, i]].astype(np.int64) * strides[i]
        own = frontier @ strides
        nxt[term] = own[term, None]
        levels.append(frontier)
        accepting.append(acc)
        exits.append(ex)
        next_codes.append(nxt)
        new = np.unique(nxt)
        new = new[~np.isin(new, seen, assume_unique=True)]
        seen = np.union1d(seen, new)
        codes.append(new)
        frontier = (new[:, None] // strides) % sizes
    all_codes = np.concatenate(codes[:-1]) if len(codes) > 1 else codes[0]
    order = np.argsort(all_codes)
    sorted_codes = all_codes[order]
    table = np.concatenate(next_codes)
    table = order[np.searchsorted(sorted_codes, table)].astype(np.int32)
    return _finish(table, byte_class, np.concatenate(accepting), np.concatenate(exits), 0)


def _no_exits(operation: str, *dfas: ByteDfa) -> None:
    if any(dfa.has_exits for dfa in dfas):
        raise ConstraintError(f"{operation} of an automaton with stop phrases is not defined: "
                              "combine the value constraints first, then add the stops")


def intersect(a: ByteDfa, b: ByteDfa) -> ByteDfa:
    """L(a) ∩ L(b) (neither may have exits)."""
    _no_exits("the intersection", a, b)

    def classify(states: np.ndarray):
        acc = a.accepting[states[:, 0]] & b.accepting[states[:, 1]]
        dead = (states[:, 0] == DEAD) | (states[:, 1] == DEAD)
        return acc, np.zeros_like(acc), dead
    return _product([a, b], classify)


def union(a: ByteDfa, b: ByteDfa) -> ByteDfa:
    """L(a) ∪ L(b). Exits are kept: under `or`, each side's stop ends the value on its own."""
    def classify(states: np.ndarray):
        ex = a.exits[states[:, 0]] | b.exits[states[:, 1]]
        acc = (a.accepting[states[:, 0]] | b.accepting[states[:, 1]]) & ~ex
        return acc, ex, ex
    return _product([a, b], classify)


def complement(a: ByteDfa) -> ByteDfa:
    """Every byte string not in L(a)."""
    _no_exits("the complement", a)
    byte_class, table = a.byte_classes
    return _finish(table, byte_class, ~a.accepting, a.exits, a.initial)


def concat(a: ByteDfa, b: ByteDfa) -> ByteDfa:
    """L(a)·L(b); exits of `b` stay exits (a stop of b ends the whole value)."""
    _no_exits("a concatenation after", a)
    nfa = Nfa()
    start_a, final_a = nfa.embed(a)
    start_b, final_b = nfa.embed(b)
    nfa.epsilon(final_a, start_b)
    return nfa.determinize(start_a, {final_b}, nfa.exits)


# ---------------------------------------------------------------- stop phrases


def _phrase_matcher(phrases: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Aho-Corasick automaton of `phrases` over all 256 bytes: (table (n, 256) with state 0
    unused and 1 the root, winner (n,)): the index of the phrase that ends at this state and
    starts earliest (the longest; the first listed among equals), else -1."""
    children: list[dict[int, int]] = [{}, {}]
    ends: list[int] = [-1, -1]
    for index, phrase in enumerate(phrases):
        node = 1
        for byte in phrase:
            if byte not in children[node]:
                children.append({})
                ends.append(-1)
                children[node][byte] = len(children) - 1
            node = children[node][byte]
        if ends[node] < 0:
            ends[node] = index
    n = len(children)
    table = np.zeros((n, 256), np.int32)
    winner = np.array(ends)
    table[1] = 1
    fail = [1] * n
    queue = []
    for byte, child in children[1].items():
        table[1, byte] = child
        queue.append(child)
    for node in queue:
        for byte, child in children[node].items():
            fail[child] = int(table[fail[node], byte])
            queue.append(child)
        table[node] = table[fail[node]]
        for byte, child in children[node].items():
            table[node, byte] = child
        if winner[node] < 0:
            winner[node] = winner[fail[node]]
    return table, winner


def _stops_product(a: ByteDfa, phrases: Sequence[tuple[bytes, bool]],
                   drop_exits: bool) -> ByteDfa:
    _no_exits("adding stop phrases to", a)
    phrases = [(bytes(phrase), bool(keep)) for phrase, keep in phrases]
    for phrase, _ in phrases:
        if not phrase:
            raise ConstraintError("a stop phrase must not be empty")
    if not phrases:
        return a
    table, winner = _phrase_matcher([phrase for phrase, _ in phrases])
    matcher = _finish_matcher(table)
    drop = sorted({phrase for phrase, keep in phrases if not keep})
    checks = [concat(a, literal(phrase)) for phrase in drop]   # value·phrase ∈ L(a)·phrase
    check_of = np.array([drop.index(phrase) if not keep else -1 for phrase, keep in phrases])

    def classify(states: np.ndarray):
        won = winner[states[:, 1]]
        stopped = won >= 0
        ok = a.accepting[states[:, 0]].copy()
        check = np.where(stopped, check_of[np.maximum(won, 0)], -1)
        for j, dfa in enumerate(checks):
            here = check == j
            ok[here] = False if drop_exits else dfa.accepting[states[here, 2 + j]]
        return ok & ~stopped, ok & stopped, stopped
    return _product([a, matcher, *checks], classify)


def _finish_matcher(table: np.ndarray) -> ByteDfa:
    """The phrase matcher as a ByteDfa without trimming (every state is kept, state ids
    unchanged) so winners stay indexed by state."""
    byte_class, first = _column_classes(table)
    matcher = ByteDfa(table, np.zeros(len(table), bool), np.zeros(len(table), bool), 1)
    matcher.__dict__["byte_classes"] = (byte_class, table[:, first])
    return matcher


def _column_classes(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    _, first, byte_class = np.unique(table.T, axis=0, return_index=True, return_inverse=True)
    return byte_class.reshape(256).astype(np.intp), first


def with_stops(a: ByteDfa, phrases: Iterable[tuple[bytes, bool]]) -> ByteDfa:
    """The generated byte streams under stop phrases: generation ends right after the first
    completed phrase (the earliest-ending occurrence; among phrases ending at the same byte
    the longest, then the first listed). The value is the stream up to and including the
    phrase (keep=True, STOPS_AT) or before it (keep=False, STOPS_BEFORE); if that value is
    in L(a) the completing byte leads to an exit state, else to DEAD. A stream without a
    phrase must be in L(a) to end."""
    return _stops_product(a, list(phrases), drop_exits=False)


def stop_values(a: ByteDfa, phrases: Iterable[tuple[bytes, bool]]) -> ByteDfa:
    """The language of final values under `with_stops(a, phrases)`, without exits: values
    ended by end-of-sequence, values cut at a STOPS_AT phrase (phrase included) and values
    cut before a STOPS_BEFORE phrase. The last are exactly the phrase-free values of L(a),
    which the first part already holds, so STOPS_BEFORE completions add nothing here."""
    stream = _stops_product(a, list(phrases), drop_exits=True)
    byte_class, table = stream.byte_classes
    table = table.copy()
    table[stream.exits] = DEAD          # a value cut at a stop ends there
    return _finish(table, byte_class, stream.accepting | stream.exits,
                   np.zeros(stream.n_states, bool), stream.initial)


# ---------------------------------------------------------------- NFA → DFA


class Nfa:
    """A byte NFA with ε-moves and byte-range edges, determinized by subset construction
    (used by the regex compiler and by `concat`)."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int, int]]] = []   # (low, high inclusive, target)
        self.eps: list[list[int]] = []
        self.exits: set[int] = set()

    def state(self) -> int:
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def edge(self, source: int, low: int, high: int, target: int) -> None:
        self.edges[source].append((low, high, target))

    def epsilon(self, source: int, target: int) -> None:
        self.eps[source].append(target)

    def embed(self, dfa: ByteDfa) -> tuple[int, int]:
        """Copy `dfa`'s live states in; returns (start, final): accepting states have an
        ε-move to `final`; exit states are recorded in `self.exits`."""
        final = self.state()
        if dfa.initial == DEAD:
            return self.state(), final
        base = len(self.edges) - 1     # dfa state i ≥ 1 → base + i (DEAD is never a target)
        for _ in range(dfa.n_states - 1):
            self.state()
        rows = dfa.transitions
        for state in range(1, dfa.n_states):
            me = base + state
            if dfa.exits[state]:
                self.exits.add(me)
                continue
            row = rows[state]
            cuts = np.flatnonzero(np.diff(row)) + 1
            starts = np.concatenate([[0], cuts]).tolist()
            ends = np.concatenate([cuts, [256]]).tolist()
            for low, high in zip(starts, ends):
                target = int(row[low])
                if target != DEAD:
                    self.edges[me].append((low, high - 1, base + target))
            if dfa.accepting[state]:
                self.eps[me].append(final)
        return base + dfa.initial, final

    def _closure(self, states: Iterable[int]) -> frozenset[int]:
        seen = set(states)
        stack = list(seen)
        while stack:
            for target in self.eps[stack.pop()]:
                if target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)

    def determinize(self, start: int, accept: set[int], exits: set[int]) -> ByteDfa:
        """Subset construction; a subset is accepting if it holds an `accept` state and an
        exit if it holds an `exits` state (exit wins)."""
        ids: dict[frozenset[int], int] = {frozenset(): DEAD}
        subsets = [frozenset(), self._closure([start])]
        ids[subsets[1]] = 1
        rows: list[list[tuple[int, int, int]]] = [[]]
        head = 1
        while head < len(subsets):
            subset = subsets[head]
            head += 1
            row = []
            if not subset & exits:
                for low, high, targets in _split_ranges(
                        [edge for state in subset for edge in self.edges[state]]):
                    closed = self._closure(targets)
                    target = ids.get(closed)
                    if target is None:
                        target = ids[closed] = len(subsets)
                        subsets.append(closed)
                    row.append((low, high, target))
            rows.append(row)
        cuts = sorted({low for row in rows for low, _, _ in row}
                      | {high + 1 for row in rows for _, high, _ in row} | {0, 256})
        byte_class = np.zeros(256, np.intp)
        for index, (low, high) in enumerate(zip(cuts, cuts[1:])):
            byte_class[low:high] = index
        table = np.zeros((len(subsets), len(cuts) - 1), np.int32)
        for state, row in enumerate(rows):
            for low, high, target in row:
                table[state, byte_class[low]:byte_class[high] + 1] = target
        accepting = np.array([bool(subset & accept) for subset in subsets])
        exit_flags = np.array([bool(subset & exits) for subset in subsets])
        return _finish(table, byte_class, accepting, exit_flags, 1)


def _split_ranges(edges: list[tuple[int, int, int]]) -> list[tuple[int, int, list[int]]]:
    """Disjoint byte ranges with the targets of every edge covering them."""
    if len(edges) <= 1:
        return [(low, high, [target]) for low, high, target in edges]
    cuts = sorted({low for low, _, _ in edges} | {high + 1 for _, high, _ in edges})
    targets: list[list[int]] = [[] for _ in cuts]
    for low, high, target in edges:
        first = bisect_right(cuts, low) - 1
        last = bisect_right(cuts, high) - 1
        for index in range(first, last + 1):
            targets[index].append(target)
    return [(cuts[i], cuts[i + 1] - 1, targets[i]) for i in range(len(cuts) - 1) if targets[i]]


# ---------------------------------------------------------------- walking


def run(dfa: ByteDfa, state: int, data: bytes) -> int:
    """The state after reading `data` from `state`."""
    rows = dfa.transitions
    for byte in data:
        if state == DEAD:
            break
        state = int(rows[state, byte])
    return state


def matches(dfa: ByteDfa, data: bytes) -> bool:
    """Whether `data` is a complete value (reaches an accepting state from `initial`)."""
    return bool(dfa.accepting[run(dfa, dfa.initial, data)])


def is_empty(dfa: ByteDfa) -> bool:
    """Whether no value (and no stop) can be reached at all."""
    return dfa.initial == DEAD


def forced_bytes(dfa: ByteDfa, state: int) -> bytes:
    """The longest byte string forced from `state`: while the state is live, not accepting,
    not an exit and exactly one byte keeps it live, that byte (for fast-forward)."""
    out = bytearray()
    for _ in range(dfa.n_states):
        if state == DEAD or dfa.accepting[state] or dfa.exits[state]:
            break
        live = np.flatnonzero(dfa.transitions[state])
        if live.size != 1:
            break
        out.append(int(live[0]))
        state = int(dfa.transitions[state, live[0]])
    return bytes(out)
