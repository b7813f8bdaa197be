"""Splits the source text of a prompt string into literal text, `{…}` interpolations,
`{:role}` chat tags and `[…]` holes.

The scan works on the literal's *source* body (before Python unescapes it) so that a hole
annotation such as `[X: r'\\d{3}']` stays opaque to f-string processing, and so that
errors point at the exact column.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass

_NAME = re.compile(r"[^\W\d]\w*")
#: a UTF-16 surrogate on its own: Python strings can hold one, no encoding of text can
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_CHAT_TAG = re.compile(r"\{:(\w+)\}")


@dataclass(frozen=True)
class TextPart:
    """Literal source text (still with Python escapes and `{{ }}`), bracket escapes undone."""

    source: str


@dataclass(frozen=True)
class InterpolationPart:
    """`{expr!conv:spec}`: the expression source plus the f-string suffix (`!r`, `:>4`)."""

    expression: str
    suffix: str
    offset: int


@dataclass(frozen=True)
class ChatTagPart:
    role: str


@dataclass(frozen=True)
class HolePart:
    """`[@dec NAME: annotation]`: decorators and annotation are Python source text."""

    name: str
    decorators: tuple[str, ...]
    annotation: str | None
    offset: int


Part = TextPart | InterpolationPart | ChatTagPart | HolePart


class PromptScanError(Exception):
    """A malformed prompt string; `offset` is relative to the scanned body."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.message = message
        self.offset = offset


def scan_prompt(body: str) -> list[Part]:
    """Split a prompt literal's body into parts, left to right."""
    parts: list[Part] = []
    text: list[str] = []
    i = 0
    n = len(body)

    def flush() -> None:
        if text:
            parts.append(TextPart("".join(text)))
            text.clear()

    while i < n:
        c = body[i]
        if c == "\\" and i + 1 < n:
            text.append(body[i:i + 2])
            i += 2
        elif body.startswith("[[", i) or body.startswith("]]", i):
            text.append(c)
            i += 2
        elif body.startswith("{{", i) or body.startswith("}}", i):
            text.append(body[i:i + 2])
            i += 2
        elif c == "[":
            end = _matching(body, i, "[", "]")
            flush()
            parts.append(_hole(body[i + 1:end], i))
            i = end + 1
        elif c == "{":
            tag = _CHAT_TAG.match(body, i)
            end = tag.end() - 1 if tag else _matching(body, i, "{", "}")
            flush()
            if tag:
                parts.append(ChatTagPart(tag.group(1)))
            else:
                parts.append(_interpolation(body[i + 1:end], i + 1))
            i = end + 1
        elif c == "]":
            raise PromptScanError("a single ']' closes no hole; write ']]' for a literal ']'", i)
        elif c == "}":
            raise PromptScanError("a single '}' closes no interpolation; write '}}' for a literal '}'", i)
        else:
            text.append(c)
            i += 1
    flush()
    return parts


def _matching(body: str, start: int, open_: str, close: str) -> int:
    """Index of the bracket closing `body[start]`, skipping nested brackets and strings."""
    depth = 0
    i = start
    quote = ""
    while i < len(body):
        c = body[i]
        if quote:
            if c == "\\":
                i += 1
            elif body.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif c in "\"'":
            quote = body[i:i + 3] if body[i:i + 3] in ('"""', "'''") else c
            i += len(quote) - 1
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                if c != close:
                    raise PromptScanError(f"'{open_}' is closed by '{c}'", i)
                return i
        i += 1
    what = "a hole" if open_ == "[" else "an interpolation"
    raise PromptScanError(f"unclosed '{open_}' of {what}; write '{open_ * 2}' for a literal "
                          f"'{open_}'", start)


def _hole(inner: str, offset: int) -> HolePart:
    decorators: list[str] = []
    rest = inner.strip()
    while rest.startswith("@"):
        match = re.match(r"@([^\s:]+)\s+", rest)
        if match is None:
            raise PromptScanError("a hole decorator '@f' must be followed by the variable name",
                                  offset + 1)
        decorators.append(match.group(1))
        rest = rest[match.end():]
    name, colon, annotation = rest.partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
        raise PromptScanError(f"'[{inner}]' is not a hole: {name!r} is not a variable name "
                              "(write '[[' for a literal '[')", offset)
    if keyword.iskeyword(name):
        raise PromptScanError(f"'[{inner}]' is not a hole: {name!r} is a Python keyword", offset)
    annotation = annotation.strip()
    if colon and not annotation:
        raise PromptScanError(f"the hole [{name}: …] has an empty annotation", offset)
    return HolePart(name, tuple(decorators), annotation or None, offset)


def _interpolation(inner: str, offset: int) -> InterpolationPart:
    """Separate `expr` from a trailing `!conv` / `:spec` at bracket depth 0."""
    depth = 0
    quote = ""
    i = 0
    while i < len(inner):
        c = inner[i]
        if quote:
            if c == "\\":
                i += 1
            elif inner.startswith(quote, i):
                i += len(quote) - 1
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and ((c == "!" and inner[i + 1:i + 2] != "=") or c == ":"):
            break
        i += 1
    expression = inner[:i]
    if not expression.strip():
        raise PromptScanError("empty interpolation '{}'; write '{{}}' for literal braces", offset - 1)
    return InterpolationPart(expression, inner[i:], offset)
