"""Python regexes → `ByteDfa` (full match, over the UTF-8 bytes of the characters).

The pattern is parsed by Python's own `re` parser, so escapes, classes and errors are
exactly Python's; the parse tree is compiled to a byte NFA (Thompson construction) and
determinized and minimized by `lmq.constraints.byte_dfa`. Character sets are code-point
ranges compiled to UTF-8 byte automata: negated classes and `.` only produce valid UTF-8
(never surrogates, overlongs or stray continuation bytes).

Supported: literals, escapes, classes, negated classes, `.`, `\\d \\w \\s \\D \\W \\S` (Unicode
semantics of str patterns, or ASCII under `(?a)`), groups (also named), `(?:…)`,
alternation, `* + ? {m} {m,} {m,n}` and their lazy forms (same language), and the flags
`(?s)`, `(?a)`, `(?x)`, `(?m)`. Anything else (anchors, lookaround, backreferences,
possessive quantifiers, atomic groups, `(?i)`) is a `ConstraintError` naming it.
"""

from __future__ import annotations

import functools

try:                                           # Python ≥ 3.11
    from re import _constants as sre
    from re import _parser as sre_parse
except ImportError:                            # pragma: no cover - Python 3.10
    import sre_constants as sre                # type: ignore[no-redef]
    import sre_parse                           # type: ignore[no-redef]
import re

from lmq.constraints import limits, unicode_classes
from lmq.constraints.byte_dfa import ByteDfa, Nfa
from lmq.constraints.unicode_classes import CodePointRanges
from lmq.errors import ConstraintError, ConstraintTooLarge

INT_PATTERN = r" ?-?(0|[1-9][0-9]*)"
FLOAT_PATTERN = r" ?-?(0|[1-9][0-9]*)(\.[0-9]+)?"

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
#: a regex's NFA may have this many times `limits.MAX_STATES` states (Thompson's
#: construction spends a few ε-states per DFA state)
NFA_STATES_PER_STATE = 4

_SUPPORTED_FLAGS = sre.SRE_FLAG_UNICODE | sre.SRE_FLAG_DOTALL | sre.SRE_FLAG_ASCII \
    | sre.SRE_FLAG_VERBOSE | sre.SRE_FLAG_MULTILINE
_FLAG_NAMES = {sre.SRE_FLAG_IGNORECASE: "the IGNORECASE flag (?i)",
               sre.SRE_FLAG_LOCALE: "the LOCALE flag (?L)"}
_ANCHORS = {sre.AT_BEGINNING: "the anchor ^", sre.AT_BEGINNING_STRING: "the anchor \\A",
            sre.AT_END: "the anchor $", sre.AT_END_STRING: "the anchor \\Z",
            sre.AT_BOUNDARY: "the word boundary \\b", sre.AT_NON_BOUNDARY: "\\B"}
_UNSUPPORTED = {sre.GROUPREF: "a backreference", sre.GROUPREF_EXISTS: "a conditional group",
                sre.ASSERT: "a lookaround assertion", sre.ASSERT_NOT: "a negative lookaround",
                getattr(sre, "POSSESSIVE_REPEAT", None): "a possessive quantifier",
                getattr(sre, "ATOMIC_GROUP", None): "an atomic group (?>…)"}
_ASCII_CLASSES = {sre.CATEGORY_DIGIT: ((0x30, 0x39),),
                  sre.CATEGORY_WORD: ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)),
                  sre.CATEGORY_SPACE: ((0x09, 0x0D), (0x20, 0x20))}
_UNICODE_CLASSES = {sre.CATEGORY_DIGIT: "DIGIT", sre.CATEGORY_WORD: "WORD",
                    sre.CATEGORY_SPACE: "SPACE"}
_NEGATED = {sre.CATEGORY_NOT_DIGIT: sre.CATEGORY_DIGIT,
            sre.CATEGORY_NOT_WORD: sre.CATEGORY_WORD,
            sre.CATEGORY_NOT_SPACE: sre.CATEGORY_SPACE}


@functools.lru_cache(maxsize=1024)
def regex_dfa(pattern: str) -> ByteDfa:
    """The minimal ByteDfa of the byte strings whose UTF-8 text fully matches `pattern`."""
    if not isinstance(pattern, str):
        raise ConstraintError(f"a regex must be a str, not {pattern!r}")
    try:
        tree = sre_parse.parse(pattern, 0)
    except (re.error, OverflowError, ValueError) as error:
        raise ConstraintError(f"invalid regex {pattern!r}: {error}") from None
    except RecursionError:
        raise ConstraintError(f"regex {pattern!r} is nested too deeply") from None
    compiler = _Compiler(pattern)
    flags = compiler.check_flags(tree.state.flags)
    try:
        start, end = compiler.sequence(list(tree), flags)
        return compiler.nfa.determinize(start, {end}, set())
    except RecursionError:
        raise ConstraintError(f"regex {pattern!r} is nested too deeply") from None
    except ConstraintTooLarge:
        raise compiler.too_large() from None


class _Compiler:
    """Thompson construction of one pattern's parse tree into a byte NFA."""

    def __init__(self, pattern: str):
        self.pattern = pattern
        self.nfa = Nfa()

    def refuse(self, construct: str) -> ConstraintError:
        return ConstraintError(f"regex {self.pattern!r} uses {construct}, which is not "
                               f"supported in constraints (supported: literals, classes, "
                               f"., \\d \\w \\s, groups, |, * + ? {{m,n}})")

    def check_flags(self, flags: int) -> int:
        for flag, name in _FLAG_NAMES.items():
            if flags & flag:
                raise self.refuse(name)
        return flags & _SUPPORTED_FLAGS

    def too_large(self) -> ConstraintTooLarge:
        return limits.too_many_states(f"the automaton of regex {self.pattern!r:.80}")

    def state(self) -> int:
        if len(self.nfa.edges) >= NFA_STATES_PER_STATE * limits.MAX_STATES:
            raise self.too_large()
        return self.nfa.state()

    def sequence(self, items: list, flags: int) -> tuple[int, int]:
        """Items one after the other; runs of literal characters become one byte chain."""
        start = end = None
        index = 0
        while index < len(items):
            if items[index][0] is sre.LITERAL:
                run = index
                while run < len(items) and items[run][0] is sre.LITERAL:
                    run += 1
                text = "".join(chr(argument) for _, argument in items[index:run])
                first, last = self.chain(text.encode("utf-8", "surrogatepass"))
                index = run
            else:
                first, last = self.item(*items[index], flags)
                index += 1
            if start is None:
                start = first
            else:
                self.nfa.epsilon(end, first)
            end = last
        if start is None:
            start = end = self.state()
        return start, end

    def item(self, op, argument, flags: int) -> tuple[int, int]:
        if op is sre.NOT_LITERAL:
            return self.code_points(_subtract(_ALL, ((argument, argument),)))
        if op is sre.ANY:
            everything = _ALL if flags & sre.SRE_FLAG_DOTALL else _subtract(_ALL, ((10, 10),))
            return self.code_points(everything)
        if op is sre.IN:
            return self.code_points(self.char_set(argument, flags))
        if op is sre.BRANCH:
            return self.branch(argument[1], flags)
        if op is sre.SUBPATTERN:
            _, add, remove, items = argument
            inner = self.check_flags((flags | add) & ~remove)
            return self.sequence(list(items), inner)
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
            low, high, items = argument
            return self.repeat(list(items), low, None if high is sre.MAXREPEAT else high,
                               flags)
        if op is sre.AT:
            raise self.refuse(_ANCHORS.get(argument, f"the assertion {argument}"))
        raise self.refuse(_UNSUPPORTED.get(op, f"the construct {op}"))

    def chain(self, data: bytes) -> tuple[int, int]:
        start = end = self.state()
        for byte in data:
            following = self.state()
            self.nfa.edge(end, byte, byte, following)
            end = following
        return start, end

    def branch(self, alternatives: list, flags: int) -> tuple[int, int]:
        start, end = self.state(), self.state()
        for alternative in alternatives:
            first, last = self.sequence(list(alternative), flags)
            self.nfa.epsilon(start, first)
            self.nfa.epsilon(last, end)
        return start, end

    def repeat(self, items: list, low: int, high: int | None, flags: int) -> tuple[int, int]:
        """`low` copies of the body, then either a loop or `high - low` optional copies.

        ε-moves only ever leave a fragment's end or enter its start, never join two states
        inside one: a body ending in a loop (`(ab+)*`) has an end state with moves of its
        own, and an ε-move into it would let those moves run without the body's start."""
        if (high if high is not None else low) > NFA_STATES_PER_STATE * limits.MAX_STATES:
            raise self.too_large()
        start = end = self.state()
        for _ in range(low):
            first, last = self.sequence(items, flags)
            self.nfa.epsilon(end, first)
            end = last
        if high is None:
            hub = self.state()            # "any number of bodies read": loops through the body
            first, last = self.sequence(items, flags)
            self.nfa.epsilon(end, hub)
            self.nfa.epsilon(hub, first)
            self.nfa.epsilon(last, hub)
            return start, hub
        done = self.state()
        for _ in range(high - low):
            first, last = self.sequence(items, flags)
            self.nfa.epsilon(end, first)
            self.nfa.epsilon(end, done)
            end = last
        self.nfa.epsilon(end, done)
        return start, done

    def char_set(self, items: list, flags: int) -> CodePointRanges:
        negate = False
        ranges: list[tuple[int, int]] = []
        for op, argument in items:
            if op is sre.NEGATE:
                negate = True
            elif op is sre.LITERAL:
                ranges.append((argument, argument))
            elif op is sre.RANGE:
                ranges.append(argument)
            elif op is sre.CATEGORY:
                ranges.extend(_category(argument, flags))
            else:
                raise self.refuse(f"the class item {op}")
        ranges = merge_ranges(ranges)
        return _subtract(_ALL, ranges) if negate else ranges

    def code_points(self, ranges: CodePointRanges) -> tuple[int, int]:
        """A fragment reading one character whose code point is in `ranges`."""
        states = character_utf8(ranges)
        ids = [self.state() for _ in states]
        end = self.state()
        for source, edges in zip(ids, states):
            for low, high, target in edges:
                self.nfa.edge(source, low, high, end if target < 0 else ids[target])
        return ids[0], end


def _category(category, flags: int) -> CodePointRanges:
    negated = category in _NEGATED
    base = _NEGATED.get(category, category)
    if flags & sre.SRE_FLAG_ASCII:
        ranges = _ASCII_CLASSES.get(base)
    else:
        ranges = unicode_classes.class_ranges(_UNICODE_CLASSES[base]) if base in _UNICODE_CLASSES else None
    if ranges is None:
        raise ConstraintError(f"unknown character category {category}")
    return _subtract(_ALL, ranges) if negated else ranges


# ---------------------------------------------------------------- code-point range sets

_ALL: CodePointRanges = ((0, MAX_CODE_POINT),)


def merge_ranges(ranges) -> CodePointRanges:
    """Sorted, disjoint, non-adjacent code-point ranges covering `ranges`."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return tuple((low, high) for low, high in merged)


def _subtract(ranges: CodePointRanges, removed: CodePointRanges) -> CodePointRanges:
    out = []
    for low, high in ranges:
        for cut_low, cut_high in removed:
            if cut_high < low or cut_low > high:
                continue
            if cut_low > low:
                out.append((low, cut_low - 1))
            low = cut_high + 1
            if low > high:
                break
        if low <= high:
            out.append((low, high))
    return tuple(out)


# ---------------------------------------------------------------- UTF-8 automata


def character_utf8(ranges: CodePointRanges) -> Utf8Automaton:
    """The UTF-8 automaton of one character in `ranges` (never a surrogate): see
    `_utf8_automaton`."""
    return _utf8_automaton(_subtract(ranges, (SURROGATES,)))

#: (first code point, last code point, lead-byte prefix) per UTF-8 sequence length
_LENGTHS = ((0x0, 0x7F, 0x00), (0x80, 0x7FF, 0xC0), (0x800, 0xFFFF, 0xE0),
            (0x10000, MAX_CODE_POINT, 0xF0))

Utf8Automaton = tuple[tuple[tuple[int, int, int], ...], ...]


@functools.lru_cache(maxsize=512)
def _utf8_automaton(ranges: CodePointRanges) -> Utf8Automaton:
    """A minimal automaton of the UTF-8 encodings of the code points in `ranges`: state 0
    is the start; edges are (low byte, high byte, target), target -1 ends the character.

    A state inside a character is identified by the number of continuation bytes left and
    the set of suffix values still allowed, so equal suffix sets share one state (this is
    what keeps `\\w` small)."""
    states: list[tuple[tuple[int, int, int], ...]] = [()]
    memo: dict[tuple[int, CodePointRanges], int] = {}

    def edges(values: CodePointRanges, left: int, prefix: int) -> tuple:
        """Edges reading the leading 6-bit digit of `values`, which have `left` more
        continuation bytes after this byte; byte = prefix + digit."""
        if left == 0:
            return tuple((prefix + low, prefix + high, -1) for low, high in values)
        out: list[tuple[int, int, int]] = []
        for low, high, rest in _split_digits(values, 64 ** left):
            target = continuation(left, rest)
            if out and out[-1][2] == target and out[-1][1] + 1 == prefix + low:
                out[-1] = (out[-1][0], prefix + high, target)
            else:
                out.append((prefix + low, prefix + high, target))
        return tuple(out)

    def continuation(left: int, values: CodePointRanges) -> int:
        key = (left, values)
        if key not in memo:
            memo[key] = len(states)
            states.append(())
            states[memo[key]] = edges(values, left - 1, 0x80)
        return memo[key]

    start: list[tuple[int, int, int]] = []
    for left, (first, last, lead) in enumerate(_LENGTHS):
        clipped = tuple((max(low, first), min(high, last)) for low, high in ranges
                        if low <= last and high >= first)
        start.extend(edges(clipped, left, lead))
    states[0] = tuple(start)
    return tuple(states)


def _split_digits(values: CodePointRanges, unit: int) -> list[tuple[int, int, CodePointRanges]]:
    """Group `values` by their leading digit `value // unit`: (first digit, last digit,
    remainders), consecutive digits with equal remainders merged."""
    pieces: list[tuple[int, int, CodePointRanges]] = []     # digit runs, one per range part
    for low, high in values:
        first, last = low // unit, high // unit
        if first == last:
            pieces.append((first, first, ((low % unit, high % unit),)))
            continue
        pieces.append((first, first, ((low % unit, unit - 1),)))
        if last > first + 1:
            pieces.append((first + 1, last - 1, ((0, unit - 1),)))
        pieces.append((last, last, ((0, high % unit),)))
    digits: list[tuple[int, int, CodePointRanges]] = []      # one entry per digit run
    for low, high, rest in pieces:
        if digits and digits[-1][1] == low:                  # two ranges share this digit
            digits[-1] = (low, high, merge_ranges(digits[-1][2] + rest))
        else:
            digits.append((low, high, rest))
    groups: list[tuple[int, int, CodePointRanges]] = []
    for low, high, rest in digits:
        if groups and groups[-1][2] == rest and groups[-1][1] + 1 == low:
            groups[-1] = (groups[-1][0], high, rest)
        else:
            groups.append((low, high, rest))
    return groups
