"""A minimal W3C WebDriver client over the standard library, for headless Chromium via chromedriver.

Only what the station's browser test needs: navigate, find, click, type, run a script, drag the
mouse, take screenshots. Every wait is bounded.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
#: Flags for a quiet, private, disposable browser that talks to nothing but the page under test.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


class WebDriverError(RuntimeError):
    """The driver answered with an error."""


def chromium_binary() -> str | None:
    """Path of Debian's chromium (or chromium-browser), if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """chromedriver started on a loopback port, and one headless Chromium session."""

    def __init__(self, chromium: str, chromedriver: str, profile_dir: Path, log_path: Path):
        self.port = free_port()
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in quit()
        self.driver = subprocess.Popen(
            [chromedriver, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        self.session: str | None = None
        try:
            self._wait_ready(20)
            caps = {
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        "goog:chromeOptions": {
                            "binary": chromium,
                            "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}"],
                        },
                    }
                }
            }
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.quit()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, WebDriverError):
                pass
            if self.driver.poll() is not None:
                raise WebDriverError(f"chromedriver exited with {self.driver.returncode}")
            time.sleep(0.1)
        raise WebDriverError("chromedriver did not become ready")

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as exc:
            try:
                err = json.loads(exc.read())["value"]
                raise WebDriverError(f"{err.get('error')}: {err.get('message', '')[:500]}") from None
            except (ValueError, KeyError):
                raise WebDriverError(str(exc)) from None

    def cmd(self, method: str, path: str, body: Any = None) -> Any:
        """A command on this session."""
        return self._call(method, f"/session/{self.session}{path}", body)

    # -- conveniences --------------------------------------------------------------------------
    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str, attempts: int = 5) -> None:
        """Click the element ``css`` names; found again if the page re-rendered it in between."""
        for i in range(attempts):
            try:
                self.cmd("POST", f"/element/{self.find(css)}/click", {})
                return
            except WebDriverError as exc:
                if "stale element" not in str(exc) or i == attempts - 1:
                    raise
                time.sleep(0.1)

    def type(self, css: str, text: str) -> None:
        eid = self.find(css)
        self.cmd("POST", f"/element/{eid}/clear", {})
        self.cmd("POST", f"/element/{eid}/value", {"text": text})

    def upload(self, css: str, path: Path) -> None:
        """Choose a file in an ``<input type=file>`` (chromedriver sends the local path)."""
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": str(path)})

    def js(self, script: str, *args: Any) -> Any:
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait(self, what: str, cond: Callable[[], Any], timeout: float = 20, every: float = 0.2) -> Any:
        """Poll ``cond`` until truthy; fail naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = cond()
            except WebDriverError as exc:
                last = exc
            if last and not isinstance(last, Exception):
                return last
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")

    def drag(self, x0: float, y0: float, x1: float, y1: float, steps: int = 8) -> None:
        """Press the left button at (x0, y0), move to (x1, y1) in steps, release (viewport pixels)."""
        moves: list[dict[str, Any]] = [
            {"type": "pointerMove", "duration": 0, "x": round(x0), "y": round(y0), "origin": "viewport"},
            {"type": "pointerDown", "button": 0},
        ]
        for i in range(1, steps + 1):
            t = i / steps
            moves.append(
                {
                    "type": "pointerMove",
                    "duration": 30,
                    "x": round(x0 + (x1 - x0) * t),
                    "y": round(y0 + (y1 - y0) * t),
                    "origin": "viewport",
                }
            )
        moves.append({"type": "pointerUp", "button": 0})
        self.cmd(
            "POST",
            "/actions",
            {"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": moves}]},
        )
        self.cmd("DELETE", "/actions")

    def screenshot(self, path: Path) -> Path:
        png = base64.b64decode(self.cmd("GET", "/screenshot"))
        path.write_bytes(png)
        return path

    def quit(self) -> None:
        """End the browser session and the driver (bounded)."""
        try:
            if self.session:
                self.cmd("DELETE", "")
        except (OSError, WebDriverError):
            pass
        self.driver.terminate()
        try:
            self.driver.wait(10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
            self.driver.wait(5)
        self._log.close()
