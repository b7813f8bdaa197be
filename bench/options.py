"""The command-line options every bench shares, parsed in one place."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Sequence


def bench_arguments(prog: str, description: str, argv: Sequence[str] | None, *,
                    tokens: tuple[int, int], what: str = "tokens per hole",
                    extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """`--model --reps --tokens --threads --n-gpu-layers --json --smoke` (+ `extra`'s own), with `reps`
    and `tokens` filled in (full run, smoke run) and checked to be at least 1."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a GGUF path")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 5, smoke 1)")
    parser.add_argument("--tokens", type=int,
                        help=f"{what} (default {tokens[0]}, smoke {tokens[1]})")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-gpu-layers", type=int, default=0,
                        help="layers offloaded to the GPU (-1: all; needs a GPU build of llama.cpp)")
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    if extra is not None:
        extra(parser)
    arguments = parser.parse_args(argv)
    for name in ("reps", "tokens", "threads"):
        if getattr(arguments, name) is not None and getattr(arguments, name) < 1:
            parser.error(f"--{name} must be at least 1")
    arguments.reps = arguments.reps or (1 if arguments.smoke else 5)
    arguments.tokens = arguments.tokens or (tokens[1] if arguments.smoke else tokens[0])
    return arguments


def model_options(arguments: argparse.Namespace) -> dict[str, int]:
    """The llama.cpp keywords of every model a bench loads: lmq's, the raw loop's and the
    references' alike (same threads for prompts and single tokens, same offload)."""
    return {"n_threads": arguments.threads, "n_threads_batch": arguments.threads,
            "n_gpu_layers": arguments.n_gpu_layers}


def write_figures(arguments: argparse.Namespace, figures: dict) -> int:
    """Write the figures to `--json` where it was given; the bench's exit status (0)."""
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=1, default=str))
    return 0
