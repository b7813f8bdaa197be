"""lmq serve-model against llama.cpp's own llama-server on one constrained workload.

    python -m bench.server_vs_llama [--clients 8] [--rounds 3] [--tokens 64] [--threads N]
                                    [--json OUT]

`--clients` clients each ask `--rounds` times, one after another, for a hole of exactly
`--tokens` tokens of `[a-z ,.]+` after a prompt of their own (greedy):

- lmq: one `lmq serve-model` (as many slots as clients) and as many client processes,
  each running `"PROMPT[X]" where REGEX(X, "[a-z ,.]+") and len(TOKENS(X)) == N`
  through lmq's LMTP client;
- llama-server (`--parallel` = clients, `--kv-unified`, the same threads) and as many
  client threads posting `/completion` with the hole's GBNF (the grammar lmq pushes for
  it), `n_predict` N and `ignore_eos`, greedy, streamed and read to the end: llama.cpp's
  server at its leanest, no lmq in the way.

Aggregate tokens/s = clients × rounds × N / wall time; runs alternate (lmq, llama-server)
`--reps` times and the figure is the ratio of the medians. Target: lmq ≥ llama-server.
Needs the llama-server binary (`lmq install-llama-server`).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import lmq
from bench.constraints import progress, resolve_model
from bench.options import bench_arguments, model_options, write_figures
from bench.remote_engine import llama_server
from bench.server import Server
from bench.stats import median
from lmq.backends.remote_engine import pushed_grammar
from lmq.compiler.codegen import compile_query
from lmq.runtime.hole import plan_hole

WHERE = 'REGEX(X, "[a-z ,.]+")'


def prompt(client: int) -> str:
    return f"Story {client}: a dragon learns to cook. Once upon a time,"


def query(client: int, n: int) -> str:
    return f'"{prompt(client)}[X]" where {WHERE} and len(TOKENS(X)) == {n}'


def _client_setup(model_id: str, endpoint: str) -> None:
    global _model
    _model = lmq.model(model_id, endpoint=endpoint)
    _model.backend()


def _client_rounds(job: tuple[int, int, int]) -> int:
    """One lmq client: its rounds one after another; the tokens it got."""
    client, n, rounds = job
    got = 0
    for _ in range(rounds):
        tokens = lmq.run_sync(query(client, n), model=_model).tokens["X"]
        if len(tokens) != n:
            raise RuntimeError(f"the hole has {len(tokens)} tokens, not {n}")
        got += len(tokens)
    return got


def run_lmq(pool, clients: int, n: int, rounds: int) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = sum(pool.map(_client_rounds, [(c, n, rounds) for c in range(clients)], chunksize=1))
    return time.perf_counter() - started, tokens


def llama_bodies(backend, clients: int, n: int) -> list[dict[str, Any]]:
    """Each client's /completion body: its prompt's tokens, the hole's GBNF, N tokens."""
    spec = compile_query(query(0, n)).holes[0]
    grammar = pushed_grammar(plan_hole(spec.name, spec.where, {}, backend.vocabulary))
    return [{"prompt": backend.vocabulary.prompt_start + backend.tokenize(prompt(c)),
             "n_predict": n, "ignore_eos": True, "grammar": grammar, "stream": True,
             "cache_prompt": True, "return_tokens": True, "temperature": 0.0, "top_k": 1}
            for c in range(clients)]


def run_llama(port: int, bodies: list[dict[str, Any]], rounds: int) -> tuple[float, int]:
    def client(body: dict[str, Any]) -> int:
        got = 0
        for _ in range(rounds):         # llama-server closes a streamed response's connection
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            connection.request("POST", "/completion", json.dumps(body),
                               {"Content-Type": "application/json"})
            for line in connection.getresponse():
                if line.startswith(b"data:"):
                    got += len(json.loads(line[5:]).get("tokens") or ())
            connection.close()
        return got
    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as threads:
        tokens = sum(threads.map(client, bodies))
    return time.perf_counter() - started, tokens


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    clients = arguments.clients or (2 if arguments.smoke else 8)
    reps = arguments.reps or (1 if arguments.smoke else 3)
    n = arguments.tokens or (8 if arguments.smoke else 64)
    rounds = arguments.rounds
    path = resolve_model(arguments.model)
    progress(f"starting lmq serve-model and llama-server --parallel {clients}")
    server = Server(path, clients, 2048, model_options(arguments))
    reference = llama_server(path, arguments.threads, clients)
    pool = multiprocessing.get_context("spawn").Pool(
        clients, _client_setup, (f"llama.cpp:{path}", server.endpoint))
    try:
        backend = lmq.model(f"llama.cpp:{path}", endpoint=server.endpoint).backend()
        bodies = llama_bodies(backend, clients, n)
        run_lmq(pool, clients, n, 1)               # untimed: prompts into both caches
        run_llama(reference.port, bodies, 1)
        rates: dict[str, list[float]] = {"lmq": [], "llama_server": []}
        for rep in range(reps):
            seconds, tokens = run_lmq(pool, clients, n, rounds)
            rates["lmq"].append(tokens / seconds)
            seconds, tokens = run_llama(reference.port, bodies, rounds)
            if tokens != clients * rounds * n:
                raise RuntimeError(f"llama-server generated {tokens} tokens, not {clients * rounds * n}")
            rates["llama_server"].append(tokens / seconds)
            progress(f"rep {rep}: lmq {rates['lmq'][-1]:.1f} tok/s, "
                     f"llama-server {rates['llama_server'][-1]:.1f} tok/s")
    finally:
        pool.terminate()
        server.stop()
        reference.stop()
    ratio = median(rates["lmq"]) / median(rates["llama_server"])
    return {"model": {"name": arguments.model, "path": path, "threads": arguments.threads},
            "settings": {"clients": clients, "rounds": rounds, "tokens": n, "reps": reps},
            "tokens_per_s": rates, "ratio": ratio, "pass": ratio >= 1.0}


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--clients", type=int, help="concurrent clients (default 8, smoke 2)")
        parser.add_argument("--rounds", type=int, default=3, help="holes each client asks for in turn")
    arguments = bench_arguments("python -m bench.server_vs_llama", __doc__.split("\n")[0], argv,
                                tokens=(64, 8), what="tokens per hole", extra=extra)
    figures = run(arguments)
    settings = figures["settings"]
    print(f"\n{settings['clients']} clients × {settings['rounds']} holes of {settings['tokens']} "
          f"tokens, {figures['model']['threads']} threads: lmq serve-model "
          f"{median(figures['tokens_per_s']['lmq']):.1f} tok/s, llama-server "
          f"{median(figures['tokens_per_s']['llama_server']):.1f} tok/s; ratio "
          f"{figures['ratio']:.3f} (target >= 1) {'PASS' if figures['pass'] else 'MISS'}")
    return write_figures(arguments, figures)


if __name__ == "__main__":
    sys.exit(main())
