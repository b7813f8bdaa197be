"""The sampling knobs, under llama.cpp's names: what a query's decoder arguments set, what
the in-process sampler (runtime/sampling.py) applies and what the remote backends (LMTP,
llama-server, OpenAI-compatible engines) send. Defined here, below the runtime, so that
backends need nothing from it."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from lmq.errors import QueryArgumentError

#: LMQL's spellings of llama.cpp's knobs
KNOB_ALIASES = {"repetition_penalty": "repeat_penalty"}


@dataclass(frozen=True)
class SamplingSettings:
    """The knobs, with neutral defaults (a knob left at its default changes nothing)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1

    @classmethod
    def names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def of(cls, settings: dict[str, Any]) -> "SamplingSettings":
        """The knobs among `settings` (other keys are ignored), validated."""
        knobs = {KNOB_ALIASES.get(k, k): v for k, v in settings.items()}
        chosen = cls(**{k: v for k, v in knobs.items() if k in cls.names() and v is not None})
        chosen._validate()
        return chosen

    def _validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise QueryArgumentError(f"sampling argument {name}={getattr(self, name)!r}: {rule}")

        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                     "frequency_penalty", "presence_penalty", "mirostat_tau", "mirostat_eta"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                 name, "must be a finite number")
        for name in ("top_k", "penalty_last_n", "mirostat"):
            need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                 name, "must be an int")
        need(self.temperature >= 0, "temperature", "must be >= 0")
        need(self.top_k >= 0, "top_k", "must be >= 0 (0 turns it off)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        need(0 < self.typical_p <= 1, "typical_p", "must be in (0, 1]")
        need(self.repeat_penalty > 0, "repeat_penalty", "must be > 0")
        need(self.penalty_last_n >= 0, "penalty_last_n", "must be >= 0")
        need(self.mirostat in (0, 1, 2), "mirostat", "must be 0 (off), 1 or 2")
        need(self.mirostat_tau > 0, "mirostat_tau", "must be > 0")
        need(self.mirostat_eta > 0, "mirostat_eta", "must be > 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 and not self.mirostat

    @property
    def plain(self) -> bool:
        """Only a temperature: the draw needs no candidate set (the per-token hot path)."""
        return (not self.top_k and self.top_p == 1 and self.min_p == 0 and self.typical_p == 1
                and self.repeat_penalty == 1 and not self.frequency_penalty
                and not self.presence_penalty and not self.mirostat)
