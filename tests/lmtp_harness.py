"""A real `lmq serve-model` subprocess and a raw LMTP client written from the spec (text
frames `TYPE JSON`, as an LMQL 0.7 client speaks), shared by the server tests."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time

from websockets.sync.client import connect

from subprocess_env import lmq_env

READY_TIMEOUT = 120


class ServerProcess:
    """`lmq serve-model MODEL --port 0 …`; `url` once it says it listens."""

    def __init__(self, model_id: str | None, *args: str, cwd: str | None = None, wait: bool = True):
        """`model_id` None: a server that loads models on demand only."""
        command = [sys.executable, "-m", "lmq.cli", "serve-model", *([model_id] if model_id else []),
                   "--port", "0", *args]
        env = lmq_env(OMP_WAIT_POLICY="PASSIVE")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=cwd, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []          # stderr lines so far (drained, so it never blocks)
        threading.Thread(target=self._read, daemon=True).start()
        self._log_reader = threading.Thread(target=self._read_log, daemon=True)
        self._log_reader.start()
        self.url = self.wait_ready() if wait else None

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        """The server's ws:// URL once it says it listens (the model is loaded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if "listening on ws://" in line:
                self.url = line.strip().rsplit(" ", 1)[-1]
                return self.url
        self.kill()
        self._log_reader.join(10)
        raise RuntimeError(f"server did not start: {''.join(self.log)}")

    def terminate(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        self._log_reader.join(10)                # the log is complete
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


class RawClient:
    """A minimal LMTP client on one websocket: send frames, collect elements per stream."""

    def __init__(self, url: str, **options):
        self.ws = connect(url, proxy=None, compression=None, open_timeout=30, legacy=True, **options)

    def send(self, kind: str, payload) -> None:
        self.ws.send(f"{kind} {json.dumps(payload)}")

    def frame(self, timeout: float = 60) -> tuple[str, list[dict]]:
        kind, _, body = self.ws.recv(timeout=timeout).partition(" ")
        elements = json.loads(body)
        assert isinstance(elements, list), body
        return kind, elements

    def stream(self, stream_id: int, timeout: float = 120) -> list[dict]:
        """Every element of `stream_id` until its last (finish_reason or error); elements
        of other streams are ignored."""
        deadline = time.monotonic() + timeout
        collected = []
        while True:
            _, elements = self.frame(max(deadline - time.monotonic(), 0.1))
            for element in elements:
                if element.get("stream_id") != stream_id:
                    continue
                collected.append(element)
                if element.get("finish_reason") is not None or "error" in element:
                    return collected

    def generate(self, model: str, prompt: list[int], stream_id: int = 1, **fields) -> list[dict]:
        self.send("GENERATE", {"model": model, "prompt": prompt, "stream_id": stream_id, **fields})
        return self.stream(stream_id)

    def close(self) -> None:
        self.ws.close()
