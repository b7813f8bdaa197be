"""Queries on a real llama.cpp `llama-server` (SmolLM2, 127.0.0.1) through the
`llama-server:` backend: greedy values equal the in-process ones where the pushed-down
grammar is exact, the prompt prefix is evaluated once, what the engine cannot do is a
clear error, and a server that is down, slow or answering errors is a `ModelError`.

One server per test session (the `llama_server` fixture). Without a llama-server binary
the fixture runs the documented install (`lmq install-llama-server`: a build of a few
minutes, cached per machine), so CI runs these tests.
"""

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import lmq
from lmq.backends import default_model_path
from lmq.backends.remote_engine import pushed_grammar
from lmq.compiler.codegen import compile_query
from lmq.engines.binary import find_binary, install
from lmq.engines.process import LlamaServer, free_port
from lmq.errors import ConstraintViolation, ModelError
from lmq.runtime.hole import static_plan

pytestmark = [pytest.mark.model, pytest.mark.llama_server]

PATH = default_model_path()
ROOT = Path(__file__).resolve().parent.parent

#: greedy queries whose every constraint llama-server enforces exactly (grammar, stops, budget)
QUERIES = [
    '"Q: What is the capital of France?\\nA:[A]" where STOPS_AT(A, ".") and len(TOKENS(A)) < 20',
    '"Count: one, two, three,[X]" where STOPS_BEFORE(X, ",") and len(TOKENS(X)) < 10',
    '"Say hello:[X]" where len(TOKENS(X)) < 5',
    '"Q: Name a fruit.\\nA:[A]\\nQ: Name a colour.\\nA:[B]" where STOPS_AT(A, "\\n") and '
    'STOPS_AT(B, "\\n") and len(TOKENS(A)) < 8 and len(TOKENS(B)) < 8',
    '"{:user}Name a planet.{:assistant}[P]" where len(TOKENS(P)) < 6',
    '"A number between 1 and 100:[N]" where INT(N) and len(TOKENS(N)) < 4',
    '"My favourite colour is[C]" where C in [" red", " green", " dark blue"]',
    '"Licence plate:[X]" where REGEX(X, "[A-Z]{3}-[0-9]{2}")',
    '"The animal:[X]" where STOPS_BEFORE(X, ".") and REGEX(X, "[a-z ]+") and len(TOKENS(X)) < 12',
    '"Q: What colour is the sky on a clear day?\\nA: The sky is[W]" where len(W) < 6',
    '"[A]" where A == "1"',
    '"Yes or no?[X]" where X in [" yes", " no"] and len(TOKENS(X)) < 3',
    '"Answer in JSON:[X]" where JSON(X, {"type": "object", "properties": {"name": {"type": '
    '"string", "maxLength": 8}}, "required": ["name"], "additionalProperties": False})',
    '"Pick:[X]" where GRAMMAR(X, "root ::= \\" cat\\" | \\" dog\\" | \\" bird\\"")',
]


@pytest.fixture(scope="session")
def llama_server():
    """llama-server on SmolLM2 with 4 parallel slots (installed first if missing)."""
    binary = find_binary() or install()
    with LlamaServer(PATH, binary=binary, arguments=["-c", "4096", "--parallel", "4", "-t", "1",
                                                     "--kv-unified"]) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def remote(llama_server):
    return lmq.model(f"llama-server:{llama_server.url}")


@pytest.mark.parametrize("query", QUERIES)
def test_greedy_queries_give_the_in_process_values(query, remote):
    """Values, tokens and prompt as in process (`logprob` differs: the engine reports the
    model's unmasked log-probabilities)."""
    here, there = (lmq.run_sync(query, model=model) for model in (lmq.model(None, n_ctx=4096), remote))
    assert (there.variables, there.tokens, there.prompt) == (here.variables, here.tokens, here.prompt)


@pytest.mark.parametrize("query", QUERIES[:4] + QUERIES[5:8])
def test_the_openai_llama_server_dialect_gives_the_native_values(query, llama_server, remote):
    """`openai:URL/v1` in the llama-server dialect (`/v1/completions` with `grammar`)."""
    openai = lmq.model(f"openai:{llama_server.url}/v1", dialect="llama-server")
    native, there = (lmq.run_sync(query, model=model) for model in (remote, openai))
    assert (there.variables, there.tokens, there.prompt) == (native.variables, native.tokens, native.prompt)


def test_capital_example_on_the_cli(llama_server):
    def run(*model):
        done = subprocess.run([sys.executable, "-m", "lmq.cli", "run", str(ROOT / "examples" / "capital.lmq"),
                               "--json", *model], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["return"]

    assert run("--model", f"llama-server:{llama_server.url}") == run()


def test_several_holes_evaluate_the_prompt_prefix_once(remote):
    backend = remote.backend()
    prefix = "A list of the planets of the solar system, one per line, from the sun outwards: " * 6
    query = (f'"{prefix}1.[A]\\n2.[B]\\n3.[C]\\n" where STOPS_BEFORE(A, "\\n") and '
             'STOPS_BEFORE(B, "\\n") and STOPS_BEFORE(C, "\\n") and len(TOKENS(A)) < 6 and '
             'len(TOKENS(B)) < 6 and len(TOKENS(C)) < 6')
    prefix_tokens = len(backend.tokenize(prefix))
    before = backend.evaluated_tokens
    result = lmq.run_sync(query, model=remote)
    evaluated = backend.evaluated_tokens - before
    generated = sum(len(tokens) for tokens in result.tokens.values())
    assert prefix_tokens > 90
    # the prefix once, each hole's few new prompt tokens and its generated ones (+ an end each)
    assert evaluated < prefix_tokens + 3 * 8 + generated + 3, (evaluated, prefix_tokens)


def test_sample_n_runs_concurrently_and_keeps_constraints(remote):
    results = lmq.run_sync('"A colour:[C]" where C in [" red", " green", " blue", " black"]',
                           model=remote, decoder="sample(n=6, temperature=1.5, seed=3)")
    assert len(results) == 6
    assert all(r.variables["C"] in (" red", " green", " blue", " black") for r in results)
    again = lmq.run_sync('"A colour:[C]" where C in [" red", " green", " blue", " black"]',
                         model=remote, decoder="sample(n=6, temperature=1.5, seed=3)")
    assert [r.variables["C"] for r in again] == [r.variables["C"] for r in results]


def test_async_queries_share_the_slots(remote):
    import asyncio

    async def both():
        return await asyncio.gather(*(lmq.run(f'"Number {i}:[N]" where INT(N) and len(TOKENS(N)) < 3',
                                              model=remote) for i in range(4)))
    results = asyncio.run(both())
    assert all(isinstance(r.variables["N"], int) for r in results)


@pytest.mark.parametrize("decoder,feature", [("beam(n=2)", "beam"), ("best_k(n=2)", "best_k")])
def test_what_the_engine_cannot_do_names_feature_and_engine(remote, decoder, feature):
    with pytest.raises(ModelError, match=f"{feature}.*llama-server|llama-server.*{feature}"):
        lmq.run_sync('"Say:[X]" where len(TOKENS(X)) < 3', model=remote, decoder=decoder)


def test_distribution_names_feature_and_engine(remote):
    with pytest.raises(ModelError, match="distribution.*llama-server|llama-server.*distribution"):
        lmq.run_sync('argmax\n    "Colour:[C]"\ndistribution\n    C in [" red", " blue"]', model=remote)


def test_pushed_grammar_lets_a_stop_token_overshoot():
    """The stream grammar allows any text after a completed stop phrase (the token that
    completes it may carry more, as in process); the engine's `stop` ends it there."""
    plan = static_plan(compile_query('"x[X]" where STOPS_BEFORE(X, ",") and REGEX(X, "[a-z]+")').holes[0])
    grammar = pushed_grammar(plan)
    assert '","' in grammar and "\\U0010FFFF" in grammar


# ------------------------------------------------------------ engines that fail


def test_a_server_that_is_down_is_a_model_error():
    with pytest.raises(ModelError, match="cannot reach llama-server.*refused"):
        lmq.run_sync('"x[X]"', model=lmq.model(f"llama-server:http://127.0.0.1:{free_port()}"))


class _Stub(http.server.BaseHTTPRequestHandler):
    """A llama-server stand-in for failure paths: /props and /v1/models like the real
    one; /completion answers as `self.server.completion` says."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = {"/props": {"default_generation_settings": {"n_ctx": 1024}, "total_slots": 2,
                           "model_path": PATH},
                "/v1/models": {"data": [{"id": "m", "meta": {"n_vocab": 49152}}]}}.get(self.path)
        self._send(200 if body else 404, body or {"error": "not found"})

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        mode = self.server.completion
        if mode == "slow":
            time.sleep(3)
            return
        if mode == "error":
            self._send(500, {"error": {"code": 500, "message": "the slot crashed"}})
            return
        # "wrong": a value that breaks the constraint (tokens of " maybe")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for token in self.server.tokens:
            event = {"tokens": [token], "completion_probabilities": [{"logprob": -1.0}], "stop": False}
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        final = {"tokens": [], "stop": True, "stop_type": "eos", "timings": {}}
        self.wfile.write(b"data: " + json.dumps(final).encode() + b"\n\n")

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_slow_server_times_out_with_a_model_error(stub):
    stub.completion = "slow"
    model = lmq.model(f"llama-server:http://127.0.0.1:{stub.server_port}", timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ModelError, match="sent nothing for 0.5 s"):
        lmq.run_sync('"x[X]" where len(TOKENS(X)) < 3', model=model)
    assert time.monotonic() - started < 3


def test_an_error_answer_is_a_model_error_with_its_message(stub):
    stub.completion = "error"
    model = lmq.model(f"llama-server:http://127.0.0.1:{stub.server_port}")
    with pytest.raises(ModelError, match="HTTP 500.*the slot crashed"):
        lmq.run_sync('"x[X]" where len(TOKENS(X)) < 3', model=model)


def test_a_value_breaking_its_constraint_is_a_violation(stub):
    model = lmq.model(f"llama-server:http://127.0.0.1:{stub.server_port}")
    stub.completion = "wrong"
    stub.tokens = model.backend().tokenize(" maybe") + [sorted(model.backend().vocabulary.end_ids)[0]]
    with pytest.raises(ConstraintViolation, match="X = ' maybe'"):
        lmq.run_sync('"x[X]" where X in [" yes", " no"]', model=model)


def test_unknown_model_arguments_are_named(stub):
    with pytest.raises(lmq.errors.QueryArgumentError, match="unknown argument of a llama-server model: n_ctx"):
        lmq.model(f"llama-server:http://127.0.0.1:{stub.server_port}", n_ctx=5).backend()


# ------------------------------------------------------------ lmq llama-server


def _start_cli(port):
    """`lmq llama-server` in a subprocess, once it says it listens on `port`."""
    process = subprocess.Popen([sys.executable, "-m", "lmq.cli", "llama-server", PATH, "--port", str(port),
                                "-c", "1024", "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "LLAMA_SERVER": find_binary()})
    line = process.stdout.readline()
    assert f"listening on http://127.0.0.1:{port}" in line, process.stderr.read()
    return process


def _port_closes(port, within=15.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.2)
    return False


def test_lmq_llama_server_serves_and_stops_on_sigterm(llama_server):
    port = free_port()
    process = _start_cli(port)
    try:
        result = lmq.run_sync('"Q: What is 2+2?\\nA:[A]" where INT(A) and len(TOKENS(A)) < 3',
                              model=lmq.model(f"llama-server:http://127.0.0.1:{port}"))
        assert isinstance(result.variables["A"], int)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with socket.socket() as probe:           # the llama-server child is gone with it
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_llama_server_dies_with_a_killed_lmq(llama_server):
    port = free_port()
    process = _start_cli(port)
    process.kill()                           # SIGKILL: lmq cannot stop its child itself
    process.wait(10)
    assert _port_closes(port)


def test_a_value_cut_at_its_budget_before_its_language_is_complete_is_named(remote):
    """A token budget with a value language is only checked after the fact on an engine:
    the error says so and names the budget."""
    with pytest.raises(ConstraintViolation, match="reached its budget of 4 tokens on llama-server"):
        lmq.run_sync('"Some words, each followed by a comma:[X]" where REGEX(X, "( [a-z]+,)+") '
                     'and len(TOKENS(X)) < 5', model=remote)


# ------------------------------------------------------------ finding the binary


def test_llama_server_without_a_binary_says_how_to_install_it(tmp_path):
    env = {**os.environ, "LMQ_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    env.pop("LLAMA_SERVER", None)
    done = subprocess.run([sys.executable, "-m", "lmq.cli", "llama-server", PATH], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert "llama-server was not found" in done.stderr and "lmq install-llama-server" in done.stderr
    assert str(tmp_path / "llama-server") in done.stderr


def test_a_bad_llama_server_variable_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="LLAMA_SERVER is .*nothing.*not an executable"):
        find_binary()
