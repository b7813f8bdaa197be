"""Continuous batching in a real `lmq serve-model` subprocess: holes whose budget is the
whole context decode together (MODEL_INFO reports the batch width) with in-process
results, streams that outgrow the shared cache are preempted and still finish, and one
connection's many streams do not make another connection wait behind all of them.

Exact results after a preemption are checked in test_serve_scheduler.py on a backend whose
logits depend on the tokens alone: llama.cpp's rows also depend (in the last bits, enough
to flip a close greedy choice) on where a sequence's cells lie in the shared cache, which
changes whenever cells are freed and reused while others decode.
"""

import multiprocessing
import threading
import time

import pytest

import lmq
from lmq.backends import default_model_path
from lmtp_harness import RawClient, ServerProcess

pytestmark = pytest.mark.model

PATH = default_model_path()
MODEL = f"llama.cpp:{PATH}"
CLIENTS = 8
HOLE_TOKENS = 40
PROMPT = [1, 4093, 42, 1288, 28, 827, 28, 1041]      # any 8 ids of the vocabulary
#: 8 prompts of 8 tokens and 8 × 40 generated tokens need 384 cells: the streams must be
#: preempted to finish, though all 8 are admitted at once (prompt + growth reserve fit)
SMALL_CONTEXT = 256


def query(i: int) -> str:
    return f'"Story {i}: Once upon a time[X]" where len(TOKENS(X)) == {HOLE_TOKENS}'


@pytest.fixture(scope="module")
def server():
    process = ServerProcess(MODEL, "--n_ctx", "1024", "--slots", str(CLIENTS), "--max-streams", "256")
    yield process
    process.kill()


@pytest.fixture(scope="module")
def small_server():
    process = ServerProcess(MODEL, "--n_ctx", str(SMALL_CONTEXT), "--slots", str(CLIENTS))
    yield process
    process.kill()


def model_info(url: str) -> dict:
    client = RawClient(url)
    try:
        client.send("MODEL_INFO", {"model": MODEL, "stream_id": 0})
        _, [element] = client.frame()
        return element["model_info"]
    finally:
        client.close()


def _client_setup(endpoint: str) -> None:
    """A client process: its model (MODEL_INFO and the tokenizer, read once)."""
    global _remote
    _remote = lmq.model(MODEL, endpoint=endpoint)
    _remote.backend()


def _client_query(i: int) -> dict:
    return lmq.run_sync(query(i), model=_remote).tokens


def test_concurrent_clients_decode_together_with_in_process_results(server):
    """8 client processes each run a hole whose budget is the whole context: the server
    decodes them 8 wide and every result is the in-process one."""
    endpoint = server.url.removeprefix("ws://").rstrip("/")
    with multiprocessing.get_context("spawn").Pool(CLIENTS, _client_setup, (endpoint,)) as pool:
        results = pool.map(_client_query, range(CLIENTS), chunksize=1)
    info = model_info(server.url)
    assert info["max_batch_width"] >= CLIENTS
    assert info["active_streams"] == 0 and info["waiting_streams"] == 0

    local = lmq.model(None, n_ctx=1024)
    for i, tokens in enumerate(results):
        assert len(tokens["X"]) == HOLE_TOKENS
        assert tokens == lmq.run_sync(query(i), model=local).tokens, i


def test_sixteen_client_processes_decode_at_least_eight_wide():
    """16 client processes against a fresh server of 8 slots: its MODEL_INFO reports steps
    8 streams wide (the streams of a second wave reuse cells in another layout, so their
    greedy values may differ from in process in near ties: equality is the test above's)."""
    process = ServerProcess(MODEL, "--n_ctx", "1024", "--slots", str(CLIENTS))
    try:
        endpoint = process.url.removeprefix("ws://").rstrip("/")
        assert model_info(process.url)["max_batch_width"] == 0
        clients = 2 * CLIENTS
        with multiprocessing.get_context("spawn").Pool(clients, _client_setup, (endpoint,)) as pool:
            results = pool.map(_client_query, range(clients), chunksize=1)
        info = model_info(process.url)
        assert info["max_batch_width"] >= CLIENTS
        assert all(len(tokens["X"]) == HOLE_TOKENS for tokens in results) and len(results) == clients
    finally:
        process.kill()


def test_streams_outgrowing_the_cache_are_preempted_and_finish(small_server):
    """8 connections' streams need more cells than the cache has: the newest are preempted,
    resumed later, and every stream still gets all its tokens."""
    results, errors = {}, []

    def client(i: int) -> None:
        connection = RawClient(small_server.url)
        try:
            results[i] = connection.generate(MODEL, PROMPT[:7] + [100 + i], max_tokens=HOLE_TOKENS)
        except Exception as e:
            errors.append(e)
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    info = model_info(small_server.url)
    assert info["context_size"] == SMALL_CONTEXT
    assert info["preemptions"] >= 1 and info["max_batch_width"] == CLIENTS
    for elements in results.values():
        assert [e.get("error") for e in elements] == [None] * HOLE_TOKENS
        assert elements[-1]["finish_reason"] == "length"


def test_a_connection_with_many_streams_does_not_hold_up_another(server):
    """One connection queues 256 streams (32 rounds of the 8 slots); another connection's
    single stream is admitted in the next round, not after all 256."""
    greedy = RawClient(server.url)
    other = RawClient(server.url)
    try:
        prompt = PROMPT
        for stream_id in range(1, 257):
            greedy.send("GENERATE", {"model": MODEL, "prompt": prompt, "stream_id": stream_id,
                                     "max_tokens": 24, "temperature": 0})
        greedy.frame()                               # its first streams are decoding
        started = time.monotonic()
        elements = other.generate(MODEL, prompt, max_tokens=4, temperature=0)
        seconds = time.monotonic() - started
        assert elements[-1]["finish_reason"] == "length" and len(elements) == 4
        other.send("MODEL_INFO", {"model": MODEL, "stream_id": 0})
        _, [element] = other.frame()
        assert element["model_info"]["waiting_streams"] >= 200   # most of the 256 still queued
        assert seconds < 10, seconds
    finally:
        greedy.close()
        other.close()
