"""Python text of a query (and a command-line literal) parsed with its nesting bounded.

Python's compiler, `ast.unparse`, `ast.literal_eval` and `symtable` recurse once per level
of nesting, and fail with RecursionError or MemoryError somewhere between 200 and 3,000
levels depending on the construct and the caller's stack. A query nested deeper than
`MAX_NESTING` levels (brackets, operators, calls, blocks: the depth of Python's AST) is
refused with a SyntaxError at the node where the limit is passed, which every caller
already turns into an `LmqSyntaxError` with line and column.
"""

from __future__ import annotations

import ast
from typing import Any

#: the deepest Python AST a query may have; a third of what `ast.unparse` survives
MAX_NESTING = 100
TOO_DEEP = f"nested too deeply (more than {MAX_NESTING} levels of brackets, operators or blocks)"


def parse_python(source: str, mode: str = "eval", filename: str = "<query>") -> ast.AST:
    """`ast.parse` that raises SyntaxError (with a position) for nesting beyond the limit."""
    try:
        tree = ast.parse(source, filename, mode)
    except (RecursionError, MemoryError):     # deeper than Python's own parser goes
        raise SyntaxError(TOO_DEEP, (filename, 1, 1, source.split("\n", 1)[0])) from None
    line, column = _first_too_deep(tree)
    if line:
        raise SyntaxError(TOO_DEEP, (filename, line, column, source.split("\n")[line - 1]))
    return tree


def _first_too_deep(tree: ast.AST) -> tuple[int, int]:
    """(line, column) of the first node in source order deeper than `MAX_NESTING`, or of
    its nearest ancestor with a position; (0, 0) if none (walked without recursion)."""
    stack = [(tree, 1, (1, 1))]
    while stack:
        node, depth, position = stack.pop()
        if hasattr(node, "lineno"):
            position = (node.lineno, node.col_offset + 1)
        if depth > MAX_NESTING:
            return position
        stack.extend((child, depth + 1, position) for child in reversed(list(ast.iter_child_nodes(node))))
    return 0, 0


def literal_or_text(text: str) -> Any:
    """A command-line value: the Python literal `text` spells (`21`, `[1, 2]`, `True`), else
    `text` itself (also for a literal nested beyond the limit)."""
    try:
        return ast.literal_eval(parse_python(text))
    except (ValueError, TypeError, SyntaxError):     # not a literal, or `{[1]: 2}`
        return text
