"""The remote-engine figure of performance.md: queries on `llama-server:` ÷ the same
requests sent straight to llama-server's `/completion` with the same grammar.

One llama-server (`--parallel 8`) on the model. Each round runs the same set of
single-hole queries twice, interleaved: through lmq (`lmq.run_sync` per query), and raw
(the request body lmq's backend builds for that hole, posted with http.client and its
stream read to the end; building the bodies is not timed). The queries are compiled
once, as an application's are, and called with a topic and a nonce. Prompts carry a fresh nonce per round and system, so neither finds
the other's prompt in the server's cache. Throughput is value tokens (counted alike:
up to the end token or the stop) per second of wall time; the figure is lmq's ÷ raw's,
for 1 client and for 8 concurrent clients (threads).

    python -m bench.remote_engine                 # SmolLM2, 3 rounds
    python -m bench.remote_engine --rounds 1 --queries 8 --json out.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import lmq
from bench.stats import median
from lmq.backends import default_model_path
from lmq.backends.remote_engine import Generated, hole_output
from lmq.compiler.codegen import compile_query
from lmq.constraints.hole_plan import HolePlan
from lmq.engines.binary import require_binary
from lmq.engines.process import LlamaServer
from lmq.runtime.decoders import make_decoder
from lmq.runtime.hole import plan_hole

#: (prompt, where clause of X): a grammar, a stop and a budget on every hole, each
#: language closed under prefixes (a value cut at the budget still satisfies it)
HOLES = [
    ("Write a sentence about {topic}:", 'STOPS_BEFORE(X, ".") and REGEX(X, "[A-Za-z ,\']+") and len(TOKENS(X)) < 33'),
    ("List some words about {topic}, separated by commas:", 'REGEX(X, "[a-z, ]+") and len(TOKENS(X)) < 33'),
    ("A long number about {topic}:", 'INT(X) and len(TOKENS(X)) < 33'),
    ("Describe {topic} in a few words:", 'STOPS_AT(X, "\\n") and len(TOKENS(X)) < 33'),
]
TOPICS = ["the sea", "a city", "music", "winter", "a forest", "coffee", "trains", "the moon"]


#: the queries, compiled once and called with their arguments as an application would
QUERIES = [f'"({{nonce}}) {prompt}[X]" where {where}' for prompt, where in HOLES]


def queries(count: int, nonce: str) -> list[tuple[str, dict[str, str]]]:
    """(query text, its arguments) of `count` queries, their prompts marked with `nonce`."""
    return [(QUERIES[i % len(QUERIES)], {"nonce": f"{nonce}-{i}", "topic": TOPICS[i % len(TOPICS)]})
            for i in range(count)]


def prompt_of(query: str, arguments: dict[str, str]) -> str:
    return query[1:query.index("[X]")].format(**arguments)


def run_lmq(model: lmq.Model, calls: list[tuple[str, dict[str, str]]], clients: int) -> tuple[float, int]:
    def one(call: tuple[str, dict[str, str]]) -> int:
        return len(lmq.run_sync(call[0], model=model, **call[1]).tokens["X"])
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, calls))
    return time.perf_counter() - started, tokens


def raw_requests(backend, calls: list[tuple[str, dict[str, str]]]) -> list[tuple[dict, HolePlan]]:
    """The /completion body lmq's backend sends for each query's hole, and the hole's plan."""
    decoder = make_decoder("argmax", {})
    requests = []
    for query, arguments in calls:
        spec = compile_query(query).holes[0]
        context = backend.vocabulary.prompt_start + backend.tokenize(prompt_of(query, arguments))
        plan = plan_hole(spec.name, spec.where, {}, backend.vocabulary)
        requests.append((backend._request(context, plan, plan.max_tokens, backend._knobs(decoder)), plan))
    return requests


def run_raw(host: str, port: int, requests: list[tuple[dict, HolePlan]], clients: int,
            vocabulary) -> tuple[float, int]:
    """Post the bodies, read every stream to its end; the tokens are then counted as lmq
    counts a value's (up to the end token or the stop), outside the timing."""
    def one(body: dict) -> list[int]:
        connection = http.client.HTTPConnection(host, port, timeout=300)
        connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        tokens = []
        for line in connection.getresponse():
            if line.startswith(b"data:"):
                tokens += json.loads(line[5:]).get("tokens") or ()
        connection.close()
        return tokens
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        streams = list(pool.map(one, [body for body, _ in requests]))
    seconds = time.perf_counter() - started
    counted = sum(len(hole_output(Generated(tokens, [0.0] * len(tokens), False), plan, vocabulary).tokens)
                  for tokens, (_, plan) in zip(streams, requests))
    return seconds, counted


def llama_server(path: str, threads: int, parallel: int = 8) -> LlamaServer:
    """llama-server on `path` with `parallel` slots in one unified cache, loaded."""
    arguments = ["-c", "8192", "--parallel", str(parallel), "--kv-unified", "-t", str(threads)]
    server = LlamaServer(path, binary=require_binary(), arguments=arguments)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote_engine", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded SmolLM2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--queries", type=int, default=16, help="queries per client count and round")
    parser.add_argument("--threads", type=int, default=1, help="llama-server's -t (1: on a loaded machine two spinning OpenMP threads crawl)")
    parser.add_argument("--json", help="write every timing here")
    options = parser.parse_args(argv)
    path = options.model or default_model_path()
    figures: dict = {}
    with llama_server(path, options.threads) as server:
        model = lmq.model(f"llama-server:{server.url}", max_concurrency=8)
        backend = model.backend()
        run_lmq(model, queries(4, "warm"), 4)
        for clients in (1, 8):
            count = options.queries * (1 if clients == 1 else 4)
            rates: dict[str, list[float]] = {"lmq": [], "raw": []}
            for round_ in range(options.rounds):
                lmq_texts = queries(count, f"l{clients}r{round_}")
                raw_texts = queries(count, f"r{clients}r{round_}")
                seconds, tokens = run_lmq(model, lmq_texts, clients)
                rates["lmq"].append(tokens / seconds)
                seconds, tokens = run_raw("127.0.0.1", server.port, raw_requests(backend, raw_texts), clients,
                                          backend.vocabulary)
                rates["raw"].append(tokens / seconds)
                print(f"clients={clients} round {round_}: lmq {rates['lmq'][-1]:.1f} tok/s, "
                      f"raw {rates['raw'][-1]:.1f} tok/s", file=sys.stderr)
            ratio = median(rates["lmq"]) / median(rates["raw"])
            figures[f"clients_{clients}"] = {"lmq_tokens_per_s": rates["lmq"], "raw_tokens_per_s": rates["raw"],
                                             "ratio": ratio}
            print(f"remote engine, {clients} client{'s' if clients > 1 else ''} on --parallel 8: "
                  f"lmq {median(rates['lmq']):.1f} tok/s ÷ raw /completion {median(rates['raw']):.1f} "
                  f"tok/s = {ratio:.3f} (target ≥ 0.9)")
    if options.json:
        with open(options.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
