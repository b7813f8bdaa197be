"""Every decoder, `distribution`, `model.score` and `model.generate` through a real
`lmq serve-model` subprocess give what they give in process: one-branch argmax and sample
holes are decoded whole on the server (a sampler's state travels with each hole); beam,
best_k, n > 1, distribution and score run here on rows of sequences held on the server
(LOGITS), in the very batches the in-process scheduler forms.

llama.cpp's rows depend, beyond the last bits, on the cache history (where cells lie, in
what batches a reused prefix was computed), so each server is paired with a fresh
in-process model of the same settings (n_ctx, 16 sequences, flash attention off) given
the same work in the same order: the server then mirrors the in-process cache history
(held slots in llama.cpp's order) and results, tokens and scores agree to float rounding.
One pair serves only the rows path, one only whole holes (whose server streams fill the
cache differently from in-process lanes), and the seeded-sampling checks run there too.
"""

import json
import time

import numpy as np
import pytest

from conftest import PinnedModel

import lmq
from lmq.backends import default_model_path
from lmq.backends.llama_cpp import LlamaCppBackend
from lmq.runtime.sampling import make_sampler
from lmtp_harness import RawClient, ServerProcess

pytestmark = pytest.mark.model

PATH = default_model_path()
MODEL = f"llama.cpp:{PATH}"
SETTINGS = {"n_ctx": 1024, "flash_attn": False}

QUERIES = [
    '"Q: Name a fruit.\\nA:[A]" where STOPS_AT(A, "\\n") and len(TOKENS(A)) < 8',
    # text scored between holes (beam), a list hole, a number hole
    '"Q: Name a colour.\\nA:[A]\\nQ: And a number?\\nA:[B]" where STOPS_AT(A, "\\n") and '
    'len(TOKENS(A)) < 6 and INT(B) and len(TOKENS(B)) < 4',
    '"My favourite colour is[C] because[R]" where C in [" red", " green", " dark blue"] and '
    'len(TOKENS(R)) < 5',
    'for i in range(2):\n    "Item {i}:[ITEM]\\n" where STOPS_BEFORE(ITEM, "\\n") and len(TOKENS(ITEM)) < 5',
]
#: decoded here on rows of sequences held on the server, in the in-process batches
SEARCHES = [(QUERIES[1], "beam(n=3)"), (QUERIES[2], "best_k(k=2)"), (QUERIES[3], "argmax(n=2)"),
            (QUERIES[2], "sample(n=3, seed=11, top_k=40)")]
#: one branch: each hole decoded whole on the server
WHOLE_HOLES = [(QUERIES[0], "argmax"), (QUERIES[3], "argmax"),
               (QUERIES[1], "sample(temperature=0.8, seed=7)"), (QUERIES[2], "sample(seed=8)")]


class Pair:
    """A fresh server and a fresh in-process model with the same settings."""

    def __init__(self):
        self.server = ServerProcess(MODEL, "--slots", "16", *(f"--{k}={v}" for k, v in SETTINGS.items()))
        self.remote = lmq.model(MODEL, endpoint=self.server.url.removeprefix("ws://").rstrip("/"))
        self.local = PinnedModel(LlamaCppBackend(PATH, **SETTINGS))     # not the cached one

    def both(self, run):
        """`run(model)` in process, then through the server."""
        return run(self.local), run(self.remote)

    def close(self):
        self.server.kill()
        self.local.backend().close()


@pytest.fixture(scope="module")
def searches():
    """Only rows-path work (LOGITS): the server's history mirrors the in-process one."""
    pair = Pair()
    yield pair
    pair.close()


@pytest.fixture(scope="module")
def holes():
    pair = Pair()
    yield pair
    pair.close()


def listed(result) -> list:
    return result if isinstance(result, list) else [result]


@pytest.mark.parametrize("query,decoder", SEARCHES)
def test_branching_decoders_give_the_in_process_results_and_scores(query, decoder, searches):
    here, there = searches.both(lambda model: listed(lmq.run_sync(query, model=model, decoder=decoder)))
    assert [r.variables for r in there] == [r.variables for r in here]
    assert [r.tokens for r in there] == [r.tokens for r in here]
    assert [r.logprob for r in there] == pytest.approx([r.logprob for r in here], abs=1e-4)
    if decoder.startswith("sample"):
        assert len({repr(r.tokens) for r in here}) > 1        # the branches drew differently


@pytest.mark.parametrize("norm", ["sum", "mean"])
def test_distribution_equals_in_process(norm, searches):
    query = (f'argmax(distribution_norm="{norm}") "Review: cold food, rude waiter.\\nSentiment:[CLS]" '
             'distribution CLS in [" positive", " negative", " mixed feelings"]')
    here, there = searches.both(lambda model: lmq.run_sync(query, model=model))
    assert there.variables["CLS"] == here.variables["CLS"]
    assert [v for v, _ in there.variables["P(CLS)"]] == [v for v, _ in here.variables["P(CLS)"]]
    assert [p for _, p in there.variables["log P(CLS)"]] == \
        pytest.approx([p for _, p in here.variables["log P(CLS)"]], abs=1e-5)


def test_score_equals_in_process(searches):
    values = [" Paris", " London", " the city of light", [12, 345, 6789]]
    for prompt in ("The capital of France is", [1, 504, 3575, 282, 4649, 314]):
        here, there = searches.both(lambda model: model.score_sync(prompt, values))
        assert there.tokens == here.tokens
        for mine, theirs in zip(there.token_logprobs, here.token_logprobs):
            assert mine == pytest.approx(theirs, abs=1e-5)
        assert there.argmax() == here.argmax()


@pytest.mark.parametrize("decoder", ["beam", "sample"])
def test_generate_with_branches_equals_in_process(decoder, searches):
    here, there = searches.both(lambda model: model.generate_sync("Once upon a time", max_tokens=12,
                                                                  decoder=decoder, n=2, seed=1))
    assert there == here and len(here) == 2


@pytest.mark.parametrize("query,decoder", WHOLE_HOLES)
def test_whole_holes_give_the_in_process_results(query, decoder, holes):
    """Several holes of a sampled query draw from one random stream, as in process."""
    here, there = holes.both(lambda model: lmq.run_sync(query, model=model, decoder=decoder))
    assert there.variables == here.variables
    assert there.tokens == here.tokens
    assert there.logprob == pytest.approx(here.logprob, abs=1e-4)


@pytest.mark.parametrize("decoder,kwargs", [("argmax", {}), ("sample", {"seed": 5})])
def test_generate_equals_in_process(decoder, kwargs, holes):
    here, there = holes.both(lambda model: model.generate_sync("Once upon a time", max_tokens=12,
                                                               decoder=decoder, **kwargs))
    assert there == here


def model_info(url: str) -> dict:
    client = RawClient(url)
    try:
        client.send("MODEL_INFO", {"model": MODEL, "stream_id": 0})
        return client.frame()[1][0]["model_info"]
    finally:
        client.close()


def logits(client: RawClient, stream_id: int, **fields):
    """One raw LOGITS request: its rows (an array) or its error element."""
    client.send("LOGITS", {"model": MODEL, "stream_id": stream_id, **fields})
    answer = client.ws.recv(timeout=60)
    if isinstance(answer, bytes):
        head, _, body = answer.partition(b"\n")
        header = json.loads(head.removeprefix(b"ROWS "))
        assert header["stream_id"] == stream_id
        return np.frombuffer(body, dtype="<f4").reshape(header["rows"], header["width"])
    [element] = json.loads(answer.partition(" ")[2])
    assert element["stream_id"] == stream_id
    return element


def test_logits_requests_fork_append_and_release_held_sequences(holes):
    """The raw extension: a reset step gives the in-process row, a fork shares the cells,
    append steps of two sequences run in one step, a release and a disconnect give the
    slots back; bad requests are answers on their stream and the connection lives on."""
    prompt = [1, 504, 3575, 282, 4649, 314]
    server, backend = holes.server, holes.local.backend()
    expected = backend.sequence()
    try:
        first = np.array(expected.logits(prompt))
        after = np.array(expected.advance(7))
    finally:
        expected.release()
    client = RawClient(server.url)
    try:
        [row] = logits(client, 1, steps=[{"sequence": 0, "tokens": prompt, "reset": True}])
        assert np.allclose(row, first, atol=1e-3)
        rows = logits(client, 2, fork=[[0, 1]], steps=[{"sequence": 0, "tokens": [7]},
                                                      {"sequence": 1, "tokens": [7]}])
        assert rows.shape == (2, backend.vocabulary.size)
        assert np.allclose(rows[0], after, atol=1e-3) and np.allclose(rows[1], after, atol=1e-3)
        assert model_info(server.url)["held_sequences"] == 2
        assert "no sequence 5" in logits(client, 3, steps=[{"sequence": 5, "tokens": [7]}])["error"]
        assert "out of range" in logits(client, 4, steps=[{"sequence": 0, "tokens": [10 ** 6]}])["error"]
        assert "one step" in logits(client, 5, steps=[{"sequence": 0, "tokens": [7]},
                                                       {"sequence": 0, "tokens": [8]}])["error"]
        assert logits(client, 6, release=[1]).shape[0] == 0
        assert model_info(server.url)["held_sequences"] == 1
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while model_info(server.url)["held_sequences"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model_info(server.url)["held_sequences"] == 0


def test_sampler_state_goes_on_where_it_stopped_and_bad_states_are_answers(holes):
    """A hole's returned state, sent with the next hole, continues the random stream: two
    holes of one draw each equal one hole of two draws; a malformed state is an error
    answer on its stream."""
    program = {"grammar": None, "language": ["regex", "[a-z]+"], "min_tokens": 0, "max_tokens": 1,
               "stops": []}
    prompt = [1, 504, 3575, 282, 4649, 314]
    start = make_sampler({"temperature": 1.0}, 3).state()
    client = RawClient(holes.server.url)
    try:
        def hole(stream_id, state, tokens, context):
            elements = client.generate(MODEL, context, stream_id=stream_id, temperature=1.0,
                                       constraint={**program, "max_tokens": tokens},
                                       sampler_state=state)
            return [e["token"] for e in elements], elements[-1]["hole"]["sampler_state"]
        first, state = hole(1, start, 1, prompt)
        second, after = hole(2, state, 1, prompt + first)
        both, after_both = hole(3, start, 2, prompt)
        assert first + second == both and after == after_both and after != start
        for stream_id, bad in enumerate([{"rng": 5, "mu": 1.0}, {"rng": start["rng"]},
                                         {**start, "mu": "x"}, [1, 2]], start=4):
            [element] = client.generate(MODEL, prompt, stream_id=stream_id, temperature=1.0,
                                        constraint=program, sampler_state=bad)
            assert "sampler_state" in element["error"]
    finally:
        client.close()
