"""Speculative evaluation (docs/architecture.md): forced text is evaluated with a guess of
the next choice, whose row is kept. The decoder's choices must not change: the same
values, tokens, log-probabilities and random draws with guesses on and off
(`LMQ_NO_SPECULATION=1`), a rejected guess gone from the cache, fewer evaluations."""

import io
import json

import numpy as np
import pytest
from conftest import PinnedModel

import lmq
from lmq.backends import default_model_path
from lmq.backends.llama_cpp import LlamaCppBackend
from lmq.backends.random import RandomBackend, RandomSequence

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"},
                         "city": {"enum": ["Paris", "London", "New York"]},
                         "occupation": {"type": "string", "maxLength": 12},
                         "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 10},
                                     "maxItems": 2}},
          "required": ["name", "age", "city", "occupation", "hobbies"]}
QUERIES = [
    ('"Describe a fictional person as a JSON object with name, age, city, occupation and '
     'hobbies.\\n[X]" where JSON(X, SCHEMA)', {"SCHEMA": SCHEMA}),
    ('"Say one sentence:[X]" where X in SENTENCES',
     {"SENTENCES": [" The old lighthouse keeper walked along the shore",
                    " The old lighthouse keeper rowed out to sea",
                    " A young fisherman walked along the shore"]}),
    ('"The vote:[X]" where REGEX(X, r" #[0-9]{2}: (approved|rejected) by the committee")', {}),
]
DECODERS = ["argmax", "sample(n=3, seed=7)"]


class PrefixKeyedBackend(RandomBackend):
    """Random rows that are a function of the tokens before them: runs that evaluate the
    same tokens see the same rows, whatever they guessed in between, and a guess left in
    a sequence would change every row after it. Counts the guesses made and dropped."""

    def __init__(self, seed: int = 0, speculates: bool = True):
        super().__init__(default_model_path(), seed=seed)
        self.seed = seed
        self.speculates = speculates
        self.truncated = 0
        self.guesses = 0

    def sequence(self) -> "KeyedSequence":
        return KeyedSequence(self)

    def _logits(self, tokens: list[int]) -> np.ndarray:
        self._row[:] = np.random.default_rng([self.seed, *tokens]).gumbel(size=self._row.shape[0])
        return self._row


class KeyedSequence(RandomSequence):
    def truncate(self, length: int) -> bool:
        self.backend.truncated += length < len(self.tokens)
        return super().truncate(length)

    def rows(self, tokens: list[int], count: int) -> list[np.ndarray]:
        assert self.backend.speculates, "rows of guesses asked from a backend that does not speculate"
        self.backend.guesses += count - 1
        return super().rows(tokens, count)

    def fork(self) -> "KeyedSequence":
        child = KeyedSequence(self.backend)
        child.tokens = list(self.tokens)
        return child


def run(backend, query: str, scope: dict, decoder: str, monkeypatch, speculate: bool):
    """The results of `query` and its trace's token events."""
    if speculate:
        monkeypatch.delenv("LMQ_NO_SPECULATION", raising=False)
    else:
        monkeypatch.setenv("LMQ_NO_SPECULATION", "1")
    trace = io.StringIO()
    result = lmq.run_sync(query, model=PinnedModel(backend), decoder=decoder, trace=trace, **scope)
    results = result if isinstance(result, list) else [result]
    events = [json.loads(line) for line in trace.getvalue().splitlines()]
    tokens = sorted((e["branch"], e["id"], e["forced"], e["allowed"], e["logprob"])
                    for e in events if e["event"] == "token")
    return [(r.variables, r.tokens, r.logprob) for r in results], tokens


@pytest.mark.parametrize("cheap", [True, False])
@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("query, scope", QUERIES)
def test_guesses_change_no_choice_and_leave_the_cache(query, scope, decoder, cheap, monkeypatch):
    """Exactly the same results and token events (log-probabilities and sampled draws
    included) with guesses on and off, on rows keyed by the tokens before them: a
    rejected guess left in a sequence would change every later row. Guessing every
    held-back token, some are wrong; guessing only those the mask allows alone (a JSON
    document's `"` after `",`), none."""
    guesses = rejected = 0
    for seed in range(3):
        off = PrefixKeyedBackend(seed)
        expected = run(off, query, scope, decoder, monkeypatch, speculate=False)
        assert off.guesses == off.truncated == 0
        on = PrefixKeyedBackend(seed)
        on.wrong_guesses_cheap = cheap
        assert run(on, query, scope, decoder, monkeypatch, speculate=True) == expected
        guesses, rejected = guesses + on.guesses, rejected + on.truncated
    assert guesses > 0 or not cheap and query != QUERIES[0][0]   # JSON has sure ones
    assert (rejected > 0) == cheap                  # wrong guesses were dropped


def test_a_backend_that_does_not_speculate_gets_no_guesses(monkeypatch):
    query, scope = QUERIES[0]
    backend = PrefixKeyedBackend(1, speculates=False)
    results = run(backend, query, scope, "sample(n=3, seed=7)", monkeypatch, speculate=True)
    assert results == run(PrefixKeyedBackend(1), query, scope, "sample(n=3, seed=7)", monkeypatch,
                          speculate=False)
    assert backend.truncated == 0


def test_a_guess_that_would_end_the_value_is_not_evaluated(pinned_model):
    backend = lmq.model("random", seed=2).backend()
    result = lmq.run_sync('"Pick:[X]" where X in [" yes"]', model=pinned_model(backend))
    context = backend.vocabulary.prompt_start + backend.tokenize("Pick:")
    assert result.variables["X"] == " yes"
    # the prompt and every token of the value but the last, and no guess after that
    assert backend.evaluated_tokens == len(context) + len(result.tokens["X"]) - 1


def run_smollm2(query: str, scope: dict, decoder: str, monkeypatch, speculate: bool,
                wrong_guesses_cheap: bool | None = None):
    """`run` on a fresh SmolLM2 context (the same cache history for both modes), the
    llama_decode calls it made and the tokens it evaluated."""
    backend = LlamaCppBackend(default_model_path(), n_ctx=1024, flash_attn=False)
    if wrong_guesses_cheap is not None:
        backend.wrong_guesses_cheap = wrong_guesses_cheap
    try:
        return (run(backend, query, scope, decoder, monkeypatch, speculate), backend.decodes,
                backend.evaluated_tokens)
    finally:
        backend.close()


def lane_steps(monkeypatch) -> list[int]:
    """A counter of sequence evaluations (one per sequence in each batch step)."""
    steps = [0]
    advance_many = LlamaCppBackend.advance_many

    def counting(self, batch, rows=None):
        steps[0] += len(batch)
        return advance_many(self, batch, rows)
    monkeypatch.setattr(LlamaCppBackend, "advance_many", counting)
    return steps


@pytest.mark.model
@pytest.mark.parametrize("query, scope, cheap", [(*QUERIES[0], False), (*QUERIES[0], True),
                                                 (*QUERIES[1], True), (*QUERIES[2], True)])
def test_smollm2_decodes_the_same_in_fewer_llama_decodes(query, scope, cheap, monkeypatch):
    """On the real model: the same values, tokens and token events in fewer llama_decode
    calls, guessing every held-back token (as on a GPU, `cheap`) or only those the mask
    allows alone (on a CPU: then no guess is wrong, and no token is evaluated in vain).
    Log-probabilities agree to llama.cpp's rounding only: its CPU kernels give logits
    that depend on the shapes of the batches that filled the KV cache (up to tenths of a
    nat on SmolLM2's Q4_1 weights, as between any two batchings)."""
    (off, off_tokens), off_decodes, off_evaluated = run_smollm2(query, scope, "argmax", monkeypatch,
                                                                False, cheap)
    (on, on_tokens), on_decodes, on_evaluated = run_smollm2(query, scope, "argmax", monkeypatch,
                                                            True, cheap)
    assert [(v, t) for v, t, _ in on] == [(v, t) for v, t, _ in off]
    assert [e[:4] for e in on_tokens] == [e[:4] for e in off_tokens]
    for (_, tokens, on_logprob), (*_, off_logprob) in zip(on, off):
        assert on_logprob == pytest.approx(off_logprob, abs=0.02 * len(tokens["X"]))
    assert on_decodes <= off_decodes
    if not cheap:
        assert on_evaluated == off_evaluated
    if query == QUERIES[0][0]:          # a JSON document's held-back tokens are guessed
        assert on_decodes <= off_decodes - (4 if cheap else 1)


@pytest.mark.model
def test_smollm2_branches_speculate_in_one_batch(monkeypatch):
    """sample(n=3) on the real model, every held-back token guessed: every branch's value
    is a document of the schema, in fewer evaluations of a branch (the branches share
    each batch, so a step is saved only where all of them guessed right). Seeded draws are the same as without guesses on rows that are (see the
    test on keyed rows); on llama.cpp a draw near a boundary may follow the rounding of
    other batch shapes."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "city": SCHEMA["properties"]["city"]},
              "required": ["name", "city"]}
    query, scope = '"A person as JSON:\\n[X]" where JSON(X, SCHEMA)', {"SCHEMA": schema}
    steps = lane_steps(monkeypatch)
    (off, _), *_ = run_smollm2(query, scope, "sample(n=3, seed=7)", monkeypatch, False, True)
    off_steps, steps[0] = steps[0], 0
    (on, _), *_ = run_smollm2(query, scope, "sample(n=3, seed=7)", monkeypatch, True, True)
    assert len(on) == 3
    for variables, _, _ in on:
        assert set(variables["X"]) == {"name", "city"}
        assert variables["X"]["city"] in schema["properties"]["city"]["enum"]
    assert steps[0] < off_steps


@pytest.mark.model
def test_llama_cpp_keeps_the_rows_asked_for_each_sequence_of_a_batch():
    """One batch of two sequences, rows kept at the last 2 and 3 positions: each row is
    the row after its own prefix (computed alone for comparison; llama.cpp's rounding
    differs between batch shapes, a row of another context differs entirely)."""
    backend = LlamaCppBackend(default_model_path(), n_ctx=256)
    try:
        texts = ["The capital of France is Paris. The capital of Italy is",
                 "def add(a, b):\n    return a +"]
        prompts = [backend.tokenize(text) for text in texts]
        sequences = [backend.sequence() for _ in prompts]
        for sequence, prompt in zip(sequences, prompts):
            sequence.logits(prompt[:-4])
        rows = [[row.copy() for row in kept] for kept in backend.advance_many(
            [(s, p[-4:]) for s, p in zip(sequences, prompts)], [2, 3])]
        assert [len(kept) for kept in rows] == [2, 3]
        assert [s.tokens for s in sequences] == prompts
        reference = backend.sequence()
        for prompt, kept in zip(prompts, rows):
            for row, end in zip(kept, range(len(prompt) - len(kept) + 1, len(prompt) + 1)):
                alone = np.array(reference.logits(prompt[:end]))
                assert int(row.argmax()) == int(alone.argmax())
                assert np.corrcoef(row, alone)[0, 1] > 0.99
    finally:
        backend.close()


@pytest.mark.model
def test_short_runs_decode_a_token_at_a_time_where_the_engine_asks_for_it():
    """On a GPU a batch of a new shape costs more than its decode (llama.cpp captures a
    CUDA graph per shape), so one sequence's runs of up to `single_decode_run` tokens are
    decoded singly (forced here on the CPU): the same rows asked for, one decode per token;
    longer runs and several sequences stay one batch."""
    backend = LlamaCppBackend(default_model_path(), n_ctx=256)
    backend.single_decode_run = 4
    sizes = []
    decode = backend._decode_batch

    def recorded(ctx, batch):
        sizes.append(batch.n_tokens)
        return decode(ctx, batch)

    backend._decode_batch = recorded
    try:
        prompt = backend.tokenize("The capital of France is Paris. The capital of Italy is Rome.")
        sequence, reference = backend.sequence(), backend.sequence()
        sequence.logits(prompt[:-10])
        sizes.clear()
        kept = [row.copy() for row in backend.advance_many([(sequence, prompt[-10:-7])], [2])[0]]
        last = backend.advance_many([(sequence, prompt[-7:-5])])[0].copy()
        batched = backend.advance_many([(sequence, prompt[-5:])], [2])[0]
        assert sizes == [1, 1, 1, 1, 1, 5] and sequence.tokens == prompt
        assert len(kept) == 2 and len(batched) == 2
        for row, end in zip(kept + [last], (len(prompt) - 8, len(prompt) - 7, len(prompt) - 5)):
            alone = np.array(reference.logits(prompt[:end]))
            assert int(row.argmax()) == int(alone.argmax())
            assert np.corrcoef(row, alone)[0, 1] > 0.99

        sizes.clear()
        document = lmq.run_sync(QUERIES[0][0], model=PinnedModel(backend), **QUERIES[0][1])
        assert set(document.variables["X"]) == set(SCHEMA["properties"])
        assert sizes and not [n for n in sizes if 1 < n <= 4]
    finally:
        backend.close()
