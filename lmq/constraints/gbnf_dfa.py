"""A GBNF grammar whose language is regular as a `ByteDfa`, so that its hole is enforced
by `DfaTokenAutomaton` (masks computed once per state and cached) instead of llguidance
(a mask computed per step: ~2 ms at 152k tokens in a JSON string).

A grammar in which no rule can reach itself is regular: its rules inline into one byte
NFA (`gbnf.GrammarNfa`, characters as their UTF-8 byte automata, exactly as the regex
compiler reads classes), determinized here. JSON schemas without recursion (`$ref`
cycles, `Any`, untyped `additionalProperties`) come out this way; a recursive grammar,
or one whose automaton would pass `MAX_DFA_STATES`, stays with llguidance (`None`).

The subset construction keys a DFA state by its kernel (the NFA states with byte edges,
plus whether the final state is reached), not by the whole ε-closure: closures that differ
only in ε-states are one state. The grammar converter's NFAs are nearly deterministic, so
kernels are mostly single states and the construction is linear in the automaton. The
result is trimmed and numbered breadth-first like every `ByteDfa`; it is not minimized
(Moore's refinement would cost more than the construction, and the kernel construction
is near-minimal on these grammars).

Where the C kernel is built, all of this runs there (`_kernel_dfa.h`, GBNF text to table
and disk entry, the same steps giving the identical DFA): the cold compile of a JSON
schema is then well under a millisecond instead of ~11 ms of Python per DFA state.
"""

from __future__ import annotations

import base64
import functools
import zlib
from typing import Callable

import numpy as np

from lmq.constraints import gbnf as g
from lmq.constraints import grammar_cache, limits, token_choice
from lmq.constraints.byte_dfa import DEAD, ByteDfa
from lmq.constraints.regex import NFA_STATES_PER_STATE, character_utf8

#: a grammar whose DFA would grow past this many states (or `limits.MAX_STATES`, if lower)
#: stays with llguidance: masks are cached per state, and each string position of a JSON
#: document is a state (~13 per character of a `maxLength`). At most 65,535: the grammar
#: cache stores states as uint16
MAX_DFA_STATES = 6000


class _TooLarge(Exception):
    pass


def grammar_dfa(grammar: g.Grammar) -> ByteDfa | None:
    """The DFA of `grammar`'s language, or None when the grammar is recursive or its
    automaton too large (it is then enforced by llguidance)."""
    return _built(grammar.text, lambda: grammar)[0]


def text_grammar_dfa(text: str, owner: str) -> ByteDfa | None:
    """`grammar_dfa` of GBNF `text` (`owner` names it in errors), which the kernel parses
    itself: the Python parse only where the kernel leaves the grammar to Python."""
    return _text_built(text, owner)[0]


def _text_built(text: str, owner: str) -> tuple[ByteDfa | None, bytes | None]:
    return _built(text, lambda: g.parse_gbnf(text, owner=owner))


def _built(text: str, parsed: Callable[[], g.Grammar]) -> tuple[ByteDfa | None, bytes | None]:
    """`grammar_dfa` of GBNF `text`, with its table's `_cells` where the kernel wrote them:
    from the compiled kernel, which parses and checks the text itself (the whole cold
    compile of a JSON schema in under a millisecond), else from `parsed()` in Python. The
    kernel leaves to Python every grammar it cannot vouch for (an error to name, recursion
    among the rules) and builds the identical DFA of the others."""
    bound = min(MAX_DFA_STATES, limits.MAX_STATES)
    if token_choice.KERNEL is not None:
        built = token_choice.KERNEL.grammar_dfa(text, bound, NFA_STATES_PER_STATE * bound,
                                                limits.MAX_GRAMMAR_RULES, limits.MAX_GRAMMAR_DEPTH,
                                                character_utf8)
        if built is not NotImplemented:
            if built is None:
                return None, None
            table, classes, byte_class, accepting, transitions, cells = built
            return _sealed(np.frombuffer(table, np.int32).reshape(-1, classes),
                           np.frombuffer(byte_class, np.uint8).astype(np.intp),
                           np.frombuffer(accepting, np.bool_),
                           np.frombuffer(transitions, np.int32).reshape(-1, 256)), cells
    rules = parsed().rules
    if not _inlinable(rules):
        return None, None
    builder = _Builder(rules, NFA_STATES_PER_STATE * bound)
    try:
        start, final = builder.state(), builder.state()
        builder.fragment(g.RuleRef("root"), start, final)
        return _determinize(builder.edges, builder.epsilon, start, final, bound, builder.trim), None
    except (_TooLarge, RecursionError):       # groups nested deep inside a deep chain of rules
        return None, None


@functools.lru_cache(maxsize=32)
def cached_grammar_dfa(text: str, owner: str) -> ByteDfa | None:
    """`grammar_dfa` of GBNF `text`, through the grammar cache on disk (a DFA depends on
    the grammar only, never on the vocabulary; "no DFA" is kept too, so a recursive or
    large grammar is not tried again). Few are kept in memory: a DFA's byte table is
    about 1.5 MiB for the bench's schema, and loading it from disk takes about 1 ms. A DFA
    built here is returned as built; its entry is encoded and written behind."""
    built = grammar_cache.cached(f"dfa{min(MAX_DFA_STATES, limits.MAX_STATES)}", text,
                                 lambda: _text_built(text, owner), lambda pair: _encoded(*pair),
                                 lambda entry: (_decoded(entry), None))
    return built[0]


def _inlinable(rules: dict[str, g.Node]) -> bool:
    """Whether the rules reachable from `root` inline into one expression: none can reach
    itself, and no chain of references is deeper than `limits.MAX_GRAMMAR_DEPTH` (as
    llguidance's lexemes, `lmq.constraints.llguidance_lark`)."""
    refs = g.references(rules)
    height: dict[str, int] = {}
    pending = [("root", False)]
    on_path: set[str] = set()
    while pending:
        name, done = pending.pop()
        if done:
            on_path.discard(name)
            height[name] = 1 + max((height[r] for r in refs[name]), default=0)
            if height[name] > limits.MAX_GRAMMAR_DEPTH:
                return False
            continue
        if name in height:
            continue
        if name in on_path:
            return False                       # recursion: not regular in general
        on_path.add(name)
        pending.append((name, True))
        pending.extend((r, False) for r in refs[name] if r not in height)
    return True


class _Builder(g.GrammarNfa):
    """The grammar's byte NFA: characters as their UTF-8 automata, literals as their bytes.
    A rule is built once; its later uses copy those states (a JSON string's `char` is
    used once per character of its `maxLength`)."""

    def __init__(self, rules: dict[str, g.Node], most_states: int):
        super().__init__(rules)
        self.most_states = most_states
        self.edges: list[list[tuple[int, int, int]]] = []      # (low, high inclusive, target)
        #: per rule built: (start, end, its inner states' range, its moves out of start)
        self.built: dict[str, tuple[int, int, int, int, list, list]] = {}
        #: some character class is empty: states that reach no end may exist
        self.trim = False

    def state(self) -> int:
        if len(self.edges) >= self.most_states:
            raise _TooLarge
        self.edges.append([])
        self.epsilon.append([])
        return len(self.edges) - 1

    def literal(self, text: str, start: int, end: int) -> None:
        data = text.encode("utf-8", "surrogatepass")
        here = start
        for position, byte in enumerate(data):
            target = end if position == len(data) - 1 else self.state()
            self.edges[here].append((byte, byte, target))
            here = target

    def character(self, ranges: tuple[tuple[int, int], ...], start: int, end: int) -> None:
        """One character of `ranges` as its UTF-8 bytes (never a surrogate)."""
        states = character_utf8(ranges)
        self.trim = self.trim or not states[0]
        ids = [start] + [self.state() for _ in states[1:]]
        for source, edges in zip(ids, states):
            self.edges[source].extend((low, high, end if target < 0 else ids[target])
                                      for low, high, target in edges)

    def rule(self, name: str, start: int, end: int) -> None:
        built = self.built.get(name)
        if built is None:
            inner, moves, moves_eps = len(self.edges), len(self.edges[start]), len(self.epsilon[start])
            self.fragment(self.rules[name], start, end)
            self.built[name] = (start, end, inner, len(self.edges), self.edges[start][moves:],
                                self.epsilon[start][moves_eps:])
            return
        old_start, old_end, first, last, moves, moves_eps = built
        if len(self.edges) + last - first > self.most_states:
            raise _TooLarge
        shift = len(self.edges) - first
        place = {old_start: start, old_end: end}
        edges, epsilon = self.edges, self.epsilon
        for state in range(first, last):
            edges.append([(low, high, place.get(target, target + shift))
                          for low, high, target in edges[state]])
            epsilon.append([place.get(target, target + shift) for target in epsilon[state]])
        edges[start].extend((low, high, place.get(target, target + shift)) for low, high, target in moves)
        epsilon[start].extend(place.get(target, target + shift) for target in moves_eps)


def _determinize(edges: list[list[tuple[int, int, int]]], eps: list[list[int]], start: int,
                 final: int, bound: int, trim: bool) -> ByteDfa:
    """Subset construction over kernels (see the module docstring), trimmed where `trim`
    says some NFA state may reach no end (else every nonempty kernel is live)."""
    reached: dict[int, tuple[frozenset[int], bool]] = {}

    def reach(state: int) -> tuple[frozenset[int], bool]:
        """(the kernel of the state's ε-closure, whether it holds `final`)."""
        found = reached.get(state)
        if found is None:
            if not eps[state]:
                found = (frozenset((state,) if edges[state] else ()), state == final)
            else:
                seen, stack = {state}, [state]
                while stack:
                    for target in eps[stack.pop()]:
                        if target not in seen:
                            seen.add(target)
                            stack.append(target)
                found = (frozenset(s for s in seen if edges[s]), final in seen)
            reached[state] = found
        return found

    first = reach(start)
    ids: dict[tuple[frozenset[int], bool], int] = {(frozenset(), False): DEAD, first: 1}
    order = [first]
    moves: list[tuple[int, int, int, int]] = []       # (source, low, high, target)
    for number, (kernel, _) in enumerate(order, 1):      # `order` grows as it is read
        for low, high, key in _moves(kernel, edges, reach):
            target = ids.get(key)
            if target is None:
                if len(order) >= bound:
                    raise _TooLarge
                target = ids[key] = len(order) + 1
                order.append(key)
            if target != DEAD:
                moves.append((number, low, high, target))
    accepting = np.array([False] + [accept for _, accept in order])
    table = np.array(moves, np.int64).reshape(-1, 4)
    return _trimmed(len(order) + 1, table[:, 0], table[:, 1], table[:, 2],
                    table[:, 3].astype(np.int32), accepting, trim)


def _moves(kernel: frozenset[int], edges: list[list[tuple[int, int, int]]],
           reach) -> list[tuple[int, int, tuple[frozenset[int], bool]]]:
    """The DFA moves of a kernel: (low, high, target key) over disjoint byte ranges."""
    if len(kernel) == 1:
        (state,) = kernel
        moves = edges[state]
        if len(moves) == 1:
            low, high, target = moves[0]
            return [(low, high, reach(target))]
    else:
        moves = [edge for state in kernel for edge in edges[state]]
    ordered = sorted(moves)
    if all(ordered[i][1] < ordered[i + 1][0] for i in range(len(ordered) - 1)):
        return [(low, high, reach(target)) for low, high, target in ordered]
    cuts = sorted({low for low, _, _ in ordered} | {high + 1 for _, high, _ in ordered})
    found = []
    for low, high in zip(cuts, cuts[1:]):
        covering = [target for a, b, target in ordered if a <= low and high - 1 <= b]
        if covering:
            parts = [reach(target) for target in covering]
            found.append((low, high - 1, (frozenset().union(*(k for k, _ in parts)),
                                          any(accept for _, accept in parts))))
    return found


def _trimmed(count: int, sources: np.ndarray, lows: np.ndarray, highs: np.ndarray,
             targets: np.ndarray, accepting: np.ndarray, trim: bool) -> ByteDfa:
    """The ByteDfa of `count` states (0 dead, 1 initial, breadth-first) and their moves
    over byte ranges, with the states that reach no accepting state made DEAD (`trim`:
    there may be some)."""
    live = np.ones(count, bool) if not trim else _live(count, sources, targets, accepting)
    live[DEAD] = False
    if not live[1]:
        raise _TooLarge                  # an empty language: llguidance names the failure
    number = np.zeros(count, np.int32)
    number[live] = np.arange(1, int(live.sum()) + 1, dtype=np.int32)
    kept = live[sources] & live[targets]
    sources, lows, highs, targets = sources[kept], lows[kept], highs[kept], targets[kept]
    # byte classes: the pieces between range boundaries, then equal columns merged
    cuts = np.unique(np.concatenate([[0, 256], lows, highs + 1]))
    piece = np.repeat(np.arange(len(cuts) - 1), np.diff(cuts))
    first, last = piece[lows], piece[highs]
    widths = last - first + 1
    cells = (np.repeat(number[sources].astype(np.int64) * (len(cuts) - 1) + first - np.cumsum(widths)
                       + widths, widths) + np.arange(int(widths.sum())))
    pieces = np.zeros((int(live.sum()) + 1, len(cuts) - 1), np.int32)
    pieces.reshape(-1)[cells] = np.repeat(number[targets], widths)
    piece_class = _equal_columns(pieces)
    table = np.take(pieces, np.unique(piece_class, return_index=True)[1], axis=1)
    byte_class = piece_class[piece].astype(np.intp)
    flags = np.concatenate([[False], accepting[live]])
    return _sealed(table, byte_class, flags)


def _live(count: int, sources: np.ndarray, targets: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """Which states reach an accepting state."""
    live = accepting.copy()
    predecessors: list[list[int]] = [[] for _ in range(count)]
    for source, target in zip(sources.tolist(), targets.tolist()):
        predecessors[target].append(source)
    stack = np.flatnonzero(accepting).tolist()
    while stack:
        for source in predecessors[stack.pop()]:
            if not live[source]:
                live[source] = True
                stack.append(source)
    return live


def _equal_columns(table: np.ndarray) -> np.ndarray:
    """Per column, a class number shared by equal columns, numbered in order of first
    appearance."""
    number: dict[bytes, int] = {}
    columns = np.ascontiguousarray(table.T)
    return np.array([number.setdefault(column.tobytes(), len(number)) for column in columns])


def _sealed(table: np.ndarray, byte_class: np.ndarray, accepting: np.ndarray,
            transitions: np.ndarray | None = None) -> ByteDfa:
    """The read-only ByteDfa of a classed table (no exits), its byte classes kept; its
    `transitions` (`table`'s columns by `byte_class`) made here unless given."""
    if transitions is None:
        transitions = np.take(table, byte_class, axis=1)      # (a gather 10x slower)
    exits = np.zeros(len(table), bool)
    for array in (transitions, accepting, exits, table, byte_class):
        array.setflags(write=False)
    dfa = ByteDfa(transitions, accepting, exits, 1)
    dfa.__dict__["byte_classes"] = (byte_class, table)
    return dfa


def _encoded(dfa: ByteDfa | None, cells: bytes | None = None) -> str:
    """A DFA as text for the grammar cache ("" for none): its shape, byte classes,
    accepting states and classed table's `_cells` (zlib), base64."""
    if dfa is None:
        return ""
    byte_class, table = dfa.byte_classes
    parts = (np.asarray(byte_class, np.uint8).tobytes(), np.packbits(dfa.accepting).tobytes(),
             zlib.compress(_cells(table) if cells is None else cells, 1))
    return f"{table.shape[0]},{table.shape[1]};" + ";".join(
        base64.b64encode(part).decode("ascii") for part in parts)


def _cells(table: np.ndarray) -> bytes:
    """A classed table by its non-DEAD cells (most are DEAD: a quarter of the dense
    table's bytes for zlib to read): per row their count (uint16), then their targets
    (uint16) and classes (uint8), row by row."""
    rows, width = table.shape
    flat = table.reshape(-1)
    cells = np.flatnonzero(flat)
    return (np.bincount(cells // width, minlength=rows).astype(np.uint16).tobytes()
            + flat[cells].astype(np.uint16).tobytes() + (cells % width).astype(np.uint8).tobytes())


def _decoded(text: str) -> ByteDfa | None:
    """The DFA `_encoded` wrote (ValueError for text it cannot have written)."""
    if not text:
        return None
    shape, *parts = text.split(";")
    rows, width = map(int, shape.split(","))
    byte_class, accepting, table = map(base64.b64decode, parts)
    try:
        cells = zlib.decompress(table)
    except zlib.error as error:
        raise ValueError(f"a damaged DFA entry: {error}") from error
    count = (len(cells) - 2 * rows) // 3
    per_row = np.frombuffer(cells, np.uint16, rows)
    targets = np.frombuffer(cells, np.uint16, count, 2 * rows)
    classes = np.frombuffer(cells, np.uint8, count, 2 * rows + 2 * count)
    classed = np.zeros((rows, width), np.int32)
    classed[np.repeat(np.arange(rows), per_row), classes] = targets
    return _sealed(classed, np.frombuffer(byte_class, np.uint8).astype(np.intp),
                   np.unpackbits(np.frombuffer(accepting, np.uint8), count=rows).astype(bool))
