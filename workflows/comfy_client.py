"""A small client for a running ComfyUI server: queue API-format graphs (POST /prompt), follow
their progress (/ws), wait for them (/history), download what they wrote (/view).

Standard library only, so it runs in any ComfyUI's Python: ComfyUI 0.3.64 does not install
websocket-client, so /ws is read by the small RFC 6455 client below (WebSocket) rather than
depend on it; should /ws not answer, waiting falls back to polling /history (without the live
progress). Used by demo.py and batch.py.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import socket
import ssl
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
    node_errors: dict = field(default_factory=dict)

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
        self.ws_error: str | None = None
        self.last_node_errors: dict = {}

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
        """POST /prompt; returns the prompt id. Raises PromptRejected when ComfyUI refuses the graph.
        When only some outputs fail validation ComfyUI still queues the others and answers 200:
        their errors are in self.last_node_errors ({} when every output is valid)."""
        body = {"prompt": graph, "client_id": self.client_id}
        self.last_node_errors = {}
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
        self.last_node_errors = out.get("node_errors") or {}
        return out["prompt_id"]

    def queue_ids(self) -> tuple[list[str], list[str]]:
        """(running, pending) prompt ids of the server's queue (GET /queue)."""
        q = self.get("/queue", timeout=10)
        return ([item[1] for item in q.get("queue_running", [])],
                [item[1] for item in q.get("queue_pending", [])])

    def delete_queued(self, prompt_ids: list[str]):
        """Remove pending prompts from the queue (POST /queue {"delete": ids}); a running one stays."""
        self._request("POST", "/queue", {"delete": list(prompt_ids)}, timeout=10)

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
        (see Events) while /ws answers."""
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
        """Open /ws (if wanted), queue, wait. The result's node_errors are the outputs ComfyUI
        dropped at validation (see queue)."""
        if on_event:
            self.events()  # connect before queueing so no message is missed
        prompt_id = self.queue(graph)
        node_errors = self.last_node_errors
        res = self.wait(prompt_id, timeout=timeout, on_event=on_event)
        res.node_errors = node_errors
        return res

    def interrupt(self, prompt_id: str | None = None):
        """POST /interrupt: stop the running prompt; with prompt_id only if that one is running."""
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {}, timeout=10)

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
        """The /ws listener of this client (started on first use); None when /ws does not answer
        (then wait() polls /history and gets no progress; ws_error says why)."""
        if self._ws is None:
            try:
                self._ws = Events(self.url, self.client_id)
            except (OSError, WebSocketError) as e:
                self._ws = False
                self.ws_error = f"{type(e).__name__}: {e}"
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
        ws_url = url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws?clientId={client_id}"
        self._ws = WebSocket(ws_url, timeout=10)
        self._ws.settimeout(0.5)
        self._q: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="comfy-ws", daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                msg = self._ws.recv()
            except socket.timeout:
                continue
            except Exception:
                break
            if msg is None:  # the server closed the connection
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


# ------------------------------------------------------------------------------------------
# A minimal WebSocket client (RFC 6455): what reading ComfyUI's /ws needs, nothing more
# ------------------------------------------------------------------------------------------

class WebSocketError(Exception):
    """The server did not accept the WebSocket handshake, or sent a malformed frame."""


_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


class WebSocket:
    """Connects (ws:// or wss://), receives text and binary messages (reassembling fragments,
    answering pings), and closes. recv() returns str, bytes, or None once the server has closed;
    a socket timeout (settimeout) raises socket.timeout and loses nothing already received."""

    def __init__(self, url: str, timeout: float = 10.0):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("ws", "wss") or not u.hostname:
            raise WebSocketError(f"{url!r} is not a ws:// or wss:// URL")
        port = u.port or (443 if u.scheme == "wss" else 80)
        sock = socket.create_connection((u.hostname, port), timeout=timeout)
        if u.scheme == "wss":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        self._sock = sock
        self._buf = b""
        self._parts: list[bytes] = []
        self._opcode = 0
        self._lock = threading.Lock()  # sends (pong, close) may come from two threads
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self._buf:
            chunk = sock.recv(4096)
            if not chunk:
                raise WebSocketError(f"{url}: the server closed the connection during the handshake")
            self._buf += chunk
            if len(self._buf) > 65536:
                raise WebSocketError(f"{url}: no end of the handshake answer in 64 kB")
        head, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        if len(lines[0].split()) < 2 or lines[0].split()[1] != "101":
            sock.close()
            raise WebSocketError(f"{url}: the server answered {lines[0]!r}, not 101 Switching Protocols")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        expect = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != expect:
            sock.close()
            raise WebSocketError(f"{url}: wrong Sec-WebSocket-Accept in the handshake answer")

    def settimeout(self, seconds: float | None):
        self._sock.settimeout(seconds)

    def _parse(self):
        """(fin, opcode, payload) of the first frame in the buffer, or None while it is incomplete."""
        b = self._buf
        if len(b) < 2:
            return None
        n, pos = b[1] & 0x7F, 2
        if n >= 126:
            size = 2 if n == 126 else 8
            if len(b) < 2 + size:
                return None
            n, pos = int.from_bytes(b[2:2 + size], "big"), 2 + size
        mask = b""
        if b[1] & 0x80:  # servers do not mask, but a masked frame is still readable
            mask, pos = b[pos:pos + 4], pos + 4
        if len(b) < pos + n or len(mask) not in (0, 4):
            return None
        payload = b[pos:pos + n]
        if mask:
            payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        self._buf = b[pos + n:]
        return bool(b[0] & 0x80), b[0] & 0x0F, payload

    def _frame(self):
        """The next frame, reading until it is complete (socket.timeout leaves the buffer intact)."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            chunk = self._sock.recv(65536)
            if not chunk:
                raise ConnectionError("the WebSocket connection was closed without a close frame")
            self._buf += chunk

    def _send(self, opcode: int, payload: bytes = b""):
        # a client masks every frame (RFC 6455 section 5.3)
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                         bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                         bytes([0x80 | 127]) + struct.pack(">Q", n))
        with self._lock:
            self._sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def recv(self):
        while True:
            fin, opcode, payload = self._frame()
            if opcode == 0x8:  # close: answer it
                try:
                    self._send(0x8, payload[:2])
                except OSError:
                    pass
                return None
            if opcode == 0x9:
                self._send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                self._opcode, self._parts = opcode, [payload]
            elif opcode == 0x0:
                self._parts.append(payload)
            else:
                raise WebSocketError(f"unknown WebSocket opcode {opcode}")
            if fin:
                data, self._parts = b"".join(self._parts), []
                return data.decode("utf-8", errors="replace") if self._opcode == 0x1 else data

    def close(self):
        try:
            self._send(0x8, struct.pack(">H", 1000))
        except OSError:
            pass
        try:
            self._sock.close()
        except OSError:
            pass
