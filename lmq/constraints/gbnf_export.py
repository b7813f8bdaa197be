"""`dfa_to_gbnf`: a `ByteDfa` as a GBNF grammar in llama.cpp's dialect (root rule `root`),
so that a constraint program can run on any engine that accepts GBNF.

What the grammar accepts: every string that reaches an accepting state, and every string
that reaches an exit state, up to and including the byte that completed the stop phrase.
For STOPS_AT that is the final value. For STOPS_BEFORE it is the final value followed by
the phrase: an engine enforcing the grammar generates the phrase and must then end, and
its stop-string handling (llama.cpp's `stop`, which `lmq compile --gbnf` prints beside the
grammar) removes the phrase, which gives exactly lmq's value. The language of final
values alone is `dfa_to_gbnf(automaton.stop_values(a, phrases))`.

GBNF matches code points, not bytes: transitions are grouped into whole UTF-8 characters
(one rule per state reached at a character boundary, one alternative per target state,
its code points as merged ranges). Byte paths that are not well-formed UTF-8 (stray
continuation bytes, overlongs, surrogates, bytes 0xF5–0xFF) have no code point and are
left out, so for automata over arbitrary bytes (a complement, `len(X) < n`) the grammar
describes the valid-UTF-8 part of the language — the part a text value can take. A state
whose only continuations are such byte paths is dropped like a dead one.
"""

from __future__ import annotations

import numpy as np

from lmq.constraints.byte_dfa import DEAD, ByteDfa
from lmq.errors import ConstraintError

#: (first lead byte, last lead byte, continuation bytes) of multi-byte UTF-8 characters
_LEADS = ((0xC2, 0xDF, 1), (0xE0, 0xEF, 2), (0xF0, 0xF4, 3))
#: lead bytes whose first continuation byte is restricted (no overlongs, surrogates, > U+10FFFF)
_FIRST_CONTINUATION = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF),
                       0xF4: (0x80, 0x8F)}
_SAFE = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 !#$%&'()*+,./:;<=>?@_`{|}~")

CodeRanges = list  # list[tuple[int, int, int]]: (first code point, last code point, target)


def dfa_to_gbnf(dfa: ByteDfa) -> str:
    """The GBNF grammar of `dfa`'s language (see the module docstring for stop phrases and
    non-UTF-8 bytes). An empty language has no grammar: `ConstraintError`."""
    walker = _CharacterWalker(dfa)
    edges: dict[int, CodeRanges] = {}
    order = [dfa.initial] if dfa.initial != DEAD else []
    seen = set(order)
    for state in order:
        edges[state] = [] if dfa.exits[state] else walker.characters(state)
        for _, _, target in edges[state]:
            if target not in seen:
                seen.add(target)
                order.append(target)
    final = {state for state in order if dfa.accepting[state] or dfa.exits[state]}
    live = _coreachable(edges, final)
    if dfa.initial not in live:
        raise ConstraintError("the constraint accepts no text value, so it has no GBNF grammar")
    rules = {state: _Rule([[(_Chars(_ranges_of(edges[state], target)), target)]
                           for target in _targets(edges[state]) if target in live],
                          state in final)
             for state in order if state in live}
    _inline_chains(rules, dfa.initial)
    names = {state: ("root" if state == dfa.initial else f"s{index}")
             for index, state in enumerate(rules)}
    return "\n".join(f"{names[state]} ::= {rule.render(names)}"
                     for state, rule in rules.items()) + "\n"


class _CharacterWalker:
    """Code-point transitions of a byte automaton: from a state at a character boundary,
    the (first, last, target) code-point ranges of whole UTF-8 characters."""

    def __init__(self, dfa: ByteDfa):
        self.rows = dfa.transitions
        self.memo: dict[tuple[int, int], tuple[tuple[int, int, int], ...]] = {}

    def characters(self, state: int) -> CodeRanges:
        row = self.rows[state]
        out = [(low, high, target) for low, high, target in _runs(row, 0, 0x7F)]
        for first_lead, last_lead, left in _LEADS:
            for lead in range(first_lead, last_lead + 1):
                after = int(row[lead])
                if after == DEAD:
                    continue
                unit = 64 ** (left - 1)
                low_byte, high_byte = _FIRST_CONTINUATION.get(lead, (0x80, 0xBF))
                low_value, high_value = (low_byte - 0x80) * unit, (high_byte - 0x7F) * unit - 1
                base = (lead & (0x3F >> left)) << (6 * left)
                for low, high, target in self.suffixes(after, left):
                    low, high = max(low, low_value), min(high, high_value)
                    if low <= high:
                        out.append((base + low, base + high, target))
        return _merge(sorted(out))

    def suffixes(self, state: int, left: int) -> tuple[tuple[int, int, int], ...]:
        """(first, last suffix value, target) for `left` continuation bytes from `state`."""
        if (state, left) not in self.memo:
            self.memo[state, left] = self._suffixes(state, left)
        return self.memo[state, left]

    def _suffixes(self, state: int, left: int) -> tuple[tuple[int, int, int], ...]:
        unit = 64 ** (left - 1)
        out: CodeRanges = []
        for low, high, target in _runs(self.rows[state], 0x80, 0xBF):
            low, high = low - 0x80, high - 0x80
            if left == 1:
                out.append((low, high, target))
                continue
            rest = self.suffixes(target, left - 1)
            if len(rest) == 1 and rest[0][:2] == (0, unit - 1):
                out.append((low * unit, (high + 1) * unit - 1, rest[0][2]))
                continue
            for digit in range(low, high + 1):
                out.extend((digit * unit + first, digit * unit + last, final)
                           for first, last, final in rest)
        return tuple(_merge(out))


def _runs(row: np.ndarray, first: int, last: int) -> CodeRanges:
    """Maximal runs of equal non-dead targets of `row[first..last]`: (low, high, target)."""
    part = row[first:last + 1]
    cuts = (np.flatnonzero(np.diff(part)) + 1).tolist()
    starts = [0] + cuts
    ends = cuts + [len(part)]
    return [(first + start, first + end - 1, int(part[start]))
            for start, end in zip(starts, ends) if part[start] != DEAD]


def _merge(ranges: CodeRanges) -> CodeRanges:
    out: CodeRanges = []
    for low, high, target in ranges:
        if out and out[-1][2] == target and out[-1][1] + 1 == low:
            out[-1] = (out[-1][0], high, target)
        else:
            out.append((low, high, target))
    return out


def _targets(ranges: CodeRanges) -> list[int]:
    return list(dict.fromkeys(target for _, _, target in ranges))


def _ranges_of(ranges: CodeRanges, target: int) -> tuple[tuple[int, int], ...]:
    return tuple((low, high) for low, high, to in ranges if to == target)


def _coreachable(edges: dict[int, CodeRanges], final: set[int]) -> set[int]:
    predecessors: dict[int, set[int]] = {state: set() for state in edges}
    for state, ranges in edges.items():
        for _, _, target in ranges:
            predecessors[target].add(state)
    live, stack = set(final), list(final)
    while stack:
        for source in predecessors[stack.pop()]:
            if source not in live:
                live.add(source)
                stack.append(source)
    return live


# ---------------------------------------------------------------- rules and rendering


class _Chars:
    """One character from a set of code-point ranges."""

    def __init__(self, ranges: tuple[tuple[int, int], ...]):
        self.ranges = ranges

    @property
    def single(self) -> int | None:
        return self.ranges[0][0] if len(self.ranges) == 1 and \
            self.ranges[0][0] == self.ranges[0][1] else None

    def render(self) -> str:
        parts = []
        for low, high in self.ranges:
            parts.append(_char(low) if low == high else
                         _char(low) + _char(high) if high == low + 1 else
                         f"{_char(low)}-{_char(high)}")
        return "[" + "".join(parts) + "]"


Item = tuple  # (_Chars, next state | None): one character then the rest of the sequence


class _Rule:
    """A state's rule: alternatives (each a list of items: characters, the last item's
    state is the continuation) and whether the empty string is an alternative."""

    def __init__(self, alternatives: list[list[Item]], empty: bool):
        self.alternatives = alternatives
        self.empty = empty

    def render(self, names: dict[int, str]) -> str:
        alternatives = [_render_sequence(sequence, names) for sequence in self.alternatives]
        if self.empty:
            alternatives.append('""')
        return " | ".join(alternatives)


def _render_sequence(sequence: list[Item], names: dict[int, str]) -> str:
    parts: list[str] = []
    literal = ""
    for chars, _ in sequence:
        if chars.single is not None:
            literal += _char(chars.single)
            continue
        if literal:
            parts.append(f'"{literal}"')
            literal = ""
        parts.append(chars.render())
    if literal:
        parts.append(f'"{literal}"')
    following = sequence[-1][1]
    if following is not None:
        parts.append(names[following])
    return " ".join(parts)


def _inline_chains(rules: dict[int, _Rule], root: int) -> None:
    """Drop references to rules that only match the empty string, then fold a rule with
    one alternative, no empty alternative and exactly one reference (from another rule)
    into that reference, so literals read as strings, not chains of rules."""
    ends = {state for state, rule in rules.items() if not rule.alternatives and state != root}
    for rule in rules.values():
        rule.alternatives = [sequence[:-1] + [(sequence[-1][0], None)]
                             if sequence[-1][1] in ends else sequence
                             for sequence in rule.alternatives]
    for state in ends:
        del rules[state]
    references: dict[int, list[tuple[int, int]]] = {state: [] for state in rules}
    for state, rule in rules.items():
        for index, sequence in enumerate(rule.alternatives):
            if sequence[-1][1] is not None:
                references[sequence[-1][1]].append((state, index))
    # Folding moves a reference from one rule into another, so how often a rule is
    # referenced never changes: the rules to fold are known at once, and each is folded
    # into whichever rule holds its reference by then (one pass, linear).
    holder = {state: refs[0] for state, refs in references.items() if len(refs) == 1}
    folded = [state for state, rule in rules.items()
              if state != root and len(rule.alternatives) == 1 and not rule.empty
              and state in holder and holder[state][0] != state]
    for state in folded:
        owner, index = holder[state]
        sequence = rules[owner].alternatives[index]
        sequence[-1] = (sequence[-1][0], None)
        tail = rules.pop(state).alternatives[0]
        sequence.extend(tail)
        following = tail[-1][1]
        if following in holder:
            holder[following] = (owner, index)


def _char(code: int) -> str:
    """A code point written so that it means itself both in a string and in a class."""
    if code in _SAFE:
        return chr(code)
    if code < 0x100:
        return f"\\x{code:02X}"
    if code < 0x10000:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"
