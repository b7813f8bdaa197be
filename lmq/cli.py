"""The `lmq` command: `lmq run FILE.lmq`, `lmq compile FILE.lmq`, `lmq trace show FILE`,
`lmq serve-model`, `lmq playground`, `lmq install-llama-server` and `lmq llama-server
MODEL.gguf`.

Exit codes: 0 success, 1 query error (syntax, constraint, context, model, an exception
of the query's own code), 2 usage error. User errors print a message, never a traceback.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
import traceback
from typing import Any, Sequence

from lmq.compiler.codegen import compile_query
from lmq.compiler.nesting import literal_or_text
from lmq.engines.command import add_parsers as add_engine_parsers, install_llama_server, run_llama_server
from lmq.errors import LmqError, LmqSyntaxError, QueryArgumentError
from lmq.playground.command import add_parser as add_playground_parser, run_playground
from lmq.runtime.hole import grammar_listing
from lmq.runtime.query import Model, QueryFunction, run_sync_coroutine
from lmq.runtime.result import LMQResult
from lmq.runtime.trace import trace_failure
from lmq.serve.command import add_parser as add_serve_parser, serve_model
from lmq.trace_table import TraceFileError, read_trace, render


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmq", description="Run LMQL-language queries on local models.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a .lmq query file")
    run.add_argument("file")
    run.add_argument("--model", help="model id (default: the query's from clause, $LMQ_MODEL, "
                                     "or the embedded SmolLM2)")
    run.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                     help="a query parameter; VALUE is a Python literal or else a string")
    run.add_argument("--model-arg", action="append", default=[], metavar="NAME=VALUE",
                     help="a keyword of the model, e.g. n_gpu_layers=-1 or n_ctx=8192 (VALUE as "
                          "for --arg)")
    run.add_argument("--decoder", help="decoder, e.g. 'argmax(max_len=256)'")
    run.add_argument("--json", action="store_true", help="print the result as JSON")
    run.add_argument("--trace", metavar="OUT.jsonl",
                     help="write the run's trace: one JSON event per line, as it runs (see "
                          "'lmq trace show')")
    compile_ = commands.add_parser("compile", help="show the compiled program of a .lmq file")
    compile_.add_argument("file")
    compile_.add_argument("--gbnf", action="store_true", help="print per-hole GBNF grammars")
    trace = commands.add_parser("trace", help="read a trace written by 'lmq run --trace'")
    trace_commands = trace.add_subparsers(dest="trace_command", required=True)
    show = trace_commands.add_parser("show", help="print a trace as a per-token table")
    show.add_argument("file")
    show.add_argument("--top", type=int, default=3, metavar="K",
                      help="alternatives shown before and after the mask (default 3)")
    add_serve_parser(commands)
    add_playground_parser(commands)
    add_engine_parsers(commands)
    return parser


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return _decode(f.read(), path)
    except FileNotFoundError:
        raise _UsageError(f"query file not found: {path}") from None
    except OSError as e:
        raise _UsageError(f"cannot read {path}: {e.strerror}") from None


_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _decode(data: bytes, path: str) -> str:
    """A query file's text: UTF-8, or with a byte-order mark UTF-8 or UTF-16 (as Windows
    editors and PowerShell write it). Anything else is an error at the first byte that is
    not text: a NUL (a binary file, or UTF-16 without a mark) or invalid UTF-8."""
    encoding = "utf-8"
    for bom, codec in _BOMS:
        if data.startswith(bom):
            data, encoding = data[len(bom):], codec
            break
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise _not_text(data, e.start, encoding, f"not {encoding.upper()} text ({e.reason}, byte "
                        f"{data[e.start]:#04x}); save the file as UTF-8", path) from None
    if encoding == "utf-8" and "\x00" in text:
        raise _not_text(data, data.index(b"\x00"), encoding, "a NUL byte: a binary file, or "
                        "UTF-16 without a byte-order mark; save the file as UTF-8", path)
    return text


def _not_text(data: bytes, offset: int, encoding: str, message: str, path: str) -> LmqSyntaxError:
    """The error at byte `offset`, placed by the text before it."""
    before = data[:offset].decode(encoding, "replace")
    line_start = before.rfind("\n") + 1
    return LmqSyntaxError(message, filename=path, line=before.count("\n") + 1,
                          column=len(before) - line_start + 1)


def _arguments(pairs: list[str], flag: str = "--arg") -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        name, equals, text = pair.partition("=")
        if not equals or not name.isidentifier():
            raise _UsageError(f"{flag} expects NAME=VALUE, got {pair!r}")
        values[name] = literal_or_text(text)
    return values


def _run(options: argparse.Namespace) -> int:
    try:
        program = compile_query(_read(options.file), options.file)
    except LmqError as error:
        if options.trace:
            trace_failure(options.trace, error)
        raise
    query = QueryFunction(program, {}, name=options.file)
    kwargs = _arguments(options.arg)
    if options.trace:
        kwargs["trace"] = options.trace
    for key, value in (("model", options.model), ("decoder", options.decoder)):
        if value:
            kwargs[key] = value
    model_arguments = _arguments(options.model_arg, "--model-arg")
    if model_arguments:
        if not options.model and program.model is not None:
            raise _UsageError("--model-arg applies to the model of --model: this query names its "
                              "model in a from clause, so name it with --model too")
        kwargs["model"] = Model(options.model, **model_arguments)
    streaming = sys.stdout.isatty() and not options.json
    on_text = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if streaming else None
    returned = run_sync_coroutine(query.run(on_text=on_text, **kwargs))
    sys.set_int_max_str_digits(0)   # an INT value may be longer than Python's 4,300-digit str limit
    results = returned if isinstance(returned, list) and returned \
        and all(isinstance(r, LMQResult) for r in returned) else None
    if options.json:
        if results is not None:
            payload = [r.to_json() for r in results]
        else:
            payload = returned.to_json() if isinstance(returned, LMQResult) else {"return": _jsonable(returned)}
        print(json.dumps(payload, ensure_ascii=False, indent=2))
        return 0
    if results is not None:
        for number, result in enumerate(results, 1):
            print(f"{'=' * 15} result {number} of {len(results)} (logprob {result.logprob:.4f})")
            sys.stdout.write(result.prompt)
            print("\n" + "-" * 40)
            _print_variables(result)
    elif isinstance(returned, LMQResult):
        if not streaming:
            sys.stdout.write(returned.prompt)
        print("\n" + "-" * 40)
        _print_variables(returned)
    else:
        if streaming:
            print("\n" + "-" * 40)
        print(returned)
    return 0


def _print_variables(result: LMQResult) -> None:
    """Each variable; a distribution `P(VAR)` as one line per value, the most likely
    marked with `*` (its log-probabilities are in --json)."""
    for name, value in result.variables.items():
        if name.startswith("log P("):
            continue
        if name.startswith("P(") and isinstance(value, list):
            best = max(range(len(value)), key=lambda i: value[i][1])
            print(f"{name}:")
            for i, (option, probability) in enumerate(value):
                print(f"  {'*' if i == best else ' '} {option!r}: {probability:.4f}")
        else:
            print(f"{name} = {value!r}")


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return repr(value)


def _compile(options: argparse.Namespace) -> int:
    program = compile_query(_read(options.file), options.file)
    if options.gbnf:
        for hole in program.holes:
            print(grammar_listing(hole), end="")
        return 0
    print(f"# parameters: {', '.join(program.free_names) or '(none)'}")
    if program.decoder:
        print(f"# decoder: {program.decoder.name}")
    for hole in program.holes:
        where = hole.where.source if hole.where else "(none)"
        print(f"# hole {hole.index}: {hole.name} (line {hole.line}) where {where}")
    print(program.python)
    return 0


def _trace(options: argparse.Namespace) -> int:
    if options.top < 0:
        raise _UsageError(f"--top must be >= 0, not {options.top}")
    try:
        with open(options.file, encoding="utf-8") as f:
            for line in render(read_trace(f, options.file), options.top):
                print(line)
    except FileNotFoundError:
        raise _UsageError(f"trace file not found: {options.file}") from None
    except UnicodeDecodeError as e:
        raise TraceFileError(f"{options.file}: not UTF-8 text ({e.reason})") from None
    except BrokenPipeError:
        raise
    except OSError as e:
        raise _UsageError(f"cannot read {options.file}: {e.strerror}") from None
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options, extra = parser.parse_known_args(argv)
    if extra and options.command not in ("serve-model", "llama-server"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if options.command == "serve-model":
            return serve_model(options, extra)
        if options.command == "llama-server":
            return run_llama_server(options, extra)
        return {"run": _run, "compile": _compile, "trace": _trace, "playground": run_playground,
                "install-llama-server": install_llama_server}[options.command](options)
    except _UsageError as e:
        print(f"lmq: {e}", file=sys.stderr)
        return 2
    except QueryArgumentError as e:
        print(f"lmq: {e}", file=sys.stderr)
        return 2
    except LmqError as e:
        print(f"lmq: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:             # `lmq compile … | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        if options.command != "run" or frames[-1].filename != options.file:
            raise                       # not the query's own code: lmq's, a library's
        print(f"lmq: {type(e).__name__} in the query: {e}", file=sys.stderr)
        lines = [f"  {f.filename}, line {f.lineno}: {(f.line or '').strip()}"
                 for f in frames if f.filename == options.file]
        if len(lines) > 8:                  # a deep recursion: its ends
            lines[4:-4] = [f"  … {len(lines) - 8} more"]
        print("\n".join(lines), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
