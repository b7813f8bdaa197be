"""GBNF, llama.cpp's grammar dialect: a parser that checks a grammar the way llama.cpp
does and names what is wrong, into a tree of rules (`Grammar`). The translation for
llguidance is `lmq.constraints.llguidance_lark`."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterator, Union

from lmq.constraints import limits
from lmq.constraints.regex import merge_ranges
from lmq.errors import ConstraintError, ConstraintTooLarge, UnsatisfiableConstraint

#: llama.cpp refuses repetition counts above this (`MAX_REPETITION_THRESHOLD`)
MAX_REPETITIONS = 2000
MAX_CODE_POINT = 0x10FFFF
_NAME = re.compile(r"[A-Za-z0-9-]+")
_INTEGER = re.compile(r"[0-9]+")
_SPACE = re.compile(r"(?:[ \t]|#[^\r\n]*)*")
_SPACE_AND_NEWLINES = re.compile(r"(?:[ \t\r\n]|#[^\r\n]*)*")
_PLAIN_CHARS = re.compile(r'[^"\\]+')


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class CharClass:
    ranges: tuple[tuple[int, int], ...]      # inclusive code point ranges
    negated: bool


@dataclass(frozen=True)
class AnyChar:
    pass


@dataclass(frozen=True)
class RuleRef:
    name: str


@dataclass(frozen=True)
class Repeat:
    item: "Node"
    low: int
    high: int | None                        # None: unbounded


@dataclass(frozen=True)
class Sequence:
    items: tuple["Node", ...]


@dataclass(frozen=True)
class Choice:
    alternatives: tuple["Node", ...]


Node = Union[Literal, CharClass, AnyChar, RuleRef, Repeat, Sequence, Choice]


@dataclass(frozen=True, eq=False)
class Grammar:
    """A checked GBNF grammar: its text and its rules in order of definition."""

    text: str
    rules: dict[str, Node]


def parse_gbnf(text: str, *, owner: str = "GRAMMAR") -> Grammar:
    """Parse and check `text` as llama.cpp would; `owner` names the constraint in errors.

    Raises ConstraintError for what llama.cpp rejects (syntax, undefined rules, no
    `root`, left recursion, repetition counts over 2000) and for what it silently
    misreads or mishandles (a rule defined twice, an empty character class, a
    repetition whose maximum is below its minimum, an unbounded repetition of
    something that may be empty), ConstraintTooLarge past `limits.MAX_GRAMMAR_RULES`
    rules or `limits.MAX_GRAMMAR_DEPTH` nested groups, and UnsatisfiableConstraint when
    `root` derives no string at all.
    """
    if not isinstance(text, str):
        raise ConstraintError(f"{owner}: the grammar must be a string of GBNF, not {type(text).__name__}")
    return _parse(text, owner)


@functools.lru_cache(maxsize=256)
def _parse(text: str, owner: str) -> Grammar:
    rules = _Parser(text, owner).parse()
    if "root" not in rules:
        raise ConstraintError(f"{owner}: the grammar has no 'root' rule")
    refs = references(rules)
    _check_left_recursion(rules, owner, refs)
    if not _productive(rules, refs)["root"]:
        raise UnsatisfiableConstraint(f"{owner}: the grammar derives no string from 'root' "
                                      "(every derivation recurses forever)")
    return Grammar(text, rules)


class _Parser:
    """Recursive descent over llama.cpp's GBNF (llama-grammar.cpp), position-tracked."""

    def __init__(self, text: str, owner: str):
        self.text = text
        self.owner = owner
        self.pos = 0
        self.rules: dict[str, Node] = {}
        self.defined_at: dict[str, int] = {}
        self.referenced_at: dict[str, int] = {}
        self.depth = 0

    def parse(self) -> dict[str, Node]:
        self.space(newlines=True)
        while self.pos < len(self.text):
            self.rule()
        for name, at in self.referenced_at.items():
            if name not in self.rules:
                self.pos = at
                self.fail(f"rule '{name}' is used but never defined")
        return self.rules

    def fail(self, message: str, error: type[ConstraintError] = ConstraintError) -> None:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        source_line = self.text.split("\n")[line - 1].rstrip("\r")
        kind = "invalid GBNF" if error is ConstraintError else "GBNF"
        raise error(f"{self.owner}: {kind} at line {line}, column {column}: "
                    f"{message}\n    {source_line}\n    {' ' * (column - 1)}^")

    def peek(self, offset: int = 0) -> str:
        at = self.pos + offset
        return self.text[at] if at < len(self.text) else ""

    def space(self, newlines: bool) -> None:
        """Skip blanks and comments (and newlines when `newlines`)."""
        self.pos = (_SPACE_AND_NEWLINES if newlines else _SPACE).match(self.text, self.pos).end()

    def name(self) -> str:
        found = _NAME.match(self.text, self.pos)
        if found is None:
            self.fail("expected a rule name (letters, digits and '-')")
        self.pos = found.end()
        return found.group()

    def integer(self) -> int:
        found = _INTEGER.match(self.text, self.pos)
        if found is None:
            self.fail("expected an integer")
        self.pos = found.end()
        return int(found.group())

    def rule(self) -> None:
        start = self.pos
        name = self.name()
        self.space(newlines=False)
        if not self.text.startswith("::=", self.pos):
            self.fail(f"expected '::=' after the rule name '{name}'")
        if name in self.defined_at:
            self.pos = start
            first = self.text.count("\n", 0, self.defined_at[name]) + 1
            self.fail(f"rule '{name}' is defined twice (first on line {first})")
        if len(self.defined_at) >= limits.MAX_GRAMMAR_RULES:
            self.fail(f"constraint too large: more than {limits.MAX_GRAMMAR_RULES:,} rules; the "
                      f"limit is {limits.MAX_GRAMMAR_RULES:,} (set $LMQ_MAX_GRAMMAR_RULES or "
                      "lmq.constraints.limits.MAX_GRAMMAR_RULES to raise it)", ConstraintTooLarge)
        self.defined_at[name] = start
        self.pos += 3
        self.space(newlines=True)
        body = self.alternatives(nested=False)
        if self.peek() == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif self.peek() == "\n":
            self.pos += 1
        elif self.peek():
            self.fail(f"unexpected {self.peek()!r}: expected a newline or the end of the grammar")
        self.space(newlines=True)
        self.rules[name] = body

    def alternatives(self, nested: bool) -> Node:
        options = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(newlines=True)
            options.append(self.sequence(nested))
        return options[0] if len(options) == 1 else Choice(tuple(options))

    def sequence(self, nested: bool) -> Node:
        items: list[Node] = []
        while self.pos < len(self.text):
            c = self.peek()
            if c == '"':
                items.append(self.literal())
            elif c == "[":
                items.append(self.char_class())
            elif c in ("<", "!"):
                self.fail("token references (<...>) are not supported: lmq constrains text, "
                          "write the token's text as a literal")
            elif _is_word_char(c):
                at = self.pos
                name = self.name()
                self.referenced_at.setdefault(name, at)
                items.append(RuleRef(name))
            elif c == "(":
                if self.depth >= limits.MAX_GRAMMAR_DEPTH:
                    self.fail(f"constraint too large: groups nested more than "
                              f"{limits.MAX_GRAMMAR_DEPTH} deep; the limit is "
                              f"{limits.MAX_GRAMMAR_DEPTH} (set $LMQ_MAX_GRAMMAR_DEPTH or "
                              "lmq.constraints.limits.MAX_GRAMMAR_DEPTH to raise it)",
                              ConstraintTooLarge)
                self.depth += 1
                self.pos += 1
                self.space(newlines=True)
                group = self.alternatives(nested=True)
                if self.peek() != ")":
                    self.fail("expected ')' to close the group")
                self.pos += 1
                self.depth -= 1
                items.append(group)
            elif c == ".":
                self.pos += 1
                items.append(AnyChar())
            elif c in "*+?{":
                if not items:
                    self.fail(f"'{c}' must follow an item to repeat")
                items[-1] = self.repetition(items[-1])
            else:
                break
            self.space(newlines=nested)
        return items[0] if len(items) == 1 else Sequence(tuple(items))

    def repetition(self, item: Node) -> Node:
        c = self.peek()
        self.pos += 1
        if c != "{":
            return Repeat(item, *{"*": (0, None), "+": (1, None), "?": (0, 1)}[c])
        self.space(newlines=False)
        low = self.integer()
        self.space(newlines=False)
        if self.peek() == "}":
            high: int | None = low
        elif self.peek() == ",":
            self.pos += 1
            self.space(newlines=False)
            high = self.integer() if self.peek().isdigit() else None
            self.space(newlines=False)
            if self.peek() != "}":
                self.fail("expected '}' to close the repetition")
        else:
            self.fail("expected ',' or '}' in the repetition")
        self.pos += 1
        if max(low, high or 0) > MAX_REPETITIONS:
            self.fail(f"repetition count over {MAX_REPETITIONS} (llama.cpp's limit)")
        if high is not None and high < low:
            self.fail(f"repetition {{{low},{high}}}: the maximum is below the minimum")
        return Repeat(item, low, high)

    def char(self) -> int:
        c = self.peek()
        if c == "":
            self.fail("unexpected end of the grammar")
        if c != "\\":
            self.pos += 1
            return ord(c)
        escape = self.peek(1)
        simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93, "-": 45}
        if escape in simple:
            self.pos += 2
            return simple[escape]
        digits = {"x": 2, "u": 4, "U": 8}.get(escape)
        if digits is None:
            self.fail(f"unknown escape '\\{escape}'")
        hex_text = self.text[self.pos + 2:self.pos + 2 + digits]
        if len(hex_text) != digits or any(h not in "0123456789abcdefABCDEF" for h in hex_text):
            self.fail(f"'\\{escape}' needs {digits} hex digits")
        value = int(hex_text, 16)
        if value > MAX_CODE_POINT or 0xD800 <= value <= 0xDFFF:
            self.fail(f"'\\{escape}{hex_text}' is not a Unicode character")
        self.pos += 2 + digits
        return value

    def literal(self) -> Node:
        start = self.pos
        self.pos += 1
        chars = []
        while self.peek() != '"':
            if self.peek() == "":
                self.pos = start
                self.fail("unterminated string literal (opened here)")
            plain = _PLAIN_CHARS.match(self.text, self.pos)
            if plain is not None:
                chars.append(plain.group())
                self.pos = plain.end()
            else:
                chars.append(chr(self.char()))
        self.pos += 1
        return Literal("".join(chars))

    def char_class(self) -> Node:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.peek() != "]":
            if self.peek() == "":
                self.pos = start
                self.fail("unterminated character class (opened here)")
            low = self.char()
            high = low
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                high = self.char()
            ranges.append((low, high))
        self.pos += 1
        if not ranges:
            self.pos = start
            self.fail("empty character class (llama.cpp would read it as the empty string)")
        return CharClass(tuple(ranges), negated)


@functools.lru_cache(maxsize=4096)
def code_point_ranges(node: CharClass | AnyChar) -> tuple[tuple[int, int], ...]:
    """The code points a character class or `.` matches, as sorted disjoint ranges."""
    if isinstance(node, AnyChar):
        return ((0, MAX_CODE_POINT),)
    merged = merge_ranges((min(a, b), max(a, b)) for a, b in node.ranges)
    if not node.negated:
        return merged
    complement, next_low = [], 0
    for low, high in merged:
        if low > next_low:
            complement.append((next_low, low - 1))
        next_low = high + 1
    if next_low <= MAX_CODE_POINT:
        complement.append((next_low, MAX_CODE_POINT))
    return tuple(complement)


class GrammarNfa:
    """Thompson's construction of a grammar's rules (references inlined) into an NFA.

    A fragment is built between a given start and end state and never adds a move into
    its start or out of its end, so a sequence's items share their boundary states and
    a choice's alternatives share both. Subclasses make states (`state`, which may refuse
    past a size limit by raising) and read characters (`character`: one of the code
    points in sorted ranges; `literal`: a literal's text, by default one character each);
    ε-moves are `epsilon[state]`."""

    def __init__(self, rules: dict[str, Node]):
        self.rules = rules
        self.epsilon: list[list[int]] = []

    def state(self) -> int:
        raise NotImplementedError

    def character(self, ranges: tuple[tuple[int, int], ...], start: int, end: int) -> None:
        raise NotImplementedError

    def literal(self, text: str, start: int, end: int) -> None:
        here = start
        for position, c in enumerate(text):
            target = end if position == len(text) - 1 else self.state()
            self.character(((ord(c), ord(c)),), here, target)
            here = target

    def rule(self, name: str, start: int, end: int) -> None:
        self.fragment(self.rules[name], start, end)

    def fragment(self, node: Node, start: int, end: int) -> None:
        if isinstance(node, Literal):
            if node.text:
                self.literal(node.text, start, end)
            else:
                self.epsilon[start].append(end)
        elif isinstance(node, (CharClass, AnyChar)):
            self.character(code_point_ranges(node), start, end)
        elif isinstance(node, RuleRef):
            self.rule(node.name, start, end)
        elif isinstance(node, Sequence):
            here = start
            for position, item in enumerate(node.items):
                target = end if position == len(node.items) - 1 else self.state()
                self.fragment(item, here, target)
                here = target
            if not node.items:
                self.epsilon[start].append(end)
        elif isinstance(node, Choice):
            for item in node.alternatives:
                self.fragment(item, start, end)
        else:
            self.repeat(node, start, end)

    def repeat(self, node: Repeat, start: int, end: int) -> None:
        """`low` copies, then a loop through a hub, or `high - low` nested optional copies."""
        here = start
        for _ in range(node.low):
            target = self.state()
            self.fragment(node.item, here, target)
            here = target
        if node.high is None:
            hub, body_end = self.state(), self.state()
            self.epsilon[here].append(hub)
            self.fragment(node.item, hub, body_end)
            self.epsilon[body_end].append(hub)
            self.epsilon[hub].append(end)
            return
        for _ in range(node.high - node.low):
            self.epsilon[here].append(end)
            target = self.state()
            self.fragment(node.item, here, target)
            here = target
        self.epsilon[here].append(end)


def _is_word_char(c: str) -> bool:
    return c != "" and c.isascii() and (c.isalnum() or c == "-")


def nodes_of(node: Node) -> Iterator[Node]:
    """`node` and every node inside it, depth first."""
    stack = [node]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, Repeat):
            stack.append(node.item)
        elif isinstance(node, Sequence):
            stack.extend(reversed(node.items))
        elif isinstance(node, Choice):
            stack.extend(reversed(node.alternatives))


def references(rules: dict[str, Node]) -> dict[str, set[str]]:
    """The rules each rule refers to."""
    return {name: {n.name for n in nodes_of(node) if isinstance(n, RuleRef)}
            for name, node in rules.items()}


def nullable_rules(rules: dict[str, Node], refs: dict[str, set[str]] | None = None) -> dict[str, bool]:
    """Which rules derive the empty string (`refs`: `references(rules)` if at hand)."""
    return fixpoint(rules, derives_empty, refs)


def _productive(rules: dict[str, Node], refs: dict[str, set[str]]) -> dict[str, bool]:
    """Which rules derive some string at all."""
    return fixpoint(rules, lambda node, known: _derives(node, known, lambda terminal: True), refs)


def derives_empty(node: Node, nullable: dict[str, bool]) -> bool:
    """Whether `node` derives the empty string (`nullable`: `nullable_rules`' answer)."""
    return _derives(node, nullable, lambda terminal: isinstance(terminal, Literal) and terminal.text == "")


def _derives(node: Node, known: dict[str, bool], terminal) -> bool:
    """Whether `node` derives a string of a kind: `known` says it of each rule so far,
    `terminal` of a literal or character class."""
    if isinstance(node, RuleRef):
        return known[node.name]
    if isinstance(node, Repeat):
        return node.low == 0 or _derives(node.item, known, terminal)
    if isinstance(node, Sequence):
        return all(_derives(item, known, terminal) for item in node.items)
    if isinstance(node, Choice):
        return any(_derives(item, known, terminal) for item in node.alternatives)
    return terminal(node)


def fixpoint(rules: dict[str, Node], holds, refs: dict[str, set[str]] | None = None) -> dict[str, bool]:
    """Least fixpoint of a monotone property of rules (nullable, productive): `holds(node,
    known)` decides a rule from what is known of the rules it refers to. A rule is decided
    again only when one it refers to became true (linear in the grammar, also for long
    chains of rules)."""
    value = {name: False for name in rules}
    users: dict[str, list[str]] = {name: [] for name in rules}
    for name, used in (refs if refs is not None else references(rules)).items():
        for other in used:
            users[other].append(name)
    pending = list(reversed(rules))
    queued = set(pending)
    while pending:
        name = pending.pop()
        queued.discard(name)
        if not value[name] and holds(rules[name], value):
            value[name] = True
            for user in users[name]:
                if not value[user] and user not in queued:
                    queued.add(user)
                    pending.append(user)
    return value


def _check_left_recursion(rules: dict[str, Node], owner: str, refs: dict[str, set[str]]) -> None:
    """llama.cpp refuses a rule that can reach itself before consuming a character;
    lmq also refuses an unbounded repetition of something that may be empty, which
    llama.cpp's check misses."""
    nullable = nullable_rules(rules, refs)

    def leftmost(node: Node) -> set[str]:
        if isinstance(node, RuleRef):
            return {node.name}
        if isinstance(node, Repeat):
            if node.high is None and derives_empty(node.item, nullable):
                raise ConstraintError(f"{owner}: unbounded repetition of an item that may be empty "
                                      "(the empty string would have infinitely many derivations)")
            return leftmost(node.item) if node.high != 0 else set()
        if isinstance(node, Sequence):
            found: set[str] = set()
            for item in node.items:
                found |= leftmost(item)
                if not derives_empty(item, nullable):
                    break
            return found
        if isinstance(node, Choice):
            return set().union(*(leftmost(item) for item in node.alternatives))
        return set()

    edges = {name: leftmost(node) for name, node in rules.items()}
    cyclic = _on_cycles(edges)
    for name in rules:
        if name in cyclic:
            raise ConstraintError(f"{owner}: rule '{name}' is left-recursive (it can reach "
                                  "itself before reading a character; llama.cpp rejects that)")


def _on_cycles(edges: dict[str, set[str]]) -> set[str]:
    """The nodes of a directed graph that lie on a cycle (Tarjan's strongly connected
    components, iteratively: chains of thousands of rules need no deep recursion)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cyclic: set[str] = set()
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    cyclic.update(component)
    return cyclic
