"""A small W3C WebDriver client over HTTP (the standard library only), for driving
Debian's headless Chromium through chromedriver in the playground tests."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"     # the W3C key of an element reference
CTRL, NULL, BACKSPACE = "\ue009", "\ue000", "\ue003"


def chromium_paths() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) on the PATH, else None each."""
    return shutil.which("chromium"), shutil.which("chromedriver")


class WebDriverError(Exception):
    pass


class Browser:
    """A headless Chromium session; `quit()` ends it and its driver."""

    def __init__(self, chromium: str, chromedriver: str, width: int = 1500, height: int = 950):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._driver = subprocess.Popen([chromedriver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self._base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._request("GET", "/status")["ready"]:
                    break
            except (OSError, WebDriverError):
                pass
            if time.monotonic() > deadline:
                self._driver.kill()
                raise WebDriverError("chromedriver did not start")
            time.sleep(0.2)
        options = {"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                                 "--disable-dev-shm-usage", f"--window-size={width},{height}"]}
        capabilities = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self._session = "/session/" + self._request("POST", "/session", capabilities)["sessionId"]

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as e:
            raise WebDriverError(e.read().decode(errors="replace")) from None

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        return self._request(method, self._session + path, body)

    def get(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def execute(self, script: str, *args: Any) -> Any:
        """Run `script` (a function body; `arguments` holds args) in the page."""
        return self._call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> dict[str, str]:
        return self._call("POST", "/element", {"using": "css selector", "value": css})

    def click(self, css: str) -> None:
        self._call("POST", f"/element/{self.find(css)[ELEMENT]}/click", {})

    def type(self, css: str, text: str) -> None:
        """Key presses into an element, as a person types them."""
        self._call("POST", f"/element/{self.find(css)[ELEMENT]}/value", {"text": text})

    def wait(self, script: str, timeout: float = 60, *args: Any) -> Any:
        """Poll `script` until it returns something truthy; that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.execute(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for: {script}")
            time.sleep(0.1)

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", "/screenshot")))

    def quit(self) -> None:
        try:
            self._call("DELETE", "")
        finally:
            self._driver.terminate()
            self._driver.wait(10)
