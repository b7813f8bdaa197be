"""Queries on a model served by a real `lmq serve-model` subprocess, through the LMTP
client backend: the same results as the same queries in process."""

import pytest

import lmq
from lmq.backends import default_model_path
from lmq.runtime.query import run_sync_coroutine
from lmtp_harness import ServerProcess

pytestmark = pytest.mark.model

PATH = default_model_path()

QUERIES = [
    '"Q: What is the capital of France?\\nA:[A]" where STOPS_AT(A, ".") and len(TOKENS(A)) < 20',
    '"Count: one, two, three,[X]" where STOPS_BEFORE(X, ",") and len(TOKENS(X)) < 10',
    '"Say hello:[X]" where len(TOKENS(X)) == 4',
    '"Q: Name a fruit.\\nA:[A]\\nQ: Name a colour.\\nA:[B]" where STOPS_AT(A, "\\n") and '
    'STOPS_AT(B, "\\n") and len(TOKENS(A)) < 8 and len(TOKENS(B)) < 8',
    'for i in range(2):\n    "Item {i}:[ITEM]\\n" where STOPS_BEFORE(ITEM, "\\n") and len(TOKENS(ITEM)) < 5',
    '"{:user}Name a planet.{:assistant}[P]" where len(TOKENS(P)) < 6',
    '"A number between 1 and 100:[N]" where INT(N) and len(TOKENS(N)) < 4',
    '"My favourite colour is[C]" where C in [" red", " green", " dark blue"]',
    '"Licence plate:[X]" where REGEX(X, "[A-Z]{3}-[0-9]{2}")',
    '"Tokens:[X]" where len(TOKENS(X)) < 5 and len(TOKENS(X)) != 2 and STOPS_AT(X, " ")',
    '"[A]" where A == "1"',                                    # no text before the first hole
    '"[X], then[Y]" where len(TOKENS(X)) < 4 and Y in [" yes", " no"]',
]


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(f"llama.cpp:{PATH}", "--n_ctx", "1024", "--slots", "4")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def remote(server):
    endpoint = server.url.removeprefix("ws://").rstrip("/")
    return lmq.model(f"llama.cpp:{PATH}", endpoint=endpoint)


@pytest.fixture(scope="module")
def local():
    return lmq.model(None, n_ctx=1024)


@pytest.mark.parametrize("query", QUERIES)
def test_queries_give_the_in_process_argmax_results(query, remote, local):
    here = lmq.run_sync(query, model=local)
    there = lmq.run_sync(query, model=remote)
    assert there.variables == here.variables
    assert there.tokens == here.tokens
    assert there.prompt == here.prompt
    assert there.logprob == pytest.approx(here.logprob, abs=1e-4)


@pytest.mark.parametrize("query", ['"Say something:[A]" where len(TOKENS(A)) < 6',
                                   '"[A]" where len(TOKENS(A)) < 6'])
def test_seeded_sampling_draws_what_it_draws_in_process(query, remote, local):
    decoder = "sample(temperature=0.8, top_k=40, seed=3)"
    here = lmq.run_sync(query, model=local, decoder=decoder)
    there = lmq.run_sync(query, model=remote, decoder=decoder)
    assert there.tokens == here.tokens


def test_lmtp_url_ids_and_concurrent_queries(server, local):
    model = lmq.model(server.url.replace("ws://", "lmtp://") + f"llama.cpp:{PATH}")

    @lmq.query
    async def fruit(n):
        '''lmq
        "Fruit number {n}:[F]" where STOPS_BEFORE(F, "\\n") and len(TOKENS(F)) < 5
        return F
        '''

    async def both():
        import asyncio
        return await asyncio.gather(fruit(1, model=model), fruit(2, model=model))

    expected = [run_sync_coroutine(fruit(n, model=local)) for n in (1, 2)]
    assert run_sync_coroutine(both()) == expected


def test_context_limit_on_the_server_is_a_context_limit_error(remote, local):
    query = '"Tell a long story:[S]"'
    errors = []
    for model in (local, remote):
        with pytest.raises(lmq.ContextLimitError) as error:
            lmq.run_sync(query, model=model, decoder="argmax(max_len=12)")
        errors.append(error.value.result.variables["S"])
    assert errors[0] == errors[1]


def test_unsupported_arguments_and_servers_are_clear_errors():
    with pytest.raises(lmq.QueryArgumentError, match="n_ctx"):
        lmq.run_sync('"Hi[X]"', model=lmq.model(f"llama.cpp:{PATH}", n_ctx=5))
    with pytest.raises(lmq.ModelError, match="cannot reach"):
        lmq.run_sync('"Hi[X]"', model=lmq.model(f"llama.cpp:{PATH}", endpoint="127.0.0.1:9"))
    with pytest.raises(lmq.ModelError, match="lmtp://HOST:PORT/MODEL"):
        lmq.run_sync('"Hi[X]"', model="lmtp://127.0.0.1:9")


def test_connection_lost_mid_query_is_a_model_error():
    server = ServerProcess(f"llama.cpp:{PATH}", "--n_ctx", "512", "--slots", "1")
    try:
        endpoint = server.url.removeprefix("ws://").rstrip("/")
        query = lmq.query('"Write a long story about a dragon:[S]" where len(TOKENS(S)) < 400')
        texts = []

        def kill_on_first_token(text):       # the first call writes the prompt
            texts.append(text)
            if len(texts) == 2:
                server.kill()

        with pytest.raises(lmq.ModelError, match="connection to the LMTP server .* was lost"):
            run_sync_coroutine(query.run(model=lmq.model(f"llama.cpp:{PATH}", endpoint=endpoint),
                                         on_text=kill_on_first_token))
        assert len(texts) >= 2
    finally:
        server.kill()
