"""A llama-server process on one model: started, waited for until its `/health` says the
model is loaded, and stopped (SIGTERM, then SIGKILL if it lingers). `lmq llama-server`
and the tests run engines through this."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import IO, Sequence

from lmq.engines.binary import require_binary
from lmq.errors import ModelError

#: seconds a model may take to load before the start counts as failed
LOAD_TIMEOUT = 300.0
_PR_SET_PDEATHSIG = 1
#: seconds llama-server gets to exit after SIGTERM before it is killed
STOP_GRACE = 10.0


def _die_with_parent() -> None:
    """In the child: SIGTERM when the process that started it dies, even by SIGKILL, so
    no orphaned llama-server keeps a port and memory (Linux; elsewhere nothing). Linux
    ties this to the starting thread: start a server from a thread that outlives it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class LlamaServer:
    """One llama-server child process serving `model` on http://host:port."""

    def __init__(self, model: str, *, host: str = "127.0.0.1", port: int = 0,
                 arguments: Sequence[str] = (), log: IO | int | None = subprocess.DEVNULL,
                 binary: str | None = None):
        if not os.path.isfile(model):
            raise ModelError(f"model file not found: {model}")
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        command = [binary or require_binary(), "-m", model, "--host", host,
                   "--port", str(self.port), *arguments]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT
                                        if log not in (None, subprocess.DEVNULL) else log,
                                        stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def wait_ready(self, timeout: float = LOAD_TIMEOUT) -> None:
        """Return once `/health` answers 200 (the model is loaded); a ModelError if the
        process exits or the model is not loaded within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelError(f"llama-server exited with status {self.process.returncode} "
                                 f"before serving on {self.url}")
            if self.healthy():
                return
            time.sleep(0.1)
        self.stop()
        raise ModelError(f"llama-server did not load its model within {timeout:.0f} s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                return answer.status == 200 and json.load(answer).get("status") == "ok"
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> int:
        """Stop the server (SIGTERM, SIGKILL after `STOP_GRACE` s); its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *_exc) -> None:
        self.stop()
