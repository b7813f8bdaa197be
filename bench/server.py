"""The model-server benchmark: the two server figures of `performance.md` in one run.

    python -m bench.server [--model smollm2|gemma3|PATH] [--clients 8] [--reps N]
                           [--tokens N] [--threads N] [--json OUT] [--smoke]

A real `lmq serve-model` subprocess serves the model (as many slots as clients, the same
thread count as the raw loop). The query is one hole of exactly N tokens
(`len(TOKENS(X)) == N`, so every run generates the same number of tokens) after a fixed
prompt; each run is made once untimed first, so prompts are in every cache (the server's
slots, the in-process backend, the raw loop: each timed run evaluates only new tokens).

1. Many clients: `--clients` client processes (started once, each with its own
   connection per query, as separate programs on the machine would) run the query at
   once through the LMTP client backend; aggregate tokens/s = clients × N / wall time from
   dispatching the queries to the last result. Reference: the raw loop decoding `--clients`
   sequences together (`bench.raw`, one `llama_decode` per step). Target ≥ 0.85.
2. One client: the query through the LMTP client backend ÷ the same query in process
   (`local:llama.cpp:`), tokens/s each. Target ≥ 0.9.

The compared runs are interleaved (A B A B …) and the figures are medians. The machine
is shared by everything else running on it: absolute numbers mean little, ratios less so.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.pool
import subprocess
import sys
import time
from typing import Any, Callable

import lmq
from bench.constraints import progress, resolve_model
from bench.options import bench_arguments, model_options, write_figures
from bench.raw import RawLoop
from bench.stats import median

PROMPT = "Write a long story about a dragon who learns to cook.\n"
TARGETS = (("many clients / raw batch", "many_clients", 0.85),
           ("one client / in process", "one_client", 0.9))


class Server:
    """`lmq serve-model` in a subprocess, ready once it prints its address."""

    def __init__(self, path: str, slots: int, n_ctx: int, options: dict[str, int]):
        command = [sys.executable, "-m", "lmq.cli", "serve-model", f"llama.cpp:{path}", "--port", "0",
                   "--slots", str(slots), "--n_ctx", str(n_ctx), "--static"]
        for name, value in options.items():
            command += [f"--{name}", str(value)]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        for line in self.process.stdout:
            if "listening on ws://" in line:
                self.endpoint = line.strip().rsplit("ws://", 1)[1].rstrip("/")
                return
        raise RuntimeError("lmq serve-model exited before it was ready")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def query(n: int) -> str:
    return f'"{PROMPT.encode("unicode_escape").decode()}[X]" where len(TOKENS(X)) == {n}'


def timed_query(text: str, model: lmq.Model, n: int) -> float:
    start = time.perf_counter()
    result = lmq.run_sync(text, model=model)
    seconds = time.perf_counter() - start
    if len(result.tokens["X"]) != n:
        raise RuntimeError(f"the hole has {len(result.tokens['X'])} tokens, not {n}")
    return seconds


def _client_setup(text: str, model_id: str, endpoint: str, n: int) -> None:
    """A client process: its model (the server's MODEL_INFO read once) and its query."""
    global _client
    _client = (text, lmq.model(model_id, endpoint=endpoint), n)
    _client[1].backend()


def _client_query(_: int) -> float:
    return timed_query(*_client)


def concurrent_queries(pool: multiprocessing.pool.Pool, clients: int) -> float:
    """Wall time of `clients` client processes running the query at once."""
    start = time.perf_counter()
    pool.map(_client_query, range(clients), chunksize=1)
    return time.perf_counter() - start


def interleaved(reps: int, runs: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
    """Each run once untimed, then `reps` rounds of all of them in turn."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    return times


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    smoke = arguments.smoke
    clients = arguments.clients or (2 if smoke else 8)
    reps = arguments.reps or (1 if smoke else 5)
    n = arguments.tokens or (4 if smoke else 32)
    path = resolve_model(arguments.model)
    threads = arguments.threads
    text = query(n)
    started = time.perf_counter()
    progress(f"starting lmq serve-model with {clients} slots")
    server = Server(path, clients, 2048, model_options(arguments))
    raw = RawLoop.load(path, n_ctx=2048, n_seq_max=clients, **model_options(arguments))
    pool = multiprocessing.get_context("spawn").Pool(
        clients, _client_setup, (text, f"llama.cpp:{path}", server.endpoint, n))
    try:
        remote = lmq.model(f"llama.cpp:{path}", endpoint=server.endpoint)
        local = lmq.model(f"local:llama.cpp:{path}", n_ctx=2048, **model_options(arguments))
        prompt = raw.tokenize(PROMPT)
        progress(f"many clients: {clients} × {n} tokens, {reps} reps")
        many = interleaved(reps, {
            "server_s": lambda: concurrent_queries(pool, clients),
            "raw_batch_s": lambda: raw.generate_batch(prompt, n, clients).seconds})
        progress(f"one client: {n} tokens, {reps} reps")
        one = interleaved(reps, {
            "lmtp_s": lambda: timed_query(text, remote, n),
            "in_process_s": lambda: timed_query(text, local, n)})
    finally:
        pool.terminate()
        raw.close()
        server.stop()
    server_speed = clients * n / median(many["server_s"])
    raw_speed = clients * n / median(many["raw_batch_s"])
    lmtp_speed = n / median(one["lmtp_s"])
    local_speed = n / median(one["in_process_s"])
    figures = {
        "model": {"name": arguments.model, "path": path, "threads": threads},
        "settings": {"clients": clients, "reps": reps, "tokens": n, "smoke": smoke},
        "many_clients": {**many, "server_tokens_per_s": server_speed,
                         "raw_batch_tokens_per_s": raw_speed, "ratio": server_speed / raw_speed},
        "one_client": {**one, "lmtp_tokens_per_s": lmtp_speed, "in_process_tokens_per_s": local_speed,
                       "ratio": lmtp_speed / local_speed},
    }
    figures["targets"] = [{"figure": label, "value": figures[key]["ratio"], "target": f">= {target:g}",
                           "pass": figures[key]["ratio"] >= target} for label, key, target in TARGETS]
    figures["wall_s"] = time.perf_counter() - started
    return figures


def print_report(figures: dict[str, Any], out=sys.stdout) -> None:
    settings, many, one = figures["settings"], figures["many_clients"], figures["one_client"]
    print(f"\nmodel {figures['model']['name']}, {figures['model']['threads']} threads, "
          f"{settings['tokens']} tokens per query, {settings['reps']} reps", file=out)
    print(f"{settings['clients']} clients on one server: {many['server_tokens_per_s']:.1f} tok/s; "
          f"raw {settings['clients']}-sequence batch: {many['raw_batch_tokens_per_s']:.1f} tok/s", file=out)
    print(f"one client over LMTP: {one['lmtp_tokens_per_s']:.1f} tok/s; in process: "
          f"{one['in_process_tokens_per_s']:.1f} tok/s", file=out)
    print(f"\n{'figure':<28} {'value':>8} {'target':>8}", file=out)
    for row in figures["targets"]:
        print(f"{row['figure']:<28} {row['value']:>8.3f} {row['target']:>8}  "
              f"{'PASS' if row['pass'] else 'MISS'}", file=out)
    print(f"\nwall time {figures['wall_s']:.1f} s", file=out)


def main(argv: list[str] | None = None) -> int:
    arguments = bench_arguments(
        "python -m bench.server", __doc__.split("\n")[0], argv, tokens=(32, 4),
        what="tokens per query",
        extra=lambda parser: parser.add_argument(
            "--clients", type=int, help="concurrent clients (default 8, smoke 2)"))
    figures = run(arguments)
    print_report(figures)
    return write_figures(arguments, figures)


if __name__ == "__main__":
    sys.exit(main())
