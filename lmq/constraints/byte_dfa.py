"""`ByteDfa`: the deterministic automaton over bytes that every regular constraint compiles
to, and the operations that build and combine them.

The token-mask engine walks token bytes through `transitions`, so the automaton is over
bytes, not characters: a value is constrained exactly as the bytes it becomes, including
UTF-8 characters split across tokens.

Invariants of every ByteDfa handed out (all constructors and operations return trimmed
automata): state 0 is DEAD (absorbing, neither accepting nor exit) and every state from
which no accepting or exit state can be reached is state 0, so "this prefix can still
become a valid value" is `state != 0`. Exit states are absorbing over every byte and never
accepting (the value has already ended there). `initial` is 1, or 0 for the empty
language; states are numbered breadth-first from it; the arrays are read-only. Automata
are minimal, except where Moore's refinement would exceed a work bound (counters of
thousands of states, which are near-minimal as constructed).

Constructors: `literal(s)`, `options(strings)`, `any_bytes()`, `empty()`, `contains(s)`,
`char_count(op, n)`, `valid_utf8()`.
Operations: `intersect(a, b)`, `union(a, b)`, `complement(a)`, `concat(a, b)`,
`with_stops(a, phrases)` (exit states for STOPS_AT / STOPS_BEFORE), `stop_values(a, phrases)`
(the language of final values under those stops).
Helpers: `run`, `matches`, `is_empty`, `forced_bytes`, `fewest_characters`.
`lmq.constraints.regex.regex_dfa` compiles regexes; `lmq.constraints.gbnf_export.dfa_to_gbnf`
exports GBNF.

Internally automata are built in "classed" form: a table over byte classes (bytes that
behave alike in every state) plus the byte → class map, which keeps products and
minimization proportional to the number of distinct behaviours, not to 256.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from lmq.constraints import limits, token_choice
from lmq.errors import ConstraintError

DEAD = 0
CHAR_COUNT_OPS = ("<", "<=", "==", "!=", ">", ">=")
#: an option list's trie may have this many times `limits.MAX_STATES` nodes (shared
#: suffixes merge: 20,000 words of 4-12 letters are 150,000 nodes, 55,000 states)
OPTION_NODES_PER_STATE = 8


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


Rows = list  # list[list[int]]: a classed transition table, one list of k targets per state
_SMALL_TABLE = 4096   # states × classes below which pure Python beats numpy
# table cells Moore's refinement may visit before giving up (pure Python / numpy rounds)
_MOORE_WORK_PYTHON, _MOORE_WORK_NUMPY = 2_000_000, 4_000_000


def _finish(table: Rows | np.ndarray, byte_class: np.ndarray, accepting: Sequence[bool],
            exits: Sequence[bool], initial: int, minimal: bool = False) -> ByteDfa:
    """Trim, minimize and renumber a classed automaton into a ByteDfa with the invariants.

    `table` (n × k) may use any state as dead; `exits` rows are made absorbing here;
    `minimal` skips minimization for constructions that are minimal once trimmed.
    Pure Python on lists: the automata met in practice have few states, where numpy's
    per-call overhead dominates; every step is linear except the (bounded) refinement."""
    rows = table.tolist() if isinstance(table, np.ndarray) else list(table)
    exits = _as_list(exits)
    accepting = [flag and not exit_ for flag, exit_ in zip(_as_list(accepting), exits)]
    width = len(rows[0]) if rows else 1
    for state, exit_ in enumerate(exits):
        if exit_:
            rows[state] = [state] * width
    order = [initial]                          # reachable states, breadth-first
    seen = {initial}
    for state in order:
        for target in rows[state]:
            if target not in seen:
                seen.add(target)
                order.append(target)
    predecessors: dict[int, list[int]] = {state: [] for state in order}
    for state in order:
        for target in set(rows[state]):
            predecessors[target].append(state)
    stack = [state for state in order if accepting[state] or exits[state]]
    live = set(stack)
    while stack:
        for source in predecessors[stack.pop()]:
            if source not in live:
                live.add(source)
                stack.append(source)
    if initial not in live:
        return empty()
    keep = [state for state in order if state in live]
    new_index = {state: index for index, state in enumerate(keep, 1)}
    trimmed = [[0] * width] + [[new_index.get(target, 0) for target in rows[state]]
                               for state in keep]
    flags = [(False, False)] + [(accepting[state], exits[state]) for state in keep]
    block_of = list(range(len(trimmed))) if minimal else _minimize(trimmed, flags)
    # Renumber blocks breadth-first from the initial block (1); the dead block is 0.
    number = {block_of[0]: 0, block_of[1]: 1}
    members = [0, 1]
    for state in members:
        for target in trimmed[state]:
            if block_of[target] not in number:
                number[block_of[target]] = len(members)
                members.append(target)
    final = [[number[block_of[target]] for target in trimmed[state]] for state in members]
    # Merge byte classes that became equal (coarsest classes: fewer for the mask engine).
    merged: dict[tuple[int, ...], int] = {}
    class_of = [merged.setdefault(column, len(merged)) for column in zip(*final)]
    table = np.array(list(merged), dtype=np.int32).T.reshape(len(members), len(merged))
    return _seal(table, np.asarray(class_of, np.intp)[byte_class],
                 np.array([flags[state][0] for state in members]),
                 np.array([flags[state][1] for state in members]), 1)


def _as_list(flags: Sequence[bool]) -> list[bool]:
    return flags.tolist() if isinstance(flags, np.ndarray) else [bool(flag) for flag in flags]


def _minimize(rows: Rows, flags: list[tuple[bool, bool]]) -> list[int]:
    """Moore's partition refinement: the block of each state in the coarsest partition
    that separates `flags` and is stable under `rows` (state 0, dead, stays alone).

    Small tables number signatures with a dict; large ones hash each row of block ids
    with random 64-bit weights in numpy, verify that every row equals its group's first
    row (so a hash collision can never merge states), and fall back to an exact sort.
    Moore needs as many rounds as the longest distinguishing suffix; past a work bound
    (`_MOORE_WORK_*` cells) the automaton is left unminimized (still trimmed and correct:
    long counters such as `[a-z]{1,5000}` are near-minimal as constructed)."""
    n, width = len(rows), len(rows[0])
    kinds: dict[tuple[bool, bool], int] = {}
    block = [0] + [kinds.setdefault(flags[state], len(kinds) + 1) for state in range(1, n)]
    count = len(kinds) + 1
    if n * width <= _SMALL_TABLE:
        for _ in range(max(1, _MOORE_WORK_PYTHON // (n * width))):
            numbers: dict[tuple, int] = {}
            block = [numbers.setdefault((block[state], *[block[t] for t in row]), len(numbers))
                     for state, row in enumerate(rows)]
            if len(numbers) == count:
                return block
            count = len(numbers)
        return list(range(n))
    table = np.asarray(rows, dtype=np.int64)
    blocks = np.asarray(block, dtype=np.int64)
    weights = np.random.default_rng(0).integers(1, 2 ** 63, size=width + 1, dtype=np.int64)
    for _ in range(max(1, _MOORE_WORK_NUMPY // (n * width))):
        signature = np.column_stack((blocks, blocks[table]))
        hashed = (signature * weights).sum(axis=1)
        _, first, new = np.unique(hashed, return_index=True, return_inverse=True)
        if not (signature == signature[first[new.reshape(-1)]]).all():
            new = np.unique(signature, axis=0, return_inverse=True)[1]
        blocks = new.reshape(-1)
        new_count = int(blocks.max()) + 1
        if new_count == count:
            return blocks.tolist()
        count = new_count
    return list(range(n))


def _seal(table: np.ndarray, byte_class: np.ndarray, accepting: np.ndarray,
          exits: np.ndarray, initial: int) -> ByteDfa:
    transitions = np.ascontiguousarray(table[:, byte_class], dtype=np.int32)
    for array in (transitions, accepting, exits):
        array.setflags(write=False)
    dfa = ByteDfa(transitions, accepting, exits, initial)
    dfa.__dict__["byte_classes"] = (np.asarray(byte_class, dtype=np.intp), table)
    return dfa


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
    """Exactly one of `strings`. An option that is a prefix of another both accepts and
    continues. The minimal acyclic automaton, built without a partition refinement and
    without a state per byte of the trie (long options would make thousands):

    1. the radix tree of the sorted options (a node where options branch or end, an
       edge per run of bytes between), from their common prefixes;
    2. its nodes merged bottom-up, equal (accepting, edges) being equal languages;
    3. the bytes inside the edges into one merged node, as states per distinct edge
       suffix: a state inside an edge has a single continuation, so it equals another
       exactly when both spell the same suffix into the same node.
    States are numbered breadth-first in byte order and byte classes are merged as
    `_finish` does, so the automaton is the one any other construction gives: where the
    kernel is in use, `_kernel_options.h` builds it (the trie merged from the leaves up)
    cell for cell, 4-5x faster."""
    words = sorted(set(_option_bytes(strings)))
    if not words:
        return empty()
    compiled = getattr(token_choice.KERNEL, "options_dfa", None)
    if compiled is not None:
        built = compiled(words, OPTION_NODES_PER_STATE * limits.MAX_STATES)
        if built is not NotImplemented:            # else past the bound: named below
            table, classes, byte_class, accepting = built
            return _seal(np.frombuffer(table, np.int32).reshape(-1, classes),
                         np.frombuffer(byte_class, np.int32).astype(np.intp),
                         np.frombuffer(accepting, np.bool_), np.zeros(len(accepting), bool), 1)
    radix = _radix_tree(words)
    node_class: list[int] = [0] * len(radix)
    signatures: dict[tuple, int] = {}
    for node in _children_first(radix):
        accepting, edges = radix[node]
        node_class[node] = signatures.setdefault(
            (accepting, tuple((label, node_class[child]) for label, child in edges)), len(signatures))
    classes = {number: signature for signature, number in signatures.items()}
    # states: a merged node, or (suffix, node) inside edges; each one's (byte, target) pairs
    number = {(b"", node_class[0]): 1}
    order: list[tuple] = [(b"", node_class[0])]
    sources, bytes_, targets, accepting = [], [], [], [False]
    lookup, grow = number.get, order.append
    for source, (suffix, node) in enumerate(order, 1):      # `order` grows as it is read
        if suffix:
            out: Iterable = ((suffix[0], (suffix[1:], node)),)
            accepting.append(False)
        else:
            final, edges = classes[node]
            out = [(label[0], (label[1:], child)) for label, child in edges]
            accepting.append(final)
        for byte, target in out:
            known = lookup(target)
            if known is None:
                grow(target)
                known = number[target] = len(order)
            sources.append(source)
            bytes_.append(byte)
            targets.append(known)
    count = len(order) + 1
    transitions = np.zeros((count, 256), np.int32)
    transitions[sources, bytes_] = targets
    used = sorted(set(bytes_))
    columns = np.ascontiguousarray(transitions[:, used].T)
    merged: dict[bytes, int] = {bytes(4 * count): 0}
    class_of = [merged.setdefault(column.tobytes(), len(merged)) for column in columns]
    byte_class = np.zeros(256, np.intp)
    byte_class[used] = class_of
    first = np.zeros(len(merged), np.intp)
    first[class_of] = used                    # a byte of each class (any: they act alike)
    table = transitions[:, first]
    table[:, 0] = DEAD
    return _seal(table, byte_class, np.array(accepting), np.zeros(count, bool), 1)


def _option_bytes(strings: Iterable[bytes]) -> Iterator[bytes]:
    for data in strings:
        if not isinstance(data, (bytes, bytearray)):
            raise ConstraintError(f"an option must be bytes, not {data!r}")
        yield bytes(data)


def _common_prefix(a: bytes, b: bytes) -> int:
    """The length of the common prefix of `a` and `b` (slices compared by halves)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while high - low > 1:                     # a[:low] == b[:low], a[:high] != b[:high]
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


def _children_first(tree: list[tuple[bool, list]]) -> list[int]:
    """The nodes of a tree (node 0 the root), each after all of its children."""
    order, stack = [], [0]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(child for _, child in tree[node][1])
    return order[::-1]


def _radix_tree(words: list[bytes]) -> list[tuple[bool, list]]:
    """The radix tree of sorted distinct `words`: per node (accepting, [(edge bytes,
    child)]), edges in byte order, node 0 the root. The trie it compresses is bounded
    like an option trie (`OPTION_NODES_PER_STATE`)."""
    nodes: list[tuple[bool, list]] = [(words[0] == b"", [])]
    stack = [(0, 0)]                                   # (depth, node) along the last word
    previous = b""
    trie_nodes = 1
    for word in words:
        common = _common_prefix(previous, word)
        trie_nodes += len(word) - common
        if trie_nodes > OPTION_NODES_PER_STATE * limits.MAX_STATES:
            raise limits.too_many_states("the list of options", f"{trie_nodes:,} trie nodes "
                                         f"({OPTION_NODES_PER_STATE} per state)")
        while stack[-1][0] > common:
            child_depth, child = stack.pop()
            if stack[-1][0] < common:                  # the edge to `child` branches inside
                parent = stack[-1][1]
                label, _ = nodes[parent][1][-1]
                cut = common - stack[-1][0]
                nodes.append((False, [(label[cut:], child)]))
                nodes[parent][1][-1] = (label[:cut], len(nodes) - 1)
                stack.append((common, len(nodes) - 1))
        if len(word) > common:
            nodes.append((True, []))
            nodes[stack[-1][1]][1].append((word[common:], len(nodes) - 1))
            stack.append((len(word), len(nodes) - 1))
        previous = word
    return nodes


def contains(data: bytes) -> ByteDfa:
    """Σ* data Σ*: every byte string containing `data`."""
    if not data:
        return any_bytes()
    table, winner = _phrase_matcher([data])
    done = winner >= 0
    table[done] = np.flatnonzero(done)[:, None]
    byte_class, first = _column_classes(table)
    return _finish(table[:, first], byte_class, done, np.zeros_like(done), 1)


def char_count(op: str, n: int) -> ByteDfa:
    """Byte strings whose number of UTF-8 characters (bytes that are not continuation bytes
    0x80–0xBF) compares with `n` by `op` (`len(X) op n`)."""
    if op not in CHAR_COUNT_OPS:
        raise ConstraintError(f"unknown comparison {op!r} for a character count "
                              f"(use one of {', '.join(CHAR_COUNT_OPS)})")
    if not isinstance(n, int) or isinstance(n, bool):
        raise ConstraintError(f"a character count bound must be an int, not {n!r}")
    if op == ">=":                # ≥ n is > n − 1: keeps "exactly n" and "more" one state
        op, n = ">", n - 1
    if n + 2 > limits.MAX_STATES:
        raise limits.too_many_states(f"the character count len(X) {op} {n}")
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
    return _finish(table, byte_class, accepting, np.zeros(top + 2, bool), 1, minimal=True)


def valid_utf8() -> ByteDfa:
    """Every well-formed UTF-8 byte string (no overlongs, surrogates or stray bytes)."""
    from lmq.constraints.regex import regex_dfa
    return regex_dfa(r"(?s).*")


# ---------------------------------------------------------------- products


def _joint_classes(dfas: Sequence[ByteDfa]) -> tuple[np.ndarray, list[Rows]]:
    """The coarsest byte classes refining those of every automaton, and each automaton's
    table over them."""
    code = np.zeros(256, np.int64)
    for dfa in dfas:
        byte_class, table = dfa.byte_classes
        code = code * table.shape[1] + byte_class
    _, first, byte_class = np.unique(code, return_index=True, return_inverse=True)
    return (byte_class.reshape(256).astype(np.intp),
            [dfa.transitions[:, first].tolist() for dfa in dfas])


#: component states → (accepting, exit, terminal); a terminal state is not expanded (it
#: becomes absorbing, so a terminal state that is no exit is dead)
Classifier = Callable[[tuple[int, ...]], tuple[bool, bool, bool]]


def _product(dfas: Sequence[ByteDfa], classify: Classifier) -> ByteDfa:
    """The reachable product of `dfas`, classified state by state."""
    byte_class, tables = _joint_classes(dfas)
    start = tuple(dfa.initial for dfa in dfas)
    ids = {start: 0}
    states = [start]
    rows: Rows = []
    accepting: list[bool] = []
    exits: list[bool] = []
    for index, state in enumerate(states):
        accept, exit_, terminal = classify(state)
        accepting.append(accept)
        exits.append(exit_)
        if terminal:
            rows.append([index] * len(tables[0][0]))
            continue
        row = []
        for target in zip(*(table[component] for table, component in zip(tables, state))):
            number = ids.get(target)
            if number is None:
                if len(states) >= limits.MAX_STATES:
                    raise limits.too_many_states("the product of the automata")
                number = ids[target] = len(states)
                states.append(target)
            row.append(number)
        rows.append(row)
    return _finish(rows, byte_class, accepting, exits, 0)


def _no_exits(operation: str, *dfas: ByteDfa) -> None:
    if any(dfa.has_exits for dfa in dfas):
        raise ConstraintError(f"{operation} of an automaton with stop phrases is not defined: "
                              "combine the value constraints first, then add the stops")


def intersect(a: ByteDfa, b: ByteDfa) -> ByteDfa:
    """L(a) ∩ L(b) (neither may have exits)."""
    _no_exits("the intersection", a, b)
    a_accepts, b_accepts = a.accepting.tolist(), b.accepting.tolist()

    def classify(state: tuple[int, ...]) -> tuple[bool, bool, bool]:
        left, right = state
        return a_accepts[left] and b_accepts[right], False, left == DEAD or right == DEAD
    return _product([a, b], classify)


def union(a: ByteDfa, b: ByteDfa) -> ByteDfa:
    """L(a) ∪ L(b). Exits are kept: under `or`, each side's stop ends the value on its own."""
    a_accepts, b_accepts = a.accepting.tolist(), b.accepting.tolist()
    a_exits, b_exits = a.exits.tolist(), b.exits.tolist()

    def classify(state: tuple[int, ...]) -> tuple[bool, bool, bool]:
        left, right = state
        exit_ = a_exits[left] or b_exits[right]
        return (a_accepts[left] or b_accepts[right]) and not exit_, exit_, exit_
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
    matcher = _unfinished(table)
    drop = sorted({phrase for phrase, keep in phrases if not keep})
    check_dfas = [] if drop_exits else [concat(a, literal(phrase)) for phrase in drop]
    checks = [dfa.accepting.tolist() for dfa in check_dfas]
    check_of = [drop.index(phrase) if not keep else -1 for phrase, keep in phrases]
    winners = winner.tolist()
    a_accepts = a.accepting.tolist()

    def classify(state: tuple[int, ...]) -> tuple[bool, bool, bool]:
        won = winners[state[1]]
        if won < 0:
            return a_accepts[state[0]], False, False
        check = check_of[won]
        if check < 0:
            ok = a_accepts[state[0]]          # STOPS_AT: the value holds the phrase
        else:                                 # STOPS_BEFORE: value·phrase ∈ L(a)·phrase
            ok = not drop_exits and checks[check][state[2 + check]]
        return False, ok, True
    return _product([a, matcher, *check_dfas], classify)


def _unfinished(table: np.ndarray) -> ByteDfa:
    """An automaton with exactly these transitions (no trimming, ids kept) for products
    whose classifier reads component state ids."""
    byte_class, first = _column_classes(table)
    flags = np.zeros(len(table), bool)
    dfa = ByteDfa(table, flags, flags, 1)
    dfa.__dict__["byte_classes"] = (byte_class, table[:, first])
    return dfa


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
        self._closures: dict[int, frozenset[int]] = {}

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
        """The states reachable by ε-moves (each state's own closure computed once)."""
        closed: set[int] = set()
        for state in states:
            own = self._closures.get(state)
            if own is None:
                own = self._closures[state] = self._closure_of(state)
            closed |= own
        return frozenset(closed)

    def _closure_of(self, state: int) -> frozenset[int]:
        seen = {state}
        stack = [state]
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
                        if len(subsets) > limits.MAX_STATES:
                            raise limits.too_many_states("the automaton")
                        target = ids[closed] = len(subsets)
                        subsets.append(closed)
                    row.append((low, high, target))
            rows.append(row)
        cuts = sorted({low for row in rows for low, _, _ in row}
                      | {high + 1 for row in rows for _, high, _ in row} | {0, 256})
        byte_class = np.zeros(256, np.intp)
        for index, (low, high) in enumerate(zip(cuts, cuts[1:])):
            byte_class[low:high] = index
        class_of = byte_class.tolist()
        table: Rows = []
        for row in rows:
            classed = [DEAD] * (len(cuts) - 1)
            for low, high, target in row:
                classed[class_of[low]:class_of[high] + 1] = \
                    [target] * (class_of[high] + 1 - class_of[low])
            table.append(classed)
        accepting = [bool(subset & accept) for subset in subsets]
        exit_flags = [bool(subset & exits) for subset in subsets]
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


def fewest_characters(dfa: ByteDfa) -> np.ndarray:
    """Per state, the fewest UTF-8 characters (bytes that are not continuation bytes) that
    lead to an accepting or exit state (int64; a large number for DEAD): what a value
    still needs from there, for a character budget counted outside the automaton."""
    byte_class, table = dfa.byte_classes
    free = np.zeros(table.shape[1], bool)              # a class holding a continuation byte
    free[np.unique(byte_class[0x80:0xC0])] = True
    predecessors: list[list[tuple[int, int]]] = [[] for _ in range(len(table))]
    for state, row in enumerate(table.tolist()):
        for column, target in enumerate(row):
            if target != DEAD:
                predecessors[target].append((state, 0 if free[column] else 1))
    unreached = np.iinfo(np.int64).max // 4
    fewest = [unreached] * len(table)
    ends = np.flatnonzero(dfa.accepting | dfa.exits).tolist()
    for state in ends:
        fewest[state] = 0
    frontier = deque(ends)                             # 0-1 breadth-first search backwards
    while frontier:
        state = frontier.popleft()
        for source, cost in predecessors[state]:
            if fewest[state] + cost < fewest[source]:
                fewest[source] = fewest[state] + cost
                (frontier.appendleft if cost == 0 else frontier.append)(source)
    return np.array(fewest, dtype=np.int64)


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
