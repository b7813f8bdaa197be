"""`lmq playground [--model ID] [--port N]`: serve the playground page on 127.0.0.1."""

from __future__ import annotations

import argparse
import sys

from lmq.runtime.query import Model


def add_parser(commands: argparse._SubParsersAction) -> None:
    playground = commands.add_parser(
        "playground", help="a local web page to write, run and inspect queries",
        description="Serve the playground on http://127.0.0.1:PORT/: an editor, examples, "
                    "Run / Stop, the streamed prompt, token traces, the compiled program.")
    playground.add_argument("--model", help="model id for every run (default: the query's from "
                                            "clause, $LMQ_MODEL, or the embedded SmolLM2)")
    playground.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")


def run_playground(options: argparse.Namespace) -> int:
    from lmq.playground.server import PlaygroundServer

    if not 0 <= options.port <= 65535:
        print(f"lmq: --port must be from 0 to 65535, not {options.port}", file=sys.stderr)
        return 2
    try:
        server = PlaygroundServer(options.port, Model(options.model) if options.model else None)
    except OSError as e:
        print(f"lmq: cannot serve on 127.0.0.1:{options.port}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"lmq playground on {server.url} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
