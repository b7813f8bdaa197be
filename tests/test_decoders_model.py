"""Branching decoders on SmolLM2 through llama.cpp: beam scores against `score`, seeds,
argmax(n), constraints on every branch, generate.

Scores recomputed by `score` agree with the decoders' to float rounding of llama.cpp's
kernels: a KV cache computed in batches of another size gives logits that differ in the
last digits, so comparisons allow a few hundredths of a nat per token (on a model with
flash attention off: llama.cpp's CPU flash-attention kernel, its automatic default,
accumulates in half precision and differs by up to a tenth), and "same seed, same
samples" is checked on fresh models (the same cache history)."""

import asyncio
import gc
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PinnedModel

import lmq
from lmq.backends import default_model_path
from lmq.backends.llama_cpp import LlamaCppBackend
from lmq.runtime.scheduler import _lease

pytestmark = pytest.mark.model

PROMPT = "Q: Name a fruit.\nA:"


def tolerance(tokens: int) -> float:
    return 0.02 + 0.02 * tokens


def test_beam_scores_are_sorted_and_equal_the_model_log_probabilities():
    model = lmq.model(None, flash_attn=False)
    results = lmq.run_sync(r'"Q: Name a fruit.\nA:[X]" where len(TOKENS(X)) < 5', model=model,
                           decoder="beam(n=3)")
    assert 1 <= len(results) <= 3
    scores = [r.logprob for r in results]
    assert scores == sorted(scores, reverse=True)
    full = [r for r in results if len(r.tokens["X"]) == 4]       # not ended by an end token
    assert full
    rescored = model.score_sync(PROMPT, [r.tokens["X"] for r in full]).logprobs()
    for result, expected in zip(full, rescored):
        assert result.logprob == pytest.approx(expected, abs=tolerance(4))


def test_beam_scores_the_text_between_holes():
    model = lmq.model(None, flash_attn=False)
    query = (r'"Q: Name a fruit.\nA:[X]\nQ: And a colour?\nA:[Y]" '
             'where len(TOKENS(X)) < 4 and len(TOKENS(Y)) < 3')
    results = lmq.run_sync(query, model=model, decoder="beam(n=2)")
    between = model.backend().tokenize("\nQ: And a colour?\nA:")
    full = [r for r in results if len(r.tokens["X"]) == 3 and len(r.tokens["Y"]) == 2]
    assert full
    for result in full:                   # no end token chosen, so no end-token score to add
        continuation = result.tokens["X"] + between + result.tokens["Y"]
        expected = model.score_sync(PROMPT, [continuation]).logprobs()[0]
        assert result.logprob == pytest.approx(expected, abs=tolerance(len(continuation)))
    assert results[0].logprob >= results[-1].logprob


def test_sample_same_seed_same_results_and_constraints_on_every_branch():
    query = r'"Q: Name a fruit.\nA:[X]" where STOPS_AT(X, ".") and len(TOKENS(X)) < 8'

    def run(seed):      # a fresh model each time: the same cache history, the same logits
        backend = LlamaCppBackend(default_model_path(), n_ctx=512)
        try:
            return lmq.run_sync(query, model=PinnedModel(backend),
                                decoder=f"sample(n=4, seed={seed}, temperature=1.2)")
        finally:
            backend.close()

    first, again = run(11), run(11)
    assert [r.variables for r in first] == [r.variables for r in again]
    assert len(first) == 4
    for result in first:
        value = result.variables["X"]
        assert len(result.tokens["X"]) <= 7
        assert "." not in value[:-1]
        assert result.prompt == PROMPT + value


def test_argmax_n_repeats_the_greedy_result():
    query = r'"Q: Name a fruit.\nA:[X]" where len(TOKENS(X)) < 6'
    single = lmq.run_sync(query)
    results = lmq.run_sync(query, decoder="argmax(n=3)")
    assert [r.variables["X"] for r in results] == [single.variables["X"]] * 3


def test_generate_continues_the_prompt_under_any_decoder():
    model = lmq.model()
    greedy = model.generate_sync(PROMPT, max_tokens=5)
    query_value = lmq.run_sync(r'"Q: Name a fruit.\nA:[X]" where len(TOKENS(X)) <= 5').variables["X"]
    assert greedy == query_value
    samples = model.generate_sync(PROMPT, max_tokens=4, decoder="sample", n=3, seed=2)
    assert isinstance(samples, list) and len(samples) == 3
    assert all(len(model.backend().tokenize(s)) <= 6 for s in samples)
    with pytest.raises(lmq.QueryArgumentError, match="max_tokens"):
        model.generate_sync(PROMPT, max_tokens=-1)


def test_branches_fill_a_small_cache_that_released_slots_give_back():
    """Released slots keep their tokens in the shared KV cache; when a later query needs
    the room, llama.cpp gets them back instead of failing."""
    backend = LlamaCppBackend(default_model_path(), n_ctx=256)
    model = PinnedModel(backend)
    try:
        lmq.run_sync('"Story:[X]" where len(TOKENS(X)) == 50', model=model, decoder="sample(n=4, seed=1)")
        assert sum(len(t) for t in backend._kept.values()) > 150
        other = "A completely different prompt about the weather in the mountains today. " * 6
        results = lmq.run_sync('"{other}[X]" where len(TOKENS(X)) == 50', other=other, model=model,
                               decoder="sample(n=2, seed=1)")
        assert [len(r.tokens["X"]) for r in results] == [50, 50]
    finally:
        backend.close()


def test_best_k_returns_k_sorted_results():
    results = lmq.run_sync(r'"Q: Name a fruit.\nA:[X]" where len(TOKENS(X)) < 4', decoder="best_k(k=2)")
    assert 1 <= len(results) <= 2
    assert [r.logprob for r in results] == sorted((r.logprob for r in results), reverse=True)


def test_draws_made_by_the_scheduler_equal_each_branch_drawing_alone(monkeypatch):
    """sample(n) branches without a mask have their next token drawn by the scheduler on
    the step's rows: the same tokens and scores as each branch drawing in its own task."""
    from lmq.runtime import branching
    query = r'"Q: Name a fruit.\nA:[X]" where len(TOKENS(X)) == 6'

    def run(mode):
        with monkeypatch.context() as patch:
            if mode == "task":
                patch.setattr(branching.SampleDecoder, "_draw_ahead", lambda *args: None)
            backend = LlamaCppBackend(default_model_path(), n_ctx=512, flash_attn=False)
            try:
                results = lmq.run_sync(query, model=PinnedModel(backend), decoder="sample(n=5, seed=7)")
            finally:
                backend.close()
        return [(r.tokens["X"], round(r.logprob, 4)) for r in results]

    alone = run("task")
    assert len({tuple(tokens) for tokens, _ in alone}) > 1           # the branches differ
    assert run("scheduler") == alone


def test_steps_launched_ahead_give_the_same_samples(monkeypatch):
    """With an engine that decodes asynchronously (layers on a GPU) the scheduler starts
    each step of sample(n) before the branches take their drawn tokens; forcing that on
    the CPU gives exactly the samples of the plain step loop, branches ending on a stop
    phrase (their launched token dropped) included."""
    import lmq.runtime.scheduler as scheduler
    launches = []

    class CountedStep(scheduler.LaunchedStep):
        def __init__(self, read):
            super().__init__(read)
            launches.append(self)

    monkeypatch.setattr(scheduler, "LaunchedStep", CountedStep)
    query = (r'"Q: Name a fruit.\nA:[X]\nQ: And a colour?\nA:[Y]" '
             r'where STOPS_AT(X, " ") and len(TOKENS(X)) < 10 and len(TOKENS(Y)) == 6')

    def run(launch: bool):
        backend = LlamaCppBackend(default_model_path(), n_ctx=512)
        backend.decodes_async = launch
        try:
            results = lmq.run_sync(query, model=PinnedModel(backend), decoder="sample(n=4, seed=3)")
            return [(r.tokens, r.prompt, r.logprob) for r in results], backend.evaluated_tokens
        finally:
            backend.close()

    plain, plain_evaluated = run(False)
    assert not launches
    ahead, ahead_evaluated = run(True)
    assert launches
    assert [r[:2] for r in ahead] == [r[:2] for r in plain]
    assert [r[2] for r in ahead] == pytest.approx([r[2] for r in plain], abs=1e-4)
    stopped = [tokens for tokens, _, _ in plain if len(tokens["X"]) < 9]
    assert stopped                          # some branch ended X on its stop phrase
    # a launched token dropped is one decode more per branch that stopped, at most
    assert plain_evaluated <= ahead_evaluated <= plain_evaluated + len(stopped)


THREADED = r'"Q: What is the capital of {c}?\nA:[A]" where STOPS_AT(A, ".") and len(TOKENS(A)) < 12'
COUNTRIES = ["France", "Germany", "Italy", "Spain"]


def test_queries_on_many_threads_share_a_model_and_get_their_own_results():
    """Synchronous queries from several threads on one in-process model (a threaded web
    server's workers): each gets what it gets alone, never rows another thread's decode
    rewrote."""
    model = lmq.model(None, n_ctx=1024)
    alone = [lmq.run_sync(THREADED, model=model, c=c).variables["A"] for c in COUNTRIES]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: lmq.run_sync(THREADED, model=model, c=c).variables["A"],
                                 COUNTRIES * 8))
    assert together == alone * 8


def test_a_loop_waiting_for_a_model_held_elsewhere_goes_on_running():
    """While another event loop holds the model, a query waits for it off its own loop
    (the loop's other tasks run), and runs once the model is given back or its holder's
    loop is closed."""
    model = lmq.model(None, n_ctx=1024)
    expected = lmq.run_sync(THREADED, model=model, c="France").variables["A"]
    lease = _lease(model.backend())

    async def main(release):
        holder = asyncio.new_event_loop()
        assert lease.take(holder)
        query = asyncio.ensure_future(lmq.run(THREADED, model=model, c="France"))
        ticks = 0
        for _ in range(20):
            await asyncio.sleep(0.01)
            ticks += 1
        assert not query.done() and ticks == 20
        release(holder)
        return (await query).variables["A"]

    assert asyncio.run(main(lease.give_back)) == expected
    assert asyncio.run(main(lambda holder: holder.close())) == expected


def test_finished_runs_leave_nothing_of_their_event_loop():
    """Each run_sync is an event loop of its own: the model's per-loop state goes with it."""
    model = lmq.model(None, n_ctx=1024)
    loops = []

    async def run():
        loops.append(weakref.ref(asyncio.get_running_loop()))
        return await lmq.run(THREADED, model=model, c="Italy")

    for _ in range(3):
        asyncio.run(run())
    gc.collect()
    assert [loop() for loop in loops] == [None, None, None]
