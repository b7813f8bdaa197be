"""Decoders with several results, batching and decorators on the random backend (many
seeds): result shapes, constraints on every branch, seeds, batching of branches and of
concurrent queries, shared-prompt evaluation, max_len, decorators."""

import asyncio
from pathlib import Path

import pytest

import lmq
from lmq.backends import default_model_path
from lmq.backends.random import RandomBackend

SEEDS = range(12)
TWO_HOLES = ('"Start:[X] then[Y]" where len(TOKENS(X)) < 5 and STOPS_AT(Y, "e") '
             'and len(TOKENS(Y)) < 12')


class CountingBackend(RandomBackend):
    """A random backend that records the size of every multi-sequence step."""

    def __init__(self, seed=0, **kwargs):
        super().__init__(default_model_path(), seed=seed, **kwargs)
        self.batch_sizes = []

    def advance_many(self, steps, rows=None):
        self.batch_sizes.append(len(steps))
        return super().advance_many(steps, rows)


@pytest.mark.parametrize("decoder,count", [("argmax", None), ("sample", None), ("argmax(n=3)", 3),
                                           ("sample(n=4)", 4), ("beam(n=3)", 3), ("beam", 2),
                                           ("best_k(k=3)", 3)])
def test_result_shapes_and_counts(decoder, count, random_model):
    for seed in SEEDS:
        result = lmq.run_sync(TWO_HOLES, model=random_model(seed), decoder=decoder)
        if count is None:
            assert isinstance(result, lmq.LMQResult)
            continue
        assert isinstance(result, list) and all(isinstance(r, lmq.LMQResult) for r in result)
        if decoder.startswith(("beam", "best_k")):
            assert 1 <= len(result) <= count
        else:
            assert len(result) == count


@pytest.mark.parametrize("decoder", ["sample(n=4)", "beam(n=3)", "best_k(k=3)", "sample(n=3, top_k=5)"])
def test_constraints_hold_on_every_branch(decoder, random_model):
    query = ('"Count:[N] words:[W]\\n" where INT(N) and len(TOKENS(N)) < 4 '
             'and STOPS_BEFORE(W, " a") and len(TOKENS(W)) < 10')
    for seed in SEEDS:
        for result in lmq.run_sync(query, model=random_model(seed, end_probability=0.2), decoder=decoder):
            n, w = result.variables["N"], result.variables["W"]
            assert isinstance(n, int), (seed, n)
            assert 1 <= len(result.tokens["N"]) <= 3
            assert " a" not in w and len(result.tokens["W"]) <= 9
            shown = result.prompt[len("Count:"):-len(f" words:{w}\n")]
            assert result.prompt.endswith(f" words:{w}\n") and int(shown) == n


def test_same_seed_same_samples_and_seeds_differ(random_model):
    def draws(seed):
        results = lmq.run_sync(TWO_HOLES, model=random_model(0), decoder=f"sample(n=3, seed={seed})")
        return [(r.variables["X"], r.variables["Y"]) for r in results]
    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    assert len(set(draws(5))) > 1, "the branches draw independently"


def test_beam_results_are_sorted_and_distinct(random_model):
    for seed in SEEDS:
        results = lmq.run_sync(TWO_HOLES, model=random_model(seed), decoder="beam(n=4)")
        scores = [r.logprob for r in results]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(sorted(r.variables.items())) for r in results}) == len(results)


def test_branches_decode_in_one_batch_and_share_the_prompt(pinned_model):
    backend = CountingBackend(seed=1)
    prompt = "A rather long shared prompt that every branch needs: "
    query = '"{prompt}[X]" where len(TOKENS(X)) == 6'
    results = lmq.run_sync(query, prompt=prompt, model=pinned_model(backend), decoder="sample(n=5)")
    assert len(results) == 5
    assert backend.batch_sizes == [5] * 5               # 6 tokens: 5 advances, all 5 branches each
    prompt_tokens = 1 + len(backend.tokenize(prompt)) if backend.vocabulary.add_bos else len(backend.tokenize(prompt))
    assert backend.evaluated_tokens == prompt_tokens + 5 * 5     # the prompt once, not 5 times


def test_concurrent_async_queries_share_batches(pinned_model):
    backend = CountingBackend(seed=2)
    model = pinned_model(backend)

    @lmq.query
    async def ask(topic):
        '''lmq
        "Topic {topic}:[X]" where len(TOKENS(X)) == 8
        return X
        '''

    async def main():
        return await asyncio.gather(*(ask(str(i), model=model) for i in range(8)))

    values = asyncio.run(main())
    assert len(values) == 8
    assert max(backend.batch_sizes) == 8
    assert len(backend.batch_sizes) == 7                # 8 tokens each: 7 steps carry all 8 queries


def test_max_len_raises_context_limit_with_partial_results(random_model):
    query = '"Start:[X]" where len(TOKENS(X)) < 50'
    with pytest.raises(lmq.ContextLimitError) as info:
        lmq.run_sync(query, model=random_model(1), decoder="argmax(max_len=8)")
    partial = info.value.result
    assert isinstance(partial, lmq.LMQResult) and partial.variables["X"] and partial.tokens["X"]
    with pytest.raises(lmq.ContextLimitError) as info:
        lmq.run_sync(query, model=random_model(1), decoder="sample(n=3, max_len=8)")
    assert len(info.value.result) == 3 and all(r.tokens.get("X") for r in info.value.result)


@pytest.mark.parametrize("decoder,culprit", [("beam(n=2, width=3)", "width"),
                                             ("sample(temprature=0.5)", "temprature"),
                                             ("sample(n=0)", "n"), ("sample(top_p=2)", "top_p"),
                                             ("best_k(k=2, nn=1)", "nn")])
def test_bad_decoder_arguments_are_errors_naming_them(decoder, culprit, random_model):
    with pytest.raises(lmq.QueryArgumentError, match=culprit):
        lmq.run_sync(TWO_HOLES, model=random_model(), decoder=decoder)


#: every knob the README's Decoders paragraph documents, with a valid non-default value
DOCUMENTED_KNOBS = {"temperature": 0.7, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "typical_p": 0.95,
                    "repeat_penalty": 1.1, "repetition_penalty": 1.2, "penalty_last_n": 8,
                    "frequency_penalty": 0.3, "presence_penalty": 0.2, "mirostat": 2,
                    "mirostat_tau": 4.0, "mirostat_eta": 0.2, "seed": 3, "max_len": 4096, "n": 2}


def test_documented_knobs_are_every_decoder_argument_and_in_the_readme():
    from lmq.runtime.decoders import COMMON_ARGUMENTS
    from lmq.backends.sampling_settings import KNOB_ALIASES
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    decoders_paragraph = readme[readme.index("**Decoders**"):].split("\n\n")[0]
    assert set(DOCUMENTED_KNOBS) == COMMON_ARGUMENTS | set(KNOB_ALIASES)
    assert [k for k in DOCUMENTED_KNOBS if k not in decoders_paragraph] == []


@pytest.mark.parametrize("knob", sorted(DOCUMENTED_KNOBS))
@pytest.mark.parametrize("decoder", ["sample", "argmax", "beam"])
def test_every_documented_knob_is_accepted(decoder, knob, random_model):
    result = lmq.run_sync(TWO_HOLES, model=random_model(), decoder=f"{decoder}({knob}={DOCUMENTED_KNOBS[knob]!r})")
    results = result if isinstance(result, list) else [result]
    assert results and all(r.variables["X"] is not None for r in results)


@pytest.mark.parametrize("decoder", ["sample", "argmax", "beam"])
def test_an_unknown_knob_is_an_error_naming_it(decoder, random_model):
    with pytest.raises(lmq.QueryArgumentError, match=f"unknown argument of decoder {decoder}.*penalty_last_m"):
        lmq.run_sync(TWO_HOLES, model=random_model(), decoder=f"{decoder}(penalty_last_m=8)")


def test_repetition_penalty_alias_is_accepted(random_model):
    results = lmq.run_sync(TWO_HOLES, model=random_model(), decoder="sample(n=2, repetition_penalty=1.3)")
    assert len(results) == 2


def test_call_options_override_decorator_options_override_clause(random_model):
    @lmq.query(decoder="sample(n=3)")
    def query():
        '''lmq
        argmax(n=2)
            "Hi [X]" where len(TOKENS(X)) < 3
        '''
    assert len(query(model=random_model())) == 3
    assert len(query(model=random_model(), n=4)) == 4


# --- decorators ---------------------------------------------------------------------------------

def test_pre_decorator_supplies_a_value_without_generation(pinned_model):
    backend = CountingBackend()

    @lmq.pre
    def fixed(variable, context):
        return "given" if variable.name == "X" else variable

    result = lmq.run_sync('"A:[@fixed X] B:[@fixed Y]" where len(TOKENS(Y)) < 3', fixed=fixed,
                          model=pinned_model(backend))
    assert result.variables["X"] == "given" and "X" not in result.tokens
    assert result.prompt.startswith("A:given B:") and result.tokens["Y"]


def test_streaming_decorator_sees_each_partial_value(random_model):
    seen = []

    @lmq.streaming
    def watch(partial, context):
        seen.append((context.name, partial))

    for seed in SEEDS:
        seen.clear()
        result = lmq.run_sync('"A:[@watch X]" where len(TOKENS(X)) == 5', watch=watch, model=random_model(seed))
        partials = [p for _, p in seen]
        assert len(partials) == 5 and partials[-1] == result.variables["X"]
        assert all(b.startswith(a) or "\ufffd" in a for a, b in zip(partials, partials[1:]))


def test_three_argument_decorator_replaces_the_prompt_text(random_model):
    def as_words(value, prompt_value, context):
        return value.split(), f"<{len(value.split())} words>"

    def count(value):
        return len(value)

    result = lmq.run_sync('"A:[@count @as_words X] end"  where len(TOKENS(X)) < 6', as_words=as_words,
                          count=count, model=random_model(4))
    assert isinstance(result.variables["X"], int)
    assert result.prompt == f"A:<{result.variables['X']} words> end"


def test_decorator_with_a_wrong_signature_is_an_error(random_model):
    def two(a, b):
        return a

    with pytest.raises(lmq.QueryArgumentError, match="two"):
        lmq.run_sync('"A:[@two X]" where len(TOKENS(X)) < 3', two=two, model=random_model())
