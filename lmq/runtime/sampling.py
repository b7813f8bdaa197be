"""Sampling knobs on a masked logits row, under llama.cpp's names and in its order.

A `Sampler` turns a logits row in which masked tokens are already -inf into one token:
repetition penalties → top_k → typical_p → top_p → min_p → temperature → draw, or with
`mirostat` penalties → temperature → mirostat 1/2. Every step only lowers or removes
candidates among the finite entries, so no knob can make a masked token possible. The
draw uses a seeded numpy `Generator`: the same seed gives the same tokens.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from lmq.backends.sampling_settings import SamplingSettings
from lmq.constraints.token_choice import draw, draw_rows

_MIROSTAT_M = 100          # llama.cpp's sample size for mirostat 1's s estimate


class Sampler:
    """One branch's sampler: knobs, its own random stream and mirostat's running `mu`."""

    def __init__(self, settings: SamplingSettings, rng: np.random.Generator):
        self.settings = settings
        self.rng = rng
        self.mu = 2.0 * settings.mirostat_tau
        #: log Σ exp(row) of the last row `pick` drew from at temperature 1, else None
        self.log_normalizer: float | None = None

    def state(self) -> dict[str, Any]:
        """What the next draws depend on besides the rows: the random stream's state
        (numpy's PCG64 state) and mirostat's `mu`, as JSON data (an LMTP hole carries it)."""
        return {"rng": self.rng.bit_generator.state, "mu": self.mu}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a `state()`; a malformed one is a ValueError."""
        try:
            self.rng.bit_generator.state = state["rng"]
            mu = float(state["mu"])
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"not a sampler state: {e}") from None
        if not math.isfinite(mu):
            raise ValueError("not a sampler state: mu must be finite")
        self.mu = mu

    def fork(self, rng: np.random.Generator) -> "Sampler":
        """A sampler continuing this one's state on another random stream."""
        child = Sampler(self.settings, rng)
        child.mu = self.mu
        return child

    def pick(self, row: np.ndarray, history: Iterable[int] = (), ids: np.ndarray | None = None) -> int:
        """Draw an entry of the masked `row` (not modified) after the last tokens of
        `history` (for the repetition penalties); `ids` are the entries' token ids when
        the row is a gathered subset of the vocabulary."""
        self.log_normalizer = None
        if self.settings.greedy:
            return int(row.argmax())
        if self.settings.plain:
            return self._draw_scaled(row)
        ids, probs = self._candidates(row, history, ids)
        if self.settings.mirostat:
            return self._mirostat(ids, probs, row.shape[0])
        return int(ids[self._draw(probs)])

    @property
    def knows_normalizer(self) -> bool:
        """A plain draw at temperature 1: `pick_hiding` sums the row's exponentials, so
        the chosen token's log-probability needs no further pass."""
        return self.settings.plain and self.settings.temperature == 1

    def pick_hiding(self, row: np.ndarray, hidden: np.ndarray | None) -> int:
        """A plain draw from `row` with the `hidden` entries left out, without a copy of
        the row; -1 when nothing is left."""
        return self._draw_scaled(row, hidden)

    def distribution(self, row: np.ndarray, history: Iterable[int] = ()) -> np.ndarray:
        """The full probability vector `pick` draws from (mirostat: for its current mu)."""
        out = np.zeros(row.shape[0], dtype=np.float64)
        if self.settings.greedy:
            out[int(row.argmax())] = 1.0
            return out
        ids, probs = self._candidates(row, history)
        if self.settings.mirostat:
            ids, probs = self._mirostat_candidates(ids, probs, row.shape[0])
        out[ids] = probs
        return out

    def _candidates(self, row: np.ndarray, history: Iterable[int],
                    token_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, normalised probabilities) left after penalties, truncations and
        temperature, sorted by descending probability where a knob needed sorting."""
        s = self.settings
        logits = self._penalised(row, history, token_ids)
        ids = np.flatnonzero(np.isfinite(logits))
        if ids.size == 0:
            ids = np.array([int(row.argmax())])
        values = logits[ids].astype(np.float64)
        if not s.mirostat:
            if s.top_k and s.top_k < ids.size:
                keep = np.argpartition(-values, s.top_k - 1)[:s.top_k]
                ids, values = ids[keep], values[keep]
            if s.typical_p < 1:
                ids, values = _typical(ids, values, s.typical_p)
            if s.top_p < 1:
                ids, values = _nucleus(ids, values, s.top_p)
            if s.min_p > 0:
                probs = _softmax(values)
                keep = probs >= s.min_p * probs.max()
                ids, values = ids[keep], values[keep]
            if s.temperature == 0:
                best = int(values.argmax())
                return ids[best:best + 1], np.ones(1)
        temperature = s.temperature if s.temperature > 0 else 1.0
        return ids, _softmax(values / temperature)

    def _penalised(self, row: np.ndarray, history: Iterable[int],
                   token_ids: np.ndarray | None) -> np.ndarray:
        s = self.settings
        if (s.repeat_penalty == 1 and not s.frequency_penalty and not s.presence_penalty) \
                or not s.penalty_last_n:
            return row
        recent = list(history)[-s.penalty_last_n:]
        if not recent:
            return row
        tokens, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
        if token_ids is not None:               # a gathered row: penalise the entries of those ids
            entries = np.flatnonzero(np.isin(token_ids, tokens))
            counts = counts[np.searchsorted(tokens, token_ids[entries])]
            tokens = entries
        out = row.astype(np.float32, copy=True)
        values = out[tokens]
        if s.repeat_penalty != 1:
            values = np.where(values > 0, values / s.repeat_penalty, values * s.repeat_penalty)
        values = values - counts * s.frequency_penalty - s.presence_penalty
        out[tokens] = np.where(np.isfinite(row[tokens]), values, -np.inf)
        return out

    def _draw_scaled(self, row: np.ndarray, hidden: np.ndarray | None = None) -> int:
        """A draw from softmax(row / temperature) (`token_choice.draw`: masked entries
        weigh exp(-inf) = 0 and `hidden` entries are left out, so neither is ever drawn);
        -1 when nothing is left. At temperature 1 the row's normalizer is kept for the
        caller."""
        return self._drawn(*draw(row, self.rng.random(), self.settings.temperature, hidden))

    def _drawn(self, index: int, normalizer: float) -> int:
        """A plain draw's result taken: its index, the normalizer kept where it is the
        row's (temperature 1, something drawn)."""
        self.log_normalizer = normalizer if index >= 0 and self.settings.temperature == 1 else None
        return index

    def _draw(self, probs: np.ndarray) -> int:
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return min(index, probs.size - 1)

    def _mirostat_candidates(self, ids: np.ndarray, probs: np.ndarray,
                             vocabulary_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Mirostat's truncation for the current mu: v1 keeps the top k with k from the
        estimated Zipf exponent, v2 drops tokens more surprising than mu."""
        order = np.argsort(-probs, kind="stable")
        ids, probs = ids[order], probs[order]
        if self.settings.mirostat == 1:
            k = _mirostat_k(probs, self.mu, vocabulary_size)
            ids, probs = ids[:k], probs[:k]
        else:
            keep = max(1, int(np.count_nonzero(-np.log2(probs) <= self.mu)))
            ids, probs = ids[:keep], probs[:keep]
        return ids, probs / probs.sum()

    def _mirostat(self, ids: np.ndarray, probs: np.ndarray, vocabulary_size: int) -> int:
        ids, probs = self._mirostat_candidates(ids, probs, vocabulary_size)
        index = self._draw(probs)
        surprise = -math.log2(float(probs[index]))
        self.mu -= self.settings.mirostat_eta * (surprise - self.settings.mirostat_tau)
        return int(ids[index])


class DrawAhead:
    """A branch's next plain temperature-1 draw, made by the scheduler on the row it hands
    out (runtime/scheduler.py) right after the step's decode, before any task wakes: the
    branch's task then only reads the token and its score (on an H200 this took
    sample(n=8) from 1.44 to 1.37 of the raw batch; running the draws in parallel threads
    made it 1.7-2.0, the GIL and thread wake-ups costing more than the passes over the
    rows). The same sampler draws what the branch would have drawn itself; `run_all` makes
    a step's draws in one call. With `launch`, the branch goes on with any token drawn but
    an end token, so the scheduler may start decoding it at once (an engine that
    `decodes_async`): the row is then rewritten before the task runs, and the task reads
    only `token` and `logit`."""

    __slots__ = ("sampler", "hidden", "token", "logit", "launch")

    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.hidden: np.ndarray | None = None
        self.token: int | None = None
        self.logit = -np.inf            # the row's entry at `token`
        self.launch = False

    @staticmethod
    def run_all(draws: list["DrawAhead"], rows: list[np.ndarray]) -> None:
        """Each draw's `pick_hiding` on its row, the rows drawn from in one kernel call
        (each sampler's random stream and normalizer move as they would alone)."""
        us = [ahead.sampler.rng.random() for ahead in draws]
        drawn = draw_rows(rows, us, [ahead.hidden for ahead in draws])
        for ahead, row, result in zip(draws, rows, drawn):
            token = ahead.token = ahead.sampler._drawn(*result)
            ahead.logit = float(row[token]) if token >= 0 else -np.inf


def make_sampler(settings: dict[str, Any], seed: int | None, branch: int = 0) -> Sampler:
    """The sampler of branch `branch` of a query run with `seed` (None: fresh entropy);
    each branch has an independent stream, the same for the same seed."""
    rng = np.random.default_rng(None if seed is None else [seed, branch])
    return Sampler(SamplingSettings.of(settings), rng)


def _softmax(values: np.ndarray) -> np.ndarray:
    exps = np.exp(values - values.max())
    return exps / exps.sum()


def _nucleus(ids: np.ndarray, values: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-probable set whose mass reaches top_p (sorted descending)."""
    probs = _softmax(values)
    order = _top_order(probs, top_p)
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    order = order[:keep]
    return ids[order], values[order]


def _top_order(probs: np.ndarray, mass: float) -> np.ndarray:
    """Indices of the most probable entries, descending, enough to cover `mass`: a
    partial sort of growing size (a full sort of a 150k row costs milliseconds)."""
    size = 64
    while size < probs.size:
        part = np.argpartition(-probs, size - 1)[:size]
        part = part[np.argsort(-probs[part], kind="stable")]
        if probs[part].sum() >= mass:
            return part
        size *= 8
    return np.argsort(-probs, kind="stable")


def _typical(ids: np.ndarray, values: np.ndarray, typical_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Locally typical sampling: tokens whose surprise is closest to the entropy, until
    their mass reaches typical_p."""
    probs = _softmax(values)
    logs = np.log(np.where(probs > 0, probs, 1.0))
    entropy = -float(np.sum(probs * logs))
    order = np.argsort(np.abs(-logs - entropy), kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, typical_p, side="left")) + 1
    order = order[:keep]
    return ids[order], values[order]


def _mirostat_k(probs: np.ndarray, mu: float, vocabulary_size: int) -> int:
    """Mirostat 1's top-k size from the Zipf exponent estimated on the top tokens."""
    m = min(_MIROSTAT_M, probs.size)
    if m < 2:
        return 1
    top = probs[:m]
    t = np.log(np.arange(2, m + 1) / np.arange(1, m))
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.log(top[:-1] / top[1:])
    usable = np.isfinite(b)
    s_hat = float(np.sum(t[usable] * b[usable]) / np.sum(t[usable] ** 2)) if usable.any() else 1.0
    epsilon = s_hat - 1
    if epsilon <= 0 or s_hat <= 0:
        return probs.size
    k = ((epsilon * 2 ** mu) / (1 - vocabulary_size ** -epsilon)) ** (1 / s_hat)
    return int(min(max(k, 1), probs.size))


__all__ = ["DrawAhead", "Sampler", "make_sampler"]
