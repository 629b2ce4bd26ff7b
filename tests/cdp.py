"""A minimal Chrome DevTools Protocol client for the browser test: start headless Chromium
(Debian's `chromium`), open a page, evaluate JavaScript, collect console errors, take
screenshots. Uses websocket-client (already a test dependency), so no webdriver is needed.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class CDPError(RuntimeError):
    pass


class Browser:
    """Headless Chromium with one page, driven over the DevTools websocket.

        with Browser(width=1400, height=860) as b:
            b.navigate("http://127.0.0.1:8188/")
            b.wait_for("window.app && window.app.graph")
            png = b.screenshot()
    """

    def __init__(self, width: int = 1400, height: int = 860, binary: str | None = None):
        import websocket  # websocket-client
        self.binary = binary or find_chromium()
        if not self.binary:
            raise FileNotFoundError("Chromium not found (apt-get install chromium)")
        self.profile = Path(tempfile.mkdtemp(prefix="para-chromium-"))
        self.proc = subprocess.Popen(
            [self.binary, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        port = self._devtools_port()
        page_ws = None
        deadline = time.monotonic() + 30
        while page_ws is None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                targets = json.loads(r.read())
            page_ws = next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
            if page_ws is None:
                if time.monotonic() > deadline:
                    raise CDPError("Chromium opened no page")
                time.sleep(0.2)
        self.ws = websocket.create_connection(page_ws, timeout=60, suppress_origin=True)
        self._ids = itertools.count(1)
        self._replies: dict[int, dict] = {}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def _devtools_port(self) -> int:
        marker = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while True:
            if marker.exists():
                text = marker.read_text().split("\n")
                if text and text[0].strip().isdigit():
                    return int(text[0])
            if self.proc.poll() is not None:
                raise CDPError(f"Chromium exited with code {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise CDPError("Chromium did not open its DevTools port in 30 s")
            time.sleep(0.1)

    def _read(self):
        while not self._closed:
            try:
                raw = self.ws.recv()
            except Exception:
                break
            if not raw:
                continue
            msg = json.loads(raw)
            with self._cond:
                if "id" in msg:
                    self._replies[msg["id"]] = msg
                else:
                    self.events.append(msg)
                self._cond.notify_all()

    def call(self, method: str, params: dict | None = None, timeout: float = 60) -> dict:
        mid = next(self._ids)
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        with self._cond:
            while mid not in self._replies:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CDPError(f"{method}: no answer in {timeout} s")
                self._cond.wait(left)
            msg = self._replies.pop(mid)
        if "error" in msg:
            raise CDPError(f"{method}: {msg['error']}")
        return msg.get("result", {})

    def evaluate(self, expression: str, timeout: float = 60):
        """Evaluate JavaScript (awaiting a promise) and return its JSON value."""
        res = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True, "timeout": int(timeout * 1000)}, timeout=timeout)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text")
            raise CDPError(f"JavaScript error: {text}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression, timeout=10)
            except CDPError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} not true after {timeout} s")
            time.sleep(poll)

    def navigate(self, url: str):
        self.call("Page.navigate", {"url": url})

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def console_errors(self, since: int = 0) -> list[str]:
        """Console errors, uncaught exceptions and browser log errors seen since event index
        `since` (use len(browser.events) as a mark)."""
        out = []
        with self._cond:
            events = list(self.events[since:])
        for e in events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                d = p.get("exceptionDetails", {})
                out.append("exception: " + str((d.get("exception") or {}).get("description") or d.get("text")))
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                entry = p["entry"]
                out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
        return out

    def close(self):
        self._closed = True
        try:
            self.ws.close()
        except Exception:
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
