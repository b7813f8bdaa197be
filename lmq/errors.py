"""The errors lmq raises: every user-facing failure is one of these, with a message that
names what is wrong (a line and column, an argument, a path, a variable)."""

from __future__ import annotations

from typing import Any


class LmqError(Exception):
    """Base class of every error lmq raises on purpose."""


class LmqSyntaxError(LmqError):
    """A malformed query: carries the file, line, column, the offending line and a caret."""

    def __init__(self, message: str, *, filename: str = "<query>", line: int = 0,
                 column: int = 0, source_line: str = ""):
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column
        self.source_line = source_line
        super().__init__(self._render())

    def _render(self) -> str:
        where = f'{self.filename}, line {self.line}, column {self.column}'
        text = f"{where}: {self.message}"
        if self.source_line:
            caret = " " * max(self.column - 1, 0) + "^"
            text += f"\n    {self.source_line}\n    {caret}"
        return text


class QueryArgumentError(LmqError):
    """A missing query parameter, an unknown keyword argument or decoder argument."""


class ModelError(LmqError):
    """A model id that cannot be resolved or a model file that is missing or invalid."""


class ConstraintError(LmqError):
    """A where-clause construct that is malformed or not supported here (names it)."""


class ConstraintTooLarge(ConstraintError):
    """A constraint whose automaton or grammar would exceed lmq's limits
    (`lmq.constraints.limits`): says how large it got and what the limit is."""


class UnsatisfiableConstraint(ConstraintError):
    """No value can satisfy the constraints of a hole (names the variable)."""


class ConstraintViolation(LmqError):
    """A finished value does not satisfy its where clause (never expected: a safety net)."""


class ContextLimitError(LmqError):
    """The prompt plus generated tokens reached `max_len`; `.result` holds what was made."""

    def __init__(self, message: str, result: Any = None):
        super().__init__(message)
        self.result = result
