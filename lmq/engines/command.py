"""`lmq install-llama-server [--jobs N]` and `lmq llama-server MODEL.gguf [--host H]
[--port N] [other llama-server flags]`: get the binary once, then start an engine in one
line. Unknown flags go to llama-server as they are (`--parallel 8 -c 8192`)."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading

from lmq.engines.binary import install
from lmq.engines.process import LOAD_TIMEOUT, LlamaServer


def add_parsers(commands: argparse._SubParsersAction) -> None:
    installer = commands.add_parser(
        "install-llama-server", help="build llama.cpp's llama-server once for this machine",
        description="Download the llama-cpp-python sdist matching the installed version from "
                    "PyPI, build its llama.cpp `llama-server` and cache it (~/.cache/lmq).")
    installer.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    server = commands.add_parser(
        "llama-server", help="run llama.cpp's llama-server on a GGUF model", allow_abbrev=False,
        description="Start llama-server on MODEL, print its URL once the model is loaded, stop "
                    "it on Ctrl-C or SIGTERM. Other flags go to llama-server (--parallel 8).")
    server.add_argument("model", help="PATH.gguf")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    server.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    server.add_argument("--timeout", type=float, default=LOAD_TIMEOUT,
                        help=f"seconds to wait for the model to load (default {LOAD_TIMEOUT:.0f})")


def install_llama_server(options: argparse.Namespace) -> int:
    print(install(jobs=options.jobs))
    return 0


def run_llama_server(options: argparse.Namespace, extra: list[str]) -> int:
    stopping = threading.Event()

    def stop(_signal, _frame) -> None:
        stopping.set()

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    with tempfile.TemporaryFile("w+") as log:
        server = LlamaServer(options.model, host=options.host, port=options.port,
                             arguments=extra, log=log)
        try:
            server.wait_ready(options.timeout)
            print(f"llama-server listening on {server.url} (model id llama-server:{server.url})",
                  flush=True)
            while not stopping.is_set() and server.process.poll() is None:
                stopping.wait(0.5)
        except Exception:
            log.seek(0)
            sys.stderr.write("".join(log.readlines()[-20:]))
            raise
        finally:
            status = server.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if not stopping.is_set():
        print(f"lmq: llama-server exited with status {status}", file=sys.stderr)
        return 1
    return 0
