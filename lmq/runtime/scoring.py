"""Scoring continuations: `model.score`, the `distribution` clause, and `model.generate`.

Every value is scored as a continuation of the same prompt: the prompt is evaluated once,
each value gets a lane forked from it (the KV cache copied, not re-evaluated), and the
values advance together, one multi-sequence batch per token position. A value's score is
the sum of its tokens' log-probabilities under the model (no mask); `mean` divides by
the token count (LMQL's length-normalised variant).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lmq.backends.base import Backend
from lmq.compiler.constraints import Constraint, ValueComparison
from lmq.constraints.token_choice import log_normalizer
from lmq.errors import ConstraintError, QueryArgumentError
from lmq.runtime.scheduler import Lane, scheduler_for

if TYPE_CHECKING:
    from lmq.runtime.interpreter import Session

AGGREGATIONS = ("sum", "mean")


@dataclass
class ScoreResult:
    """Per-token log-probabilities of each value after one prompt."""

    prompt: str
    values: list[str]
    tokens: list[list[int]]
    token_logprobs: list[np.ndarray] = field(repr=False)

    def logprobs(self, agg: str = "sum") -> np.ndarray:
        """Each value's log-probability: the sum of its token log-probabilities, or their
        mean (`agg="mean"`)."""
        check_aggregation(agg)
        if agg == "sum":
            return np.array([float(t.sum()) for t in self.token_logprobs])
        return np.array([float(t.mean()) if t.size else 0.0 for t in self.token_logprobs])

    def probs(self, agg: str = "sum") -> np.ndarray:
        """The softmax of `logprobs(agg)` over the values (they sum to 1)."""
        scores = self.logprobs(agg)
        exps = np.exp(scores - scores.max())
        return exps / exps.sum()

    def argmax(self, agg: str = "sum") -> str:
        """The most likely value."""
        return self.values[int(np.argmax(self.logprobs(agg)))]


def check_aggregation(agg: Any, name: str = "agg") -> str:
    if agg not in AGGREGATIONS:
        raise QueryArgumentError(f"{name}={agg!r}: expected 'sum' or 'mean'")
    return agg


async def score_continuations(lane: Lane, context: list[int],
                              continuations: list[list[int]]) -> list[np.ndarray]:
    """Log-probabilities of each continuation's tokens after `context`, under the model.
    `lane` is brought to `context`; each continuation decodes on a fork of it."""
    first = _log_softmax(await lane.logits(context))
    scores = [np.zeros(len(tokens)) for tokens in continuations]
    forks = [lane.fork() for _ in continuations]
    try:
        for i, tokens in enumerate(continuations):
            if tokens:
                scores[i][0] = first[tokens[0]]
        for position in range(1, max((len(t) for t in continuations), default=0)):
            active = [i for i, tokens in enumerate(continuations) if len(tokens) > position]
            steps = [forks[i].advance([continuations[i][position - 1]]) for i in active]
            for i, step in zip(active, steps):
                row = await step                    # all done in one step: no suspension after the first
                scores[i][position] = float(row[continuations[i][position]]) - log_normalizer(row)
    finally:
        for fork in forks:
            fork.release()
    return scores


async def score(backend: Backend, prompt: str | list[int], values: list[str | list[int]]) -> ScoreResult:
    """`model.score(prompt, values)`: token log-probabilities of each value after `prompt`
    (text, tokenized with BOS where the model wants one, or token ids)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)) or not values:
        raise QueryArgumentError(f"score: values must be a non-empty list of strings, not {values!r}")
    context = _prompt_tokens(backend, prompt)
    continuations = [_value_tokens(backend, v) for v in values]
    lane = scheduler_for(backend).lane()
    try:
        logprobs = await score_continuations(lane, context, continuations)
    finally:
        lane.release()
    text = prompt if isinstance(prompt, str) else backend.detokenize(prompt).decode("utf-8", "replace")
    shown = [v if isinstance(v, str) else backend.detokenize(v).decode("utf-8", "replace") for v in values]
    return ScoreResult(text, shown, continuations, logprobs)


def _prompt_tokens(backend: Backend, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        tokens = backend.vocabulary.prompt_start + backend.tokenize(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        tokens = list(prompt)
    else:
        raise QueryArgumentError(f"score: the prompt must be a string or a list of token ids, not {prompt!r}")
    return backend.vocabulary.nonempty(tokens)


def _value_tokens(backend: Backend, value: str | list[int]) -> list[int]:
    if isinstance(value, str):
        return backend.tokenize(value)
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        return list(value)
    raise QueryArgumentError(f"score: a value must be a string or a list of token ids, not {value!r}")


async def fill_distribution(session: "Session", name: str, distribution: Constraint,
                            scope: dict[str, Any]) -> str:
    """The `distribution VAR in [values]` hole: score every value after the prompt (one
    batch per token position), bind `P(VAR)` / `log P(VAR)`, append the most likely."""
    values = _distribution_values(distribution, scope)
    backend = session.backend
    continuations = [backend.tokenize(v) for v in values]
    context = session.prompt.context()
    logprobs = await score_continuations(session.lane, context, continuations)
    result = ScoreResult(session.prompt.text, values, continuations, logprobs)
    scores = result.logprobs(session.decoder.distribution_norm)
    log_probs = scores - log_normalizer(scores)
    best = int(np.argmax(scores))
    session.variables[f"P({name})"] = [(v, float(p)) for v, p in zip(values, np.exp(log_probs))]
    session.variables[f"log P({name})"] = [(v, float(lp)) for v, lp in zip(values, log_probs)]
    session.distribution = session.variables[f"P({name})"]
    session.prompt.append_generated(continuations[best], "", values[best])
    session.tokens[name] = continuations[best]
    if session.on_text:
        session.on_text(values[best])
    return values[best]


def _distribution_values(distribution: Constraint, scope: dict[str, Any]) -> list[str]:
    if not (isinstance(distribution, ValueComparison) and distribution.op == "in"):
        raise ConstraintError(f"distribution {distribution.source!r}: expected VAR in [values]")
    values = distribution.operand.evaluate(scope)
    if isinstance(values, str) or not isinstance(values, (list, tuple)) or not values \
            or not all(isinstance(v, str) for v in values):
        raise ConstraintError(f"distribution {distribution.source!r}: the values must be a non-empty "
                              f"list of strings, not {values!r}")
    return list(values)


def _log_softmax(row: np.ndarray) -> np.ndarray:
    return row.astype(np.float64) - log_normalizer(row)
