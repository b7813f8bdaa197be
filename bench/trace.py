"""What tracing costs: a traced query's time ÷ the same query untraced (target <= 2), and
untraced time now ÷ before tracing existed (target: 1, nothing measurable).

    python -m bench.trace [--model smollm2|gemma3|PATH] [--reps 5] [--tokens 32]
                          [--threads N] [--n-gpu-layers N] [--before REV] [--json OUT] [--smoke]

With `--cpu-time` calls are timed by the process's CPU time instead of wall time: with
`--threads 1` (llama.cpp then has no worker threads that spin) that is the work of the
call itself, steady where other processes load the machine.

Cases: a dense regex hole and an unconstrained hole under argmax, and `sample(n=4)` of the
regex hole, each `--tokens` long. Per repetition each case runs untraced, then traced to a
file in a temporary folder (written and flushed per event, as `trace=PATH` always is);
the on ÷ off figure is the median of the per-repetition ratios. Times are whole calls
(`lmq.run_sync`), after an untimed warm-up that caches the prompt.

Per token: the tracer's own work for one chosen token (`Tracer.token`: the model's and the
masked log-probabilities, the top tokens, one JSON line written and flushed), timed on
rows of the model's vocabulary size without a mask, under a sparse mask (1% allowed) and
under a dense one (90%), in µs. Divided by a decode's time it is the on ÷ off a faster
engine would see (a GPU decodes SmolLM2 in about 1 ms).

`--before REV` (a git revision, e.g. the commit before tracing) also measures the
untraced cases with that revision's `lmq` (its files extracted with `git archive`): the
two versions run in alternating subprocesses (`--reps` rounds of one timed run per case
each) on the same model and threads, and now ÷ before is the median of the rounds'
ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

import lmq
from bench.constraints import resolve_model
from bench.options import bench_arguments, model_options, write_figures
from bench.stats import median
from lmq.backends import load_backend
from lmq.constraints.hole_plan import HolePlan
from lmq.constraints.token_masks import TokenMask
from lmq.runtime.trace import Tracer, TraceSink

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a long story about a cat who lives in a small town by the sea.\n"
REGEX = r"[a-z ,.]+"
#: time calls by CPU time (set by `--cpu-time`)
CPU_CLOCK = False


def _cases(tokens: int) -> dict[str, tuple[str, str]]:
    """name → (query, decoder)."""
    regex = f'"{{prompt}}[X]" where REGEX(X, r"{REGEX}") and len(TOKENS(X)) == {tokens}'
    free = f'"{{prompt}}[X]" where len(TOKENS(X)) == {tokens}'
    return {"argmax_regex": (regex, "argmax"), "argmax_unconstrained": (free, "argmax"),
            "sample4_regex": (regex, "sample(n=4, seed=7)")}


def _time(query: str, decoder: str, model: lmq.Model, **trace: Any) -> float:
    """The call's time: the process's CPU time (`--threads 1`: llama.cpp's work and
    lmq's, not the time other processes of a shared machine take), else wall time."""
    clock = time.process_time if CPU_CLOCK else time.perf_counter
    start = clock()
    lmq.run_sync(query, prompt=PROMPT, model=model, decoder=decoder, **trace)
    return clock() - start


def _model(arguments: argparse.Namespace) -> lmq.Model:
    return lmq.model(f"local:llama.cpp:{resolve_model(arguments.model)}", **model_options(arguments))


def tracing(arguments: argparse.Namespace) -> dict[str, Any]:
    """Traced ÷ untraced, interleaved, per case."""
    model = _model(arguments)
    cases = _cases(arguments.tokens)
    timings: dict[str, dict[str, list[float]]] = {name: {"off": [], "on": []} for name in cases}
    events = {}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.jsonl"
        for query, decoder in cases.values():
            _time(query, decoder, model)                                   # untimed warm-up
        for rep in range(arguments.reps):
            for name, (query, decoder) in cases.items():
                timings[name]["off"].append(_time(query, decoder, model))
                timings[name]["on"].append(_time(query, decoder, model, trace=str(path)))
                events[name] = sum(1 for _ in path.open(encoding="utf-8"))
            print(f"rep {rep + 1}/{arguments.reps}: " + ", ".join(
                f"{name} off {t['off'][-1]:.3f}s on {t['on'][-1]:.3f}s" for name, t in timings.items()),
                file=sys.stderr)
    return {name: {"on_over_off": median([on / off for off, on in zip(t["off"], t["on"])]),
                   "median_off_s": median(t["off"]), "median_on_s": median(t["on"]),
                   "trace_events": events[name], "timings_s": t}
            for name, t in timings.items()}


def per_token(arguments: argparse.Namespace, repeats: int = 300) -> dict[str, float]:
    """Median µs of `Tracer.token` per mask kind, on rows of the model's vocabulary size."""
    backend = load_backend(_model(arguments).model_id, **model_options(arguments))
    size = backend.vocabulary.size
    rng = np.random.default_rng(0)
    flags = rng.random(size) < 0.9
    masks = {"unmasked": None,
             "sparse_1pct": TokenMask.of(np.arange(0, size, 100, dtype=np.int32), size),
             "dense_90pct": TokenMask.of_flags(flags)}
    end_list = np.fromiter(sorted(backend.vocabulary.end_ids), dtype=np.int64)
    figures = {}
    with tempfile.TemporaryDirectory() as folder:
        sink = TraceSink(str(Path(folder) / "trace.jsonl"))
        tracer = Tracer(sink)
        tracer.hole(HolePlan("X"), None, backend)
        for name, mask in masks.items():
            allowed = mask.allowed if mask is not None else np.arange(size)
            times = []
            for _ in range(repeats):
                row = rng.standard_normal(size).astype(np.float32) * 3
                token = int(allowed[np.argmax(row[allowed])])
                start = time.perf_counter()
                tracer.token("X", row, mask, None, end_list, token, -1.0)
                times.append(time.perf_counter() - start)
            figures[name] = median(times) * 1e6
        sink.close()
    return figures


def untraced_round(arguments: argparse.Namespace) -> dict[str, float]:
    """One timed untraced run per case (after a warm-up): the worker of `--before`."""
    model = _model(arguments)
    cases = _cases(arguments.tokens)
    for query, decoder in cases.values():
        _time(query, decoder, model)
    return {name: _time(query, decoder, model) for name, (query, decoder) in cases.items()}


def before_and_now(arguments: argparse.Namespace) -> dict[str, Any]:
    """Untraced time of this tree ÷ `--before`'s, in alternating subprocesses."""
    archive = subprocess.run(["git", "archive", "--format=tar", arguments.before, "lmq"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    rounds: dict[str, list[dict[str, float]]] = {"before": [], "now": []}
    with tempfile.TemporaryDirectory() as folder:
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        inherited = [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
        paths = {"before": os.pathsep.join([folder, str(ROOT), *inherited]),
                 "now": os.pathsep.join([str(ROOT), *inherited])}
        worker = [sys.executable, "-m", "bench.trace", "--untraced-round", "--model", arguments.model,
                  "--tokens", str(arguments.tokens), "--threads", str(arguments.threads),
                  "--n-gpu-layers", str(arguments.n_gpu_layers)] + ["--cpu-time"] * arguments.cpu_time
        for number in range(arguments.reps):
            for version in ("before", "now"):
                done = subprocess.run(worker, cwd=ROOT, capture_output=True, text=True, check=True,
                                      env={**os.environ, "PYTHONPATH": paths[version]})
                rounds[version].append(json.loads(done.stdout.splitlines()[-1]))
            print(f"round {number + 1}/{arguments.reps}: " + ", ".join(
                f"{name} before {rounds['before'][-1][name]:.3f}s now {rounds['now'][-1][name]:.3f}s"
                for name in rounds["now"][-1]), file=sys.stderr)
    return {"revision": arguments.before, "rounds_s": rounds,
            "now_over_before": {name: median([now[name] / before[name] for before, now
                                              in zip(rounds["before"], rounds["now"])])
                                for name in rounds["now"][0]}}


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--before", metavar="REV",
                        help="also compare untraced time with this git revision's lmq")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time calls by the process's CPU time, not wall time (with --threads 1: "
                             "steady figures on a machine other processes load)")
    parser.add_argument("--untraced-round", action="store_true", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    arguments = bench_arguments("python -m bench.trace", __doc__.split("\n")[0], argv,
                                tokens=(32, 4), extra=_extra)
    global CPU_CLOCK
    CPU_CLOCK = arguments.cpu_time
    if arguments.untraced_round:
        print(json.dumps(untraced_round(arguments)))
        return 0
    figures: dict[str, Any] = {"model": resolve_model(arguments.model), "tokens": arguments.tokens,
                               "reps": arguments.reps, "threads": arguments.threads,
                               "clock": "cpu" if arguments.cpu_time else "wall",
                               "tracer_token_us": per_token(arguments),
                               "tracing": tracing(arguments)}
    print(f"model {figures['model']}, {arguments.tokens} tokens per hole, {arguments.reps} reps, "
          f"{arguments.threads} threads, {figures['clock']} time (medians)")
    print("  Tracer.token per token: " + ", ".join(f"{name} {us:.0f} µs"
                                                   for name, us in figures["tracer_token_us"].items()))
    for name, case in figures["tracing"].items():
        print(f"  {name:22s} off {case['median_off_s']:7.3f} s  on {case['median_on_s']:7.3f} s  "
              f"on/off {case['on_over_off']:.3f}  (target <= 2; {case['trace_events']} events)")
    if arguments.before:
        figures["before"] = before_and_now(arguments)
        for name, ratio in figures["before"]["now_over_before"].items():
            print(f"  {name:22s} untraced now/before ({arguments.before}) {ratio:.3f}  (target 1)")
    return write_figures(arguments, figures)


if __name__ == "__main__":
    sys.exit(main())
