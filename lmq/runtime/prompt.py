"""The prompt of a running query: its text and the token list the model sees.

Plain prompts are tokenized incrementally: text appended since the last hole is
tokenized once, as one piece, and generated tokens are kept as generated, so the token
list only grows and the backend never evaluates a token twice. With chat tags and a model
that has a chat template, the conversation is rendered through the template before each
hole and the backend's prefix reuse keeps what is already evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmq.backends.base import Backend
from lmq.compiler.prompt_string import LONE_SURROGATE
from lmq.errors import LmqError
from lmq.runtime.chat import ChatTemplate


@dataclass(frozen=True)
class PromptMark:
    """A position in the prompt, to take back what a nested query wrote."""

    text: int
    tokens: int
    messages: tuple[tuple[str, str], ...]


class PromptState:
    def __init__(self, backend: Backend | None):
        self.backend = backend
        self._start = backend.vocabulary.prompt_start if backend else []
        self.text = ""
        self.tokens: list[int] = list(self._start)
        self._pending = ""
        self.template = ChatTemplate.of(backend) if backend else None
        self.messages: list[tuple[str, str]] | None = None     # set once a chat tag is seen

    def append_text(self, text: str) -> None:
        surrogate = LONE_SURROGATE.search(text)
        if surrogate is not None:       # (a literal's own are refused when it is compiled)
            raise LmqError(f"the prompt text {text[:60]!r} holds a lone surrogate "
                           f"U+{ord(surrogate.group()):04X}, which is not a character and "
                           "cannot be tokenized")
        if self.messages is not None:
            role, content = self.messages[-1]
            self.messages[-1] = (role, content + text)
        else:
            self._pending += text
        self.text += text

    def open_message(self, role: str) -> str | None:
        """Start a chat message; returns the text to append instead when there is no template."""
        if self.template is None:
            return f"\n(({role})):"
        if self.messages is None:
            self._flush()
            self.messages = [("system", self.text)] if self.text else []
        self.messages.append((role, ""))
        return None

    def context(self) -> list[int]:
        """The token list the model must see before the next generated token (never empty:
        a query that begins with a hole starts from the model's empty-prompt token)."""
        if self.messages is None:
            self._flush()
            if not self.tokens:
                self.tokens = self.backend.vocabulary.nonempty(self.tokens)
            return self.tokens
        tokens = self.backend.tokenize(self.template.render(self.messages, partial=True), special=True)
        self.tokens = tokens if tokens[:1] == self._start else self._start + tokens
        return self.tokens

    def append_generated(self, tokens: list[int], remainder: str, value: str) -> None:
        """Record a hole's value: `tokens` as generated, then `remainder` (the part of a
        token that a stop phrase cut) as text to tokenize."""
        if self.messages is None:
            self._flush()
            self.tokens.extend(tokens)
            self._pending += remainder
            self.text += value
        else:
            self.append_text(value)

    def _flush(self) -> None:
        if self._pending:
            self.tokens.extend(self.backend.tokenize(self._pending))
            self._pending = ""

    def mark(self) -> PromptMark:
        self._flush()
        return PromptMark(len(self.text), len(self.tokens), tuple(self.messages or ()))

    def truncate(self, mark: PromptMark) -> None:
        self._flush()
        self.text = self.text[:mark.text]
        del self.tokens[mark.tokens:]
        if self.messages is not None:
            self.messages = list(mark.messages)

    def final_text(self) -> str:
        """The prompt as the model saw it (chat: rendered through the template)."""
        if self.messages is None:
            return self.text
        return self.template.render(self.messages, partial=False)
