"""A small client for a running ComfyUI server: queue API-format graphs (POST /prompt), follow
their progress (/ws), wait for them (/history), download what they wrote (/view).

Standard library only, plus websocket-client for live progress (ComfyUI installs it; without
it progress falls back to polling). Used by demo.py and batch.py.
"""
from __future__ import annotations

import json
import queue
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class PromptRejected(Exception):
    """POST /prompt answered 400: the graph did not validate (unknown node, bad value, missing file)."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(describe_rejection(body))


def describe_rejection(body: dict) -> str:
    err = body.get("error", {}) if isinstance(body, dict) else {}
    parts = [err.get("message", "") if isinstance(err, dict) else str(err)]
    if isinstance(err, dict) and err.get("details"):
        parts.append(err["details"])
    for nid, ne in (body.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p)


@dataclass
class Result:
    """A finished prompt: status 'success' or 'error', its outputs and, on error, the message."""
    prompt_id: str
    status: str
    outputs: dict = field(default_factory=dict)
    error: str | None = None
    error_node: str | None = None
    history: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def files(self, kinds=("images", "latents", "gifs", "audio", "3d")) -> list[tuple[str, dict]]:
        """(node id, {"filename", "subfolder", "type"}) of every file the outputs name."""
        out = []
        for nid, node_out in self.outputs.items():
            for key, items in node_out.items():
                if kinds is not None and key not in kinds:
                    continue
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        out.append((nid, item))
        return out

    def texts(self) -> dict[str, list[str]]:
        """Text outputs per node (e.g. what PaRa Save / PaRa Export LoRA / PaRa Trainer report)."""
        return {nid: [str(t) for t in o.get("text", [])] for nid, o in self.outputs.items() if o.get("text")}


class Client:
    """One ComfyUI server. client_id ties /ws progress messages to the prompts queued here."""

    def __init__(self, url: str, timeout: float = 30.0):
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex
        self._ws = None

    # ---- HTTP -------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body=None, timeout: float | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float | None = None):
        return self._request("GET", path, timeout=timeout)

    def alive(self) -> bool:
        try:
            self.get("/system_stats", timeout=5)
            return True
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self.get("/object_info", timeout=120)
        return self.get("/object_info/" + urllib.parse.quote(node_class)).get(node_class, {})

    def queue(self, graph: dict) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected when ComfyUI refuses the graph."""
        body = {"prompt": graph, "client_id": self.client_id}
        try:
            out = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": {"message": raw.decode(errors="replace")}}
            if e.code == 400:
                raise PromptRejected(payload) from None
            raise RuntimeError(f"{self.url}: POST /prompt answered {e.code}: {describe_rejection(payload)}") from None
        return out["prompt_id"]

    def result(self, prompt_id: str) -> Result | None:
        """The finished prompt, or None while it is queued or running."""
        entry = self.get(f"/history/{urllib.parse.quote(prompt_id)}").get(prompt_id)
        if entry is None:
            return None
        status = (entry.get("status") or {}).get("status_str") or "success"
        error = node = None
        for msg in (entry.get("status") or {}).get("messages", []):
            if isinstance(msg, list) and len(msg) == 2 and msg[0] in ("execution_error", "execution_interrupted"):
                d = msg[1]
                node = d.get("node_id")
                if msg[0] == "execution_interrupted":
                    error = "interrupted"
                else:
                    error = f"{d.get('node_type')} (node {node}): {str(d.get('exception_message', '')).strip()}"
        return Result(prompt_id, status, entry.get("outputs", {}), error, node, entry)

    def wait(self, prompt_id: str, timeout: float | None = None, poll: float = 0.25, on_event=None) -> Result:
        """Wait for a prompt to finish. on_event(event) gets the /ws progress of this prompt
        (see Events) when websocket-client is installed."""
        events = self.events() if on_event else None

        def deliver():
            for ev in events.drain() if events is not None else ():
                if ev.get("prompt_id") in (None, prompt_id):
                    on_event(ev)

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            deliver()
            res = self.result(prompt_id)
            if res is not None:
                deliver()
                return res
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}: prompt {prompt_id} not finished after {timeout} s")
            time.sleep(poll)

    def run(self, graph: dict, timeout: float | None = None, on_event=None) -> Result:
        """Open /ws (if wanted), queue, wait."""
        if on_event:
            self.events()  # connect before queueing so no message is missed
        return self.wait(self.queue(graph), timeout=timeout, on_event=on_event)

    def interrupt(self):
        self._request("POST", "/interrupt", {})

    def download(self, item: dict, dest: Path) -> Path:
        """GET /view of one output file ({"filename", "subfolder", "type"}) into dest."""
        q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": item.get("type", "output")})
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{self.url}/view?{q}", timeout=120) as resp:
            dest.write_bytes(resp.read())
        return dest

    # ---- progress ---------------------------------------------------------------------------

    def events(self) -> "Events | None":
        """The /ws listener of this client (started on first use); None without websocket-client."""
        if self._ws is None:
            try:
                self._ws = Events(self.url, self.client_id)
            except ImportError:
                self._ws = False
            except OSError:
                self._ws = False
        return self._ws or None

    def close(self):
        if self._ws:
            self._ws.close()
        self._ws = None


class Events:
    """/ws messages for one client id, decoded into dicts with a "type":
    executing {node, prompt_id}, progress {value, max, node, prompt_id}, executed, execution_*,
    and progress_text {node, text} (the binary text frames, e.g. PaRa Trainer's loss line)."""

    def __init__(self, url: str, client_id: str):
        import websocket  # websocket-client; ImportError handled by Client.events
        ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={client_id}"
        self._ws = websocket.create_connection(ws_url, timeout=10)
        self._ws.settimeout(0.5)
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="comfy-ws", daemon=True)
        self._thread.start()

    def _loop(self):
        import websocket
        while not self._stop.is_set():
            try:
                msg = self._ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception:
                break
            ev = self._decode(msg)
            if ev is not None:
                self._q.put(ev)

    @staticmethod
    def _decode(msg):
        if isinstance(msg, bytes):
            if len(msg) < 8 or struct.unpack(">I", msg[:4])[0] != 3:  # 3: TEXT
                return None
            n = struct.unpack(">I", msg[4:8])[0]
            return {"type": "progress_text", "node": msg[8:8 + n].decode(errors="replace"),
                    "text": msg[8 + n:].decode(errors="replace")}
        try:
            m = json.loads(msg)
        except ValueError:
            return None
        return dict(m.get("data") or {}, type=m.get("type"))

    def drain(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._ws.close()
        except Exception:
            pass
