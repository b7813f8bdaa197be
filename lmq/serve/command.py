"""`lmq serve-model MODEL [--models-dir DIR] [--host H] [--port P] [--token T] [limits] [--key value …]`.

Flags of the server itself are spelled with dashes; every other `--key value` goes to the
backend constructor (`--n_ctx 1024`, `--n_gpu_layers -1`), its value read as a Python
literal when it is one (`1024`, `-1`, `True`), else kept as a string.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import sys
from typing import Any

from lmq.compiler.nesting import literal_or_text
from lmq.errors import QueryArgumentError
from lmq.serve.compiling import CompileLimits


def add_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve-model", help="serve a model over LMTP (websocket)", allow_abbrev=False,
        description="Serve a model to lmq and LMQL clients over LMTP. Any other --key value "
                    "goes to the backend (--n_ctx 1024, --n_gpu_layers -1).")
    serve.add_argument("model", nargs="?", help="llama.cpp:PATH.gguf or transformers:DIR "
                                                "(may be omitted with --models-dir)")
    serve.add_argument("--models-dir", metavar="DIR",
                       help="also serve the .gguf files inside DIR, loaded on demand (clients "
                            "name them by their path in DIR); without it only MODEL is served")
    serve.add_argument("--static", action="store_true",
                       help="serve only MODEL: the default without --models-dir (kept for old "
                            "command lines)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1); any non-loopback address "
                            "needs --token or --insecure-no-token")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    serve.add_argument("--token", help="require 'Authorization: Bearer TOKEN' from clients")
    serve.add_argument("--insecure-no-token", action="store_true",
                       help="serve a non-loopback --host without a token (anyone who reaches "
                            "the port can use the model)")
    serve.add_argument("--slots", type=int, default=8,
                       help="concurrent streams per model: its cache sequences (default 8)")
    serve.add_argument("--max-models", type=int, default=2, help="models loaded at once (default 2)")
    serve.add_argument("--max-frame-bytes", type=int, default=8 * 1024 * 1024,
                       help="largest client frame answered (default 8 MiB)")
    serve.add_argument("--max-streams", type=int, default=64,
                       help="open streams per connection (default 64)")
    serve.add_argument("--max-tokens", type=int, default=4096,
                       help="largest max_tokens of a GENERATE (default 4096)")
    compiling = CompileLimits()
    serve.add_argument("--max-compile-seconds", type=float, default=compiling.seconds,
                       help="longest compile of one constraint; a longer one is stopped and "
                            f"answered with an error (default {compiling.seconds:g})")
    serve.add_argument("--max-compile-memory", type=int, default=compiling.memory_mb, metavar="MIB",
                       help="memory one constraint compile may take, in MiB "
                            f"(default {compiling.memory_mb})")
    serve.add_argument("--max-automaton-states", type=int, default=compiling.states,
                       help="states of one constraint automaton (default "
                            f"{compiling.states}, or $LMQ_MAX_STATES)")
    serve.add_argument("--max-grammar-rules", type=int, default=compiling.grammar_rules,
                       help="rules of one GBNF grammar (default "
                            f"{compiling.grammar_rules}, or $LMQ_MAX_GRAMMAR_RULES)")
    serve.add_argument("--compile-workers", type=int, default=compiling.workers,
                       help="constraint compiles running at once, each in a process of its "
                            f"own; one per connection at a time (default {compiling.workers})")


def backend_arguments(extra: list[str]) -> dict[str, Any]:
    """`--key value` pairs (or `--key=value`, or a bare `--flag` for True) → kwargs."""
    kwargs: dict[str, Any] = {}
    items = list(extra)
    while items:
        item = items.pop(0)
        if not item.startswith("--") or len(item) == 2:
            raise QueryArgumentError(f"serve-model: unexpected argument {item!r} (backend arguments "
                                     "are --key value)")
        key, equals, text = item[2:].partition("=")
        if not key.isidentifier():
            raise QueryArgumentError(f"serve-model: {item!r} is not a backend argument name")
        if not equals:
            text = items.pop(0) if items and not items[0].startswith("--") else "True"
        kwargs[key] = literal_or_text(text)
    return kwargs


def _addresses(host: str, port: int) -> list[tuple]:
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise QueryArgumentError(f"serve-model: cannot resolve --host {host!r}: "
                                 f"{getattr(e, 'strerror', None) or e}") from None


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _check_exposure(options: argparse.Namespace) -> None:
    """A server reachable from other machines needs a token, or the operator's explicit
    `--insecure-no-token`: a host is loopback when every address it resolves to is."""
    if options.token or options.insecure_no_token:
        return
    port = min(max(options.port, 0), 65535)
    if all(_is_loopback(address[4][0]) for address in _addresses(options.host, port)):
        return
    raise QueryArgumentError(f"serve-model: --host {options.host} is reachable from other "
                             "machines: pass --token SECRET (clients then send it), or "
                             "--insecure-no-token to serve it to anyone who can connect")


def _check_address(host: str, port: int) -> None:
    """Refuse an address the server could not listen on before any model is loaded (a
    model takes seconds to minutes to load): a port out of range, a host that does not
    resolve, a port another process holds."""
    if not 0 <= port <= 65535:
        raise QueryArgumentError(f"serve-model: --port must be from 0 to 65535 (0 picks a free "
                                 f"one), not {port}")
    for family, kind, protocol, _, address in _addresses(host, port):
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                raise QueryArgumentError(f"serve-model: cannot listen on {host}:{port}: "
                                         f"{e.strerror}") from None


def serve_model(options: argparse.Namespace, extra: list[str]) -> int:
    """Load the model, then serve until SIGINT/SIGTERM; 0 on a clean shutdown."""
    from lmq.serve.models import ModelRegistry
    from lmq.serve.protocol import Limits
    from lmq.serve.server import LmtpServer

    if options.model is not None and ":" not in options.model:
        raise QueryArgumentError(f"serve-model: {options.model!r} is not a model id (llama.cpp:PATH.gguf "
                                 "or transformers:DIR): name the model first, or write backend "
                                 "arguments as --key=value")
    if not options.model and not options.models_dir:
        raise QueryArgumentError("serve-model: nothing to serve: name a MODEL, or --models-dir "
                                 "DIR to serve the .gguf files in DIR")
    if options.static and options.models_dir:
        raise QueryArgumentError("serve-model: --static serves MODEL only, --models-dir more: "
                                 "pick one")
    if options.models_dir and not os.path.isdir(options.models_dir):
        raise QueryArgumentError(f"serve-model: --models-dir {options.models_dir!r} is not a "
                                 "directory")
    for name in ("slots", "max_models", "max_frame_bytes", "max_streams", "max_tokens",
                 "max_compile_memory", "max_automaton_states", "max_grammar_rules",
                 "compile_workers"):
        if getattr(options, name) < 1:
            raise QueryArgumentError(f"serve-model: --{name.replace('_', '-')} must be at least 1")
    if not options.max_compile_seconds > 0:
        raise QueryArgumentError("serve-model: --max-compile-seconds must be more than 0")
    _check_exposure(options)
    _check_address(options.host, options.port)
    compile_limits = CompileLimits(seconds=options.max_compile_seconds,
                                   memory_mb=options.max_compile_memory,
                                   states=options.max_automaton_states,
                                   grammar_rules=options.max_grammar_rules,
                                   workers=options.compile_workers)
    registry = ModelRegistry(backend_arguments(extra), slots=options.slots,
                             max_models=options.max_models, models_dir=options.models_dir,
                             compile_limits=compile_limits)
    if options.insecure_no_token and not options.token:
        print(f"lmq serve-model: WARNING: no --token: anyone who can reach {options.host} can "
              "use the served models", file=sys.stderr, flush=True)
    ready = ""
    if options.model:
        print(f"lmq serve-model: loading {options.model}", file=sys.stderr, flush=True)
        worker = registry.load(options.model)
        ready = f"serving {worker.model_id}, "
    if options.models_dir:
        ready += f"serving the .gguf files in {registry.models_dir}, "
    limits = Limits(max_frame_bytes=options.max_frame_bytes, max_streams=options.max_streams,
                    max_tokens=options.max_tokens)
    server = LmtpServer(registry, host=options.host, port=options.port, token=options.token,
                        limits=limits)
    try:
        asyncio.run(server.run(ready))
    except OSError as e:
        registry.stop()
        raise QueryArgumentError(f"serve-model: cannot listen on {options.host}:{options.port}: "
                                 f"{e.strerror}") from None
    return 0
