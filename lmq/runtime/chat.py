"""Chat templates: rendering `{:role}` messages through the model's own Jinja template
(GGUF `tokenizer.chat_template`), in a sandbox.

A message still being written is rendered with a sentinel at the end of its content and
the text is cut at the sentinel, so a hole inside an assistant message continues exactly
where the template puts the assistant's reply, for any template.
"""

from __future__ import annotations

from functools import lru_cache

from jinja2 import Template, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmq.backends.base import Backend
from lmq.errors import ModelError

_SENTINEL = "\ue001lmq-open-message\ue001"


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> Template:
    """A template compiled once per source text (Jinja takes milliseconds to compile one,
    and every query run on a chat model renders through it)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    return environment.from_string(source)


class ChatTemplate:
    def __init__(self, source: str, bos: str, eos: str):
        self.template = _compile(source)
        self.bos = bos
        self.eos = eos

    @classmethod
    def of(cls, backend: Backend) -> "ChatTemplate | None":
        if not backend.chat_template:
            return None
        vocabulary = backend.vocabulary

        def text(token: int | None) -> str:
            return "" if token is None else backend.token_text(token)

        return cls(backend.chat_template, text(vocabulary.bos_id), text(vocabulary.eos_id))

    def render(self, messages: list[tuple[str, str]], partial: bool) -> str:
        """The conversation as text; `partial`: the last message is still open."""
        items = [{"role": role, "content": content} for role, content in messages]
        if partial and items:
            items[-1]["content"] += _SENTINEL
        try:
            text = self.template.render(messages=items, add_generation_prompt=False,
                                        bos_token=self.bos, eos_token=self.eos)
        except TemplateError as e:
            raise ModelError(f"the model's chat template failed: {e}") from None
        if partial and items:
            text = text[:text.index(_SENTINEL)]
        return text
