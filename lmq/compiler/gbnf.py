"""GBNF, llama.cpp's grammar dialect: a parser that checks a grammar the way llama.cpp
does (and names what is wrong), and its translation to llguidance's Lark dialect.

The translation keeps llama.cpp's semantics exactly. GBNF is matched character by
character with full backtracking over every derivation; llguidance lexes greedily (a
terminal takes the longest match), so `x ::= [a]*` followed by `"a"` would lose strings
if `x` became a terminal. Every lexeme of the translation is therefore exactly one
character (one code point), and all structure, repetition included, stays in the
Earley rules, where llguidance explores every derivation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Union

from lmq.errors import ConstraintError, UnsatisfiableConstraint

#: llama.cpp refuses repetition counts above this (`MAX_REPETITION_THRESHOLD`)
MAX_REPETITIONS = 2000
MAX_CODE_POINT = 0x10FFFF


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


@dataclass(frozen=True)
class Grammar:
    """A checked GBNF grammar: its text and its rules in order of definition."""

    text: str
    rules: dict[str, Node]

    @functools.cached_property
    def lark(self) -> str:
        """The grammar in llguidance's Lark dialect: the rules `choose_lexemes` picks
        become terminals (lexed greedily, which is exact for them), every other
        character is a lexeme of its own. Rules used inside a lexeme are written once
        more as helper terminals (`H…`), which no rule references."""
        from lmq.compiler.lexemes import choose_lexemes

        lexemes = choose_lexemes(self.rules)
        rules, helpers = _reachable(self.rules, lexemes)
        index = {name: f"{i}_{name.replace('-', '_')}" for i, name in enumerate(self.rules)}

        def helper(name: str) -> str:
            return f"H{index[name].upper()}"

        def reference(name: str) -> str:
            return f"T{index[name].upper()}" if name in lexemes else f"r{index[name].lower()}"

        lines = [f"start: {reference('root')}"]
        for name in rules:
            inner = helper if name in lexemes else reference
            lines.append(f"{reference(name)}: {_lark(self.rules[name], inner, top=True)}")
        for name in helpers:
            lines.append(f"{helper(name)}: {_lark(self.rules[name], helper, top=True)}")
        return "\n".join(lines) + "\n"


def parse_gbnf(text: str, *, owner: str = "GRAMMAR") -> Grammar:
    """Parse and check `text` as llama.cpp would; `owner` names the constraint in errors.

    Raises ConstraintError for what llama.cpp rejects (syntax, undefined rules, no
    `root`, left recursion, repetition counts over 2000) and for what it silently
    misreads (a rule defined twice, an empty character class), and
    UnsatisfiableConstraint when `root` derives no string at all.
    """
    if not isinstance(text, str):
        raise ConstraintError(f"{owner}: the grammar must be a string of GBNF, not {type(text).__name__}")
    return _parse(text, owner)


@functools.lru_cache(maxsize=256)
def _parse(text: str, owner: str) -> Grammar:
    rules = _Parser(text, owner).parse()
    if "root" not in rules:
        raise ConstraintError(f"{owner}: the grammar has no 'root' rule")
    _check_left_recursion(rules, owner)
    if not _productive(rules)["root"]:
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

    def parse(self) -> dict[str, Node]:
        self.space(newlines=True)
        while self.pos < len(self.text):
            self.rule()
        for name, at in self.referenced_at.items():
            if name not in self.rules:
                self.pos = at
                self.fail(f"rule '{name}' is used but never defined")
        return self.rules

    def fail(self, message: str) -> None:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        source_line = self.text.split("\n")[line - 1].rstrip("\r")
        raise ConstraintError(f"{self.owner}: invalid GBNF at line {line}, column {column}: "
                              f"{message}\n    {source_line}\n    {' ' * (column - 1)}^")

    def peek(self, offset: int = 0) -> str:
        at = self.pos + offset
        return self.text[at] if at < len(self.text) else ""

    def space(self, newlines: bool) -> None:
        while True:
            c = self.peek()
            if c in (" ", "\t") or (newlines and c in ("\r", "\n")):
                self.pos += 1
            elif c == "#":
                while self.peek() not in ("", "\r", "\n"):
                    self.pos += 1
            else:
                return

    def name(self) -> str:
        start = self.pos
        while _is_word_char(self.peek()):
            self.pos += 1
        if self.pos == start:
            self.fail("expected a rule name (letters, digits and '-')")
        return self.text[start:self.pos]

    def integer(self) -> int:
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.pos += 1
        if self.pos == start:
            self.fail("expected an integer")
        return int(self.text[start:self.pos])

    def rule(self) -> None:
        start = self.pos
        name = self.name()
        self.space(newlines=False)
        if not self.text.startswith("::=", self.pos):
            self.fail(f"expected '::=' after the rule name '{name}'")
        if name in self.rules or name in self.defined_at:
            self.pos = start
            first = self.text.count("\n", 0, self.defined_at[name]) + 1
            self.fail(f"rule '{name}' is defined twice (first on line {first})")
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
                self.pos += 1
                self.space(newlines=True)
                group = self.alternatives(nested=True)
                if self.peek() != ")":
                    self.fail("expected ')' to close the group")
                self.pos += 1
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


def _is_word_char(c: str) -> bool:
    return c != "" and c.isascii() and (c.isalnum() or c == "-")


def _nullable(node: Node, nullable: dict[str, bool]) -> bool:
    if isinstance(node, Literal):
        return node.text == ""
    if isinstance(node, RuleRef):
        return nullable[node.name]
    if isinstance(node, Repeat):
        return node.low == 0 or _nullable(node.item, nullable)
    if isinstance(node, Sequence):
        return all(_nullable(item, nullable) for item in node.items)
    if isinstance(node, Choice):
        return any(_nullable(item, nullable) for item in node.alternatives)
    return False


def _fixpoint(rules: dict[str, Node], holds) -> dict[str, bool]:
    """Least fixpoint of a monotone property of rules (nullable, productive)."""
    value = {name: False for name in rules}
    changed = True
    while changed:
        changed = False
        for name, node in rules.items():
            if not value[name] and holds(node, value):
                value[name] = changed = True
    return value


def _productive(rules: dict[str, Node]) -> dict[str, bool]:
    def productive(node: Node, known: dict[str, bool]) -> bool:
        if isinstance(node, RuleRef):
            return known[node.name]
        if isinstance(node, Repeat):
            return node.low == 0 or productive(node.item, known)
        if isinstance(node, Sequence):
            return all(productive(item, known) for item in node.items)
        if isinstance(node, Choice):
            return any(productive(item, known) for item in node.alternatives)
        return True
    return _fixpoint(rules, productive)


def _check_left_recursion(rules: dict[str, Node], owner: str) -> None:
    """llama.cpp refuses a rule that can reach itself before consuming a character;
    lmq also refuses an unbounded repetition of something that may be empty, which
    llama.cpp's check misses."""
    nullable = _fixpoint(rules, _nullable)

    def leftmost(node: Node) -> set[str]:
        if isinstance(node, RuleRef):
            return {node.name}
        if isinstance(node, Repeat):
            if node.high is None and _nullable(node.item, nullable):
                raise ConstraintError(f"{owner}: unbounded repetition of an item that may be empty "
                                      "(the empty string would have infinitely many derivations)")
            return leftmost(node.item) if node.high != 0 else set()
        if isinstance(node, Sequence):
            found: set[str] = set()
            for item in node.items:
                found |= leftmost(item)
                if not _nullable(item, nullable):
                    break
            return found
        if isinstance(node, Choice):
            return set().union(*(leftmost(item) for item in node.alternatives))
        return set()

    edges = {name: leftmost(node) for name, node in rules.items()}
    for start in rules:
        seen, stack = set(), list(edges[start])
        while stack:
            name = stack.pop()
            if name == start:
                raise ConstraintError(f"{owner}: rule '{start}' is left-recursive (it can reach "
                                      "itself before reading a character; llama.cpp rejects that)")
            if name not in seen:
                seen.add(name)
                stack.extend(edges[name])


def _reachable(rules: dict[str, Node], lexemes: set[str]) -> tuple[list[str], list[str]]:
    """The rules reachable from root without entering a lexeme (lexemes included), and
    the rules used inside lexemes, each in order of definition."""
    from lmq.compiler.lexemes import _walk

    def references(name: str) -> list[str]:
        return [n.name for n in _walk(rules[name]) if isinstance(n, RuleRef)]

    outer, inner = set(), set()
    stack = ["root"]
    while stack:
        name = stack.pop()
        if name not in outer:
            outer.add(name)
            if name in lexemes:
                pending = references(name)
                while pending:
                    sub = pending.pop()
                    if sub not in inner:
                        inner.add(sub)
                        pending.extend(references(sub))
            else:
                stack.extend(references(name))
    return [n for n in rules if n in outer], [n for n in rules if n in inner]


def _lark(node: Node, reference, top: bool = False) -> str:
    """Lark text of `node`; `reference(name)` renders a rule reference."""
    if isinstance(node, Literal):
        if not node.text:
            return '""'
        text = " ".join(_lark_char(ord(c)) for c in node.text)
        return text if len(node.text) == 1 or top else f"({text})"
    if isinstance(node, CharClass):
        body = "".join(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}" for a, b in node.ranges)
        return f"/[{'^' if node.negated else ''}{body}]/"
    if isinstance(node, AnyChar):
        return "/(?s:.)/"
    if isinstance(node, RuleRef):
        return reference(node.name)
    if isinstance(node, Repeat):
        if node.high == 0:
            return '""'
        inner = _lark(node.item, reference)
        suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((node.low, node.high))
        if suffix is None:
            suffix = f"{{{node.low},{'' if node.high is None else node.high}}}"
        return inner + suffix
    if isinstance(node, Sequence):
        if not node.items:
            return '""'
        text = " ".join(_lark(item, reference) for item in node.items)
        return text if top else f"({text})"
    text = " | ".join(_lark(item, reference, top=True) for item in node.alternatives)
    return text if top else f"({text})"


def _lark_char(code: int) -> str:
    c = chr(code)
    if 0x20 <= code < 0x7F and c not in '"\\/':
        return f'"{c}"'
    return f"/\\x{{{code:x}}}/"
