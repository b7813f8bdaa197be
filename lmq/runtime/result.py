"""`LMQResult`: what a query run produced."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LMQResult:
    """The final prompt, the last value of each hole, the token ids generated for each
    hole's last occurrence, and the summed log-probability of every generated token
    (under the masked distribution the decoder chose from)."""

    prompt: str
    variables: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    logprob: float = 0.0
    distribution: Any = None

    def to_json(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, (str, int, float, bool)) or value is None:
                return value
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {str(k): plain(v) for k, v in value.items()}
            return str(value)

        return {"prompt": self.prompt, "variables": plain(self.variables),
                "tokens": self.tokens, "logprob": self.logprob}
