"""Branching figures of performance.md: branches and concurrent queries as one batch.

    python -m bench.branching [--model smollm2|gemma3|PATH] [--reps N] [--tokens N]
                              [--threads N] [--json OUT] [--smoke]

Per repetition, interleaved (A B C D, A B C D, …), on one in-process model:

1. `sample(n=8)` of one hole of `--tokens` tokens, and the raw 8-sequence batch
   (`RawLoop.generate_batch`) fed the same 8 token lists: lmq ÷ raw (target <= 1.15);
2. 8 sequential `sample(n=1)` holes of the same size: sample(n=8) ÷ those (target <= 0.6);
3. 8 concurrent `async` queries (`asyncio.gather`) against the same 8 queries awaited one
   after another: concurrent ÷ sequential wall time, and aggregate tokens/s of both.

An untimed warm-up puts the prompts in the cache first (the raw loop, too, evaluates all
but the prompt's last token untimed). Times are wall-clock medians; the machine's load
moves absolute numbers, ratios of runs interleaved in one process much less.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import lmq
from bench.constraints import resolve_model
from bench.options import bench_arguments, model_options, write_figures
from bench.raw import RawLoop
from bench.stats import median
from lmq.backends import load_backend

BRANCHES = 8
PROMPT = "Write a long story about a cat who lives in a small town by the sea.\n"


def _hole(tokens: int) -> str:
    return f'"{{prompt}}[X]" where len(TOKENS(X)) == {tokens}'


@lmq.query
async def topic(number, tokens):
    '''lmq
    "{PROMPT}Chapter {number}:[X]" where len(TOKENS(X)) == tokens
    return X
    '''


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    path = resolve_model(arguments.model)
    model = lmq.model(f"local:llama.cpp:{path}", **model_options(arguments))
    backend = load_backend(model.model_id, **model.kwargs)
    raw = RawLoop(backend.model, n_seq_max=BRANCHES)
    prompt_tokens = raw.tokenize(PROMPT)
    hole = lmq.query(_hole(arguments.tokens))

    timings: dict[str, list[float]] = {"sample8": [], "raw8": [], "sequential1": [],
                                       "concurrent": [], "sequential_async": []}
    hole(prompt=PROMPT, model=model, decoder=f"sample(n={BRANCHES})")      # untimed: the prompt
    asyncio.run(_concurrent(model, arguments.tokens))                     # is cached, as for raw
    for rep in range(arguments.reps):
        seed = 100 + rep
        start = time.perf_counter()
        results = hole(prompt=PROMPT, model=model, decoder=f"sample(n={BRANCHES}, seed={seed})")
        timings["sample8"].append(time.perf_counter() - start)
        follow = [r.tokens["X"] for r in results]
        if any(len(f) != arguments.tokens for f in follow):
            raise SystemExit("a branch broke its token count")
        timings["raw8"].append(raw.generate_batch(prompt_tokens, arguments.tokens, BRANCHES, follow).seconds)
        start = time.perf_counter()
        for branch in range(BRANCHES):
            hole(prompt=PROMPT, model=model, decoder=f"sample(seed={seed * 100 + branch})")
        timings["sequential1"].append(time.perf_counter() - start)
        timings["concurrent"].append(asyncio.run(_concurrent(model, arguments.tokens)))
        timings["sequential_async"].append(asyncio.run(_sequential(model, arguments.tokens)))
        print(f"rep {rep + 1}/{arguments.reps}: " + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in timings.items()),
              file=sys.stderr)
    raw.close()
    medians = {k: median(v) for k, v in timings.items()}
    generated = BRANCHES * arguments.tokens
    return {
        "model": path, "tokens_per_hole": arguments.tokens, "branches": BRANCHES,
        "reps": arguments.reps, "threads": arguments.threads, "medians_s": medians,
        "sample8_over_raw8": medians["sample8"] / medians["raw8"],
        "sample8_over_8_sequential_sample1": medians["sample8"] / medians["sequential1"],
        "concurrent_over_sequential_async": medians["concurrent"] / medians["sequential_async"],
        "tokens_per_s": {k: generated / v for k, v in medians.items()},
        "timings_s": timings,
    }


async def _concurrent(model: lmq.Model, tokens: int) -> float:
    start = time.perf_counter()
    await asyncio.gather(*(topic(i, tokens, model=model) for i in range(BRANCHES)))
    return time.perf_counter() - start


async def _sequential(model: lmq.Model, tokens: int) -> float:
    start = time.perf_counter()
    for i in range(BRANCHES):
        await topic(i, tokens, model=model)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    arguments = bench_arguments("python -m bench.branching", __doc__.split("\n")[0], argv,
                                tokens=(32, 4))
    figures = run(arguments)
    print(f"model {figures['model']}, {BRANCHES} branches x {arguments.tokens} tokens, "
          f"{arguments.reps} reps, {arguments.threads} threads (medians)")
    for name, seconds in figures["medians_s"].items():
        print(f"  {name:18s} {seconds:8.3f} s  {figures['tokens_per_s'][name]:8.1f} tok/s")
    print(f"  sample(n=8) / raw 8-sequence batch        {figures['sample8_over_raw8']:.3f}  (target <= 1.15)")
    print(f"  sample(n=8) / 8 sequential sample(n=1)    {figures['sample8_over_8_sequential_sample1']:.3f}  "
          "(target <= 0.6)")
    print(f"  8 concurrent / 8 sequential async queries {figures['concurrent_over_sequential_async']:.3f}")
    return write_figures(arguments, figures)


if __name__ == "__main__":
    sys.exit(main())
