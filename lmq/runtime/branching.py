"""Decoders with several results: `sample(n)`, `argmax(n)`, `beam(n)` and `best_k(k)`.

Every branch is one instance of the query program with its own `Session` (prompt, values)
and its own scheduler lane; all branches decode in the same multi-sequence batch, one
`advance_many` per token step, and the prompt they share is evaluated once (a branch's
first prefill forks the lane that already holds it).

A program instance cannot be copied while it runs, so a search that splits a branch
inside a hole (beam, best_k) starts a new instance that replays: finished holes return
their recorded outputs (after checking that the program asked for the same prompt), the
hole in progress re-takes the recorded choices without evaluating anything (its lane is a
fork of the parent's KV cache), then the new branch goes on by itself. Python code before
a split point therefore runs once per branch; side effects repeat (README, language).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from typing import Any

import numpy as np

from lmq.backends.base import Backend, common_prefix
from lmq.compiler.codegen import PromptProgram
from lmq.constraints.hole_plan import HoleOutput
from lmq.errors import ContextLimitError, LmqError
from lmq.constraints.token_choice import log_normalizer
from lmq.runtime.decoders import COMMON_ARGUMENTS, DECODERS, Decoder, _nothing
from lmq.runtime.interpreter import Session, execute
from lmq.runtime.sampling import DrawAhead, Sampler, make_sampler
from lmq.runtime.scheduler import Lane


class SampleDecoder(Decoder):
    """`sample(n, temperature, …)`: n independent draws under llama.cpp's sampling knobs."""

    name = "sample"

    def __init__(self, **settings: Any):
        super().__init__(**settings)
        self._sampler: Sampler | None = None
        self._lane: Lane | None = None
        self._ahead: DrawAhead | None = None       # this step's draw, made by the scheduler
        self._draw: DrawAhead | None = None

    def branch(self, index: int) -> "SampleDecoder":
        child = super().branch(index)
        child._sampler = make_sampler(self.settings, self.settings.get("seed"), index)
        child._ahead = child._draw = None
        return child

    async def decode(self, lane: Lane, *args: Any, **kwargs: Any) -> HoleOutput:
        self._lane = lane               # its tokens are the history the penalties look at
        self._ahead = None
        return await super().decode(lane, *args, **kwargs)

    def _draw_ahead(self, plan, automaton, count: int, end_list: np.ndarray,
                    room: int) -> DrawAhead | None:
        """Without a mask, a plain draw at temperature 1 needs only the row (and the end
        tokens hidden while the value may not end): the scheduler makes it. The value goes
        on after the drawn token (unless it is an end token or completes a stop phrase)
        while the token budget and the context leave room for another, and nothing traces
        the rows: then the scheduler may start decoding the token at once."""
        sampler = self.sampler()
        if automaton is not None or not sampler.knows_normalizer:
            return None
        if self._draw is None or self._draw.sampler is not sampler:
            self._draw = DrawAhead(sampler)            # one per branch, reused every step
        self._draw.hidden = None if plan.may_end_at(count) else end_list
        self._draw.token = None
        self._draw.launch = (self.tracer is None and count + 1 < room
                             and (plan.max_tokens is None or count + 1 < plan.max_tokens))
        self._ahead = self._draw
        return self._ahead

    async def _select(self, row, mask, hidden, end_list):
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead.token is None:       # drawn alone: the task draws
            return self._choose_later(row, mask, hidden, end_list)
        if ahead.token < 0:
            return -1, _nothing
        chosen, normalizer = ahead.logit, ahead.sampler.log_normalizer
        return ahead.token, lambda: chosen - normalizer

    def sampler(self) -> Sampler:
        """This branch's sampler (its random state continues from hole to hole)."""
        if self._sampler is None:
            self._sampler = make_sampler(self.settings, self.settings.get("seed"))
        return self._sampler

    def _pick(self, row: np.ndarray, ids: np.ndarray | None) -> int:
        return self.sampler().pick(row, self._lane.tokens if self._lane is not None else (), ids)

    def _pick_hiding(self, row: np.ndarray, hidden: np.ndarray | None) -> int | None:
        """A plain draw at temperature 1 leaves the hidden entries out itself and knows its
        normalizer: the row needs no copy."""
        sampler = self.sampler()
        return sampler.pick_hiding(row, hidden) if sampler.knows_normalizer else None

    picks_best = False

    def _known_normalizer(self) -> float | None:
        """A draw at temperature 1 has summed the row's exponentials already."""
        return self._sampler.log_normalizer


class _Pruned(BaseException):
    """Ends a branch the search dropped (a BaseException, so query code cannot catch it)."""


class SearchDecoder(Decoder):
    """Beam search over the whole program: each step keeps the `n` best (branch, next
    token) extensions by total log-probability, with the text inserted between holes
    scored into each branch. `beam` lets finished programs compete with running ones and
    stops when the best n are finished; `best_k` sets finished programs aside and keeps
    searching with n running branches until k programs are finished."""

    name = "beam"
    keeps_searching = False
    whole_holes_remote = False
    speculates = False          # a choice waits for the search, and a split forks the lane

    def __init__(self, **settings: Any):
        settings = dict(settings)
        if "k" in self.arguments and "k" in settings:
            settings.setdefault("n", settings.pop("k"))
        settings.setdefault("n", 2)
        super().__init__(**settings)
        self.search: BeamSearch | None = None
        self.session: Session | None = None
        self.lane: Lane | None = None
        self.replayed: deque[tuple[list[int], float, HoleOutput]] = deque()
        self.record: list[tuple[list[int], float, HoleOutput]] = []
        self.forced: deque[tuple[int, float]] = deque()
        self.choices: list[tuple[int, float]] = []
        self.text_logprob = 0.0
        self._candidates: list[tuple[int, float]] = []

    def score(self) -> float:
        """The branch's log-probability so far, the hole in progress included."""
        return self.session.logprob + sum(logprob for _, logprob in self.choices)

    def branch(self, index: int) -> "SearchDecoder":
        child = super().branch(index)
        child.replayed, child.record, child.forced, child.choices = deque(), [], deque(), []
        child._candidates = []
        return child

    def split(self, choice: tuple[int, float]) -> "SearchDecoder":
        """A branch that replays this one's holes and choices, then takes `choice`."""
        child = self.branch(0)
        child.replayed = deque(self.record)
        child.forced = deque(self.choices + [choice])
        child.text_logprob = self.text_logprob
        if self.tracer is not None:
            child.tracer = self.tracer.split(len(self.choices))
        return child

    async def decode(self, lane: Lane, context: list[int], *args: Any, **kwargs: Any) -> HoleOutput:
        self.lane = lane
        if self.replayed:
            recorded, text_logprob, output = self.replayed.popleft()
            if recorded != context:
                raise LmqError(f"{self.name}: a replayed branch asked for a different prompt before "
                               "a hole than its parent did; the code before each hole must be "
                               "deterministic under branching decoders")
            self.session.logprob += text_logprob
            self.record.append((recorded, text_logprob, output))
            return output
        if not self.forced:                  # joining a hole in progress inherits its text score
            self.text_logprob = await self._score_text(lane, context)
        self.session.logprob += self.text_logprob
        output = await super().decode(lane, context, *args, **kwargs)
        self.record.append((list(context), self.text_logprob, output))
        self.choices = []
        return output

    async def _score_text(self, lane: Lane, context: list[int]) -> float:
        """Log-probability of the prompt tokens written since the previous hole (the
        prompt before the first hole is the same for every branch and is not scored)."""
        if not self.record:
            return 0.0
        previous, _, output = self.record[-1]
        start = max(common_prefix(previous + output.tokens, context), 1)
        if start >= len(context):
            return 0.0
        row = await lane.logits(context[:start])
        total = 0.0
        for position in range(start, len(context)):
            token = context[position]
            total += float(row[token]) - log_normalizer(row)
            if position + 1 < len(context):
                row = await lane.advance([token])
        return total

    async def _select(self, row, mask, hidden, end_list) -> tuple[int, float]:
        if self.forced:
            choice = self.forced.popleft()
            if not self.forced:
                self.lane.replaying = False
                if self.tracer is not None:
                    self.tracer.muted = False
            self.choices.append(choice)
            return choice
        token, logprob = self._choose(row, mask, hidden, end_list)
        if token < 0:
            return token, logprob
        if self.tracer is not None:
            self.tracer.capture(row, mask, hidden, end_list)
        choice = await self.search.decide(self, self._candidates)
        self.choices.append(choice)
        return choice

    def _pick(self, row: np.ndarray, ids: np.ndarray | None) -> int:
        """The best entry; the n best (token, log-probability) pairs go to the search."""
        width = min(self.n, row.size)
        top = np.argpartition(-row, width - 1)[:width] if width < row.size else np.arange(row.size)
        top = top[np.argsort(-row[top], kind="stable")]
        top = top[np.isfinite(row[top])]
        total = self._total = log_normalizer(row)
        self._candidates = [(int(ids[i]) if ids is not None else int(i), float(row[i]) - total)
                            for i in top]
        return int(top[0]) if top.size else 0

    picks_best = False                    # the search needs the n best: `_pick` finds them

    def _known_normalizer(self) -> float | None:
        return self._total                # summed by _pick for the search's candidates


class BestKDecoder(SearchDecoder):
    name = "best_k"
    arguments = COMMON_ARGUMENTS | {"k"}
    keeps_searching = True


class BeamSearch:
    """The search of one query run: starts, splits, prunes and collects branches."""

    def __init__(self, decoder: SearchDecoder, program: PromptProgram, namespace: dict[str, Any],
                 bound: list[Any], backend: Backend):
        self.decoder = decoder
        self.width = decoder.n
        self.program, self.namespace, self.bound, self.backend = program, namespace, bound, backend
        self.active: set[SearchDecoder] = set()
        self.waiting: dict[SearchDecoder, tuple[list[tuple[int, float]], asyncio.Future]] = {}
        self.finished: list[tuple[float, int, Any, str]] = []
        self.tasks: set[asyncio.Task] = set()
        self.sessions: list[Session] = []
        self._order = itertools.count()
        self._done: asyncio.Future | None = None

    async def run(self) -> list[Any]:
        self._done = asyncio.get_running_loop().create_future()
        root = self.decoder.branch(0)
        self._start(root, None)
        try:
            await self._done
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        ranked = sorted(self.finished, key=lambda f: (-f[0], f[1]))
        results, seen = [], set()
        for _, _, result, key in ranked:
            if key not in seen:
                seen.add(key)
                results.append(result)
        return results[:self.width]

    def _start(self, branch: SearchDecoder, lane: Lane | None) -> None:
        session = Session(self.backend, branch, lane=lane)
        branch.search, branch.session = self, session
        self.active.add(branch)
        task = asyncio.ensure_future(self._run_branch(branch, session))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_branch(self, branch: SearchDecoder, session: Session) -> None:
        try:
            returned = await execute(self.program, self.namespace, self.bound, session)
        except _Pruned:
            if branch.tracer is not None:
                branch.tracer.pruned()
        except asyncio.CancelledError:
            raise
        except BaseException as error:
            if not self._done.done():
                self._done.set_exception(error)
        else:
            key = repr(sorted(session.variables.items(), key=lambda item: item[0]))
            self.finished.append((session.logprob, next(self._order), returned, key))
        finally:
            session.close()
            self.active.discard(branch)
            self.waiting.pop(branch, None)
            self._step()

    def decide(self, branch: SearchDecoder, candidates: list[tuple[int, float]]) -> asyncio.Future:
        """Wait until every running branch has offered its candidates, then rank them."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[branch] = (candidates, future)
        self._step()
        return future

    def _step(self) -> None:
        if self._done.done():
            return
        if self.decoder.keeps_searching and len(self.finished) >= self.width:
            self._done.set_result(None)
            return
        if not self.active:
            self._done.set_result(None)
            return
        if len(self.waiting) < len(self.active):
            return
        pool = [(branch.score() + logprob, next(self._order), branch, (token, logprob))
                for branch, (candidates, _) in self.waiting.items() for token, logprob in candidates]
        if not self.decoder.keeps_searching:
            pool += [(score, order, None, None) for score, order, _, _ in self.finished]
        kept = sorted(pool, key=lambda entry: (-entry[0], entry[1]))[:self.width]
        if not self.decoder.keeps_searching:
            kept_finished = {order for _, order, branch, _ in kept if branch is None}
            self.finished = [f for f in self.finished if f[1] in kept_finished]
        choices: dict[SearchDecoder, list[tuple[int, float]]] = {}
        for _, _, branch, choice in kept:
            if branch is not None:
                choices.setdefault(branch, []).append(choice)
        waiting, self.waiting = self.waiting, {}
        for branch, (_, future) in waiting.items():
            mine = choices.get(branch)
            if not mine:
                future.set_exception(_Pruned())
                continue
            for extra in mine[1:]:
                lane = branch.lane.fork()
                lane.replaying = True
                self._start(branch.split(extra), lane)
            future.set_result(mine[0])


async def run_branches(decoder: Decoder, program: PromptProgram, namespace: dict[str, Any],
                       bound: list[Any], backend: Backend) -> list[Any]:
    """Run a query under a decoder with several results: a list of results."""
    if isinstance(decoder, SearchDecoder):
        return await BeamSearch(decoder, program, namespace, bound, backend).run()
    sessions = [Session(backend, decoder.branch(i)) for i in range(decoder.n)]
    tasks = [asyncio.ensure_future(execute(program, namespace, bound, s)) for s in sessions]
    try:
        return list(await asyncio.gather(*tasks))
    except ContextLimitError as error:
        error.result = [s.result() for s in sessions]
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for session in sessions:
            session.close()


def is_branching(decoder: Decoder) -> bool:
    """Whether the decoder returns a list of results."""
    return decoder.n > 1 or isinstance(decoder, SearchDecoder)


DECODERS.update({"sample": SampleDecoder, "beam": SearchDecoder, "beam_search": SearchDecoder,
                 "best_k": BestKDecoder})
