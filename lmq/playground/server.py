"""The playground's HTTP server (the standard library's): the page and its assets from
static/, the examples, and a small JSON API: compile a query, run one (its trace events
stream back as JSON lines), stop it.

Running a query runs Python, so the server binds to loopback only and answers only
requests that a page it served could make: a `Host` of its own address (no DNS
rebinding), no foreign `Origin`, and JSON bodies (which other sites cannot send without
a CORS preflight this server never grants).
"""

from __future__ import annotations

import json
import mimetypes
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lmq.cli import _arguments, _UsageError
from lmq.errors import QueryArgumentError
from lmq.playground.runs import QueryRun, compiled_view
from lmq.runtime.trace import error_event

STATIC = Path(__file__).resolve().parent / "static"
#: the repository's examples/ (a source checkout, the README's editable install)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
MAX_BODY = 1 << 20
mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")


class PlaygroundServer(ThreadingHTTPServer):
    """Serves one page; runs one query at a time (a new run stops the one before)."""

    daemon_threads = True
    #: connections waiting to be accepted: a page loads its scripts, examples and compile
    #: at once, and past the default 5 a burst of them is reset
    request_queue_size = 64

    def __init__(self, port: int, model: Any = None, examples: Path = EXAMPLES):
        super().__init__(("127.0.0.1", port), _Handler)
        self.model = model
        self.examples = examples
        self._run: QueryRun | None = None
        self._runs_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def start_run(self, source: str, arguments: dict[str, Any]) -> QueryRun:
        with self._runs_lock:
            if self._run is not None and self._run.running:
                self._run.stop()
                self._run.join()
            self._run = QueryRun(source, arguments, self.model)
            self._run.start()
            return self._run

    def stop_run(self, run_id: str) -> bool:
        run = self._run
        if run is None or run.id != run_id:
            return False
        run.stop()
        return True

    def example_list(self) -> list[dict[str, str]]:
        if not self.examples.is_dir():
            return []
        return [{"name": p.name, "source": p.read_text(encoding="utf-8")}
                for p in sorted(self.examples.glob("*.lmq"))]


class _Handler(BaseHTTPRequestHandler):
    server: PlaygroundServer
    server_version = "lmq-playground"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the terminal shows the address and errors, not every request."""

    def do_GET(self) -> None:
        if not self._same_origin():
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/examples":
            self._json(self.server.example_list())
        elif path == "/":
            self._file(STATIC / "index.html")
        elif path.startswith("/static/"):
            target = (STATIC / path[len("/static/"):]).resolve()
            if STATIC in target.parents and target.is_file():
                self._file(target)
            else:
                self.send_error(404)
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        if not self._same_origin():
            return
        body = self._body()
        if body is None:
            return
        path = self.path.split("?", 1)[0]
        if path == "/api/compile":
            self._json(compiled_view(str(body.get("source", ""))))
        elif path == "/api/stop":
            self._json({"stopped": self.server.stop_run(str(body.get("id", "")))})
        elif path == "/api/run":
            self._stream_run(str(body.get("source", "")), body.get("arguments") or [])
        else:
            self.send_error(404)

    def _stream_run(self, source: str, argument_lines: list[str]) -> None:
        """The run's events as JSON lines, written as they come; a page that goes away
        stops its run."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            arguments = _arguments([str(line) for line in argument_lines if str(line).strip()])
        except _UsageError as e:
            self._line(error_event(QueryArgumentError(str(e))))
            self._line({"event": "end"})
            return
        run = self.server.start_run(source, arguments)
        try:
            self._line({"event": "run", "id": run.id})
            for event in run.events():
                self._line(event)
        except (BrokenPipeError, ConnectionResetError):
            run.stop()

    def _line(self, event: dict[str, Any]) -> None:
        self.wfile.write(json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n")
        self.wfile.flush()

    def _same_origin(self) -> bool:
        port = self.server.server_address[1]
        hosts = {f"127.0.0.1:{port}", f"localhost:{port}"}
        origin = self.headers.get("Origin")
        if self.headers.get("Host") not in hosts or (origin is not None and origin.removeprefix("http://") not in hosts):
            self.send_error(403, "the playground answers only its own page on 127.0.0.1")
            return False
        return True

    def _body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        if not self.headers.get("Content-Type", "").startswith("application/json") or length > MAX_BODY:
            self.send_error(415 if length <= MAX_BODY else 413)
            return None
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict):
            self.send_error(400, "a JSON object was expected")
            return None
        return body

    def _json(self, payload: Any) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _file(self, path: Path) -> None:
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
