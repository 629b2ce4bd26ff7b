"""One client for a running ComfyUI server: queue API-format graphs (POST /prompt), follow their
progress (/ws), wait for them (/history), download what they wrote (/view).

Built on aiohttp (a ComfyUI requirement, so it is in every ComfyUI's Python). The calls are
synchronous: each Client runs one event loop in a background thread, with one HTTP session and
at most one /ws connection, and every method waits for its request there. Used by the tests,
workflows/batch.py, workflows/demo.py and the benchmarks.

    client = Client("http://127.0.0.1:8188")
    result = client.run(graph, timeout=600, on_event=print)   # Result: .ok, .error, .files()
    with client.listen() as messages:                          # /ws messages from now on
        prompt_id = client.queue(graph)
        messages.wait_for(lambda m: m["type"] == "progress" and m["prompt_id"] == prompt_id)
    client.close()

A /ws message is a dict: the message's "data" plus its "type" ("status", "executing",
"progress", "executed", "execution_start", "execution_cached", "execution_success",
"execution_error", "execution_interrupted", ...), and "progress_text" ({"node", "text"}) for the
binary text frames (e.g. PaRa Trainer's loss line), and "preview_image" ({"image_type", "image":
the encoded bytes, "node" where the frame names it}) for the binary preview frames (a sampler's
live preview, PaRa Trainer's training previews).
"""
from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
import urllib.parse
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

# ComfyUI's binary /ws frames (protocol.py BinaryEventTypes): a preview image (4 bytes image type,
# 1 JPEG / 2 PNG, then the image), a node's text, a preview image with JSON metadata (4 bytes
# length, the JSON, then the image).
_BINARY_PREVIEW, _BINARY_TEXT, _BINARY_PREVIEW_WITH_METADATA = 1, 3, 4
# Events that end a prompt: wait() checks /history at once when one arrives.
_FINISHED = ("execution_success", "execution_error", "execution_interrupted")
# Messages kept per connection; older ones are dropped (a long training run sends one per step).
_KEEP_MESSAGES = 50_000


class ServerError(OSError):
    """The server could not be reached, timed out, or answered with an unexpected HTTP status
    (.status, .body; status None when no answer came)."""

    def __init__(self, message: str, status: int | None = None, body=None):
        super().__init__(message)
        self.status = status
        self.body = body


class PromptRejected(Exception):
    """POST /prompt answered 400: the graph did not validate (unknown node, bad value, missing
    file). .body holds ComfyUI's JSON ({"error": {...}, "node_errors": {...}})."""

    def __init__(self, body: dict):
        self.body = body
        super().__init__(describe_rejection(body))


class ExecutionFailed(Exception):
    """The prompt ran and ended with status 'error'; .result holds its Result."""

    def __init__(self, message: str, result: "Result"):
        super().__init__(message)
        self.result = result


def describe_rejection(body: dict) -> str:
    """ComfyUI's validation answer in one line: the error, then each node's errors."""
    err = body.get("error", {}) if isinstance(body, dict) else {}
    parts = [err.get("message", "") if isinstance(err, dict) else str(err)]
    if isinstance(err, dict) and err.get("details"):
        parts.append(err["details"])
    for nid, ne in ((body.get("node_errors") if isinstance(body, dict) else None) or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "; ".join(p for p in parts if p)


@dataclass
class Result:
    """A finished prompt: status 'success' or 'error', its outputs and, on error, what failed."""
    prompt_id: str
    status: str
    outputs: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    node_errors: dict = field(default_factory=dict)

    @classmethod
    def from_history(cls, prompt_id: str, entry: dict) -> "Result":
        return cls(prompt_id, (entry.get("status") or {}).get("status_str") or "success",
                   entry.get("outputs", {}), entry)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    @property
    def error_details(self) -> dict | None:
        """The data of the prompt's execution_error or execution_interrupted message (exception_message,
        exception_type, node_id, node_type, traceback) with "event" naming which; None if neither."""
        for msg in (self.history.get("status") or {}).get("messages", []):
            if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in ("execution_error",
                                                                              "execution_interrupted"):
                return dict(msg[1], event=msg[0])
        return None

    @property
    def message(self) -> str | None:
        """The exception message of a failed prompt, "interrupted" for a cancelled one, else None."""
        d = self.error_details
        if d is None:
            return None
        if d["event"] == "execution_interrupted":
            return "interrupted"
        return str(d.get("exception_message", "")).strip()

    @property
    def error_node(self) -> str | None:
        d = self.error_details
        return None if d is None else d.get("node_id")

    @property
    def error(self) -> str | None:
        """What failed, for people: "<node type> (node <id>): <message>", or "interrupted"; None
        when the history names no error."""
        d = self.error_details
        if d is None:
            return None
        if d["event"] == "execution_interrupted":
            return "interrupted"
        return f"{d.get('node_type')} (node {d.get('node_id')}): {self.message}"

    def files(self, kinds=("images", "latents", "gifs", "audio", "3d")) -> list[tuple[str, dict]]:
        """(node id, {"filename", "subfolder", "type"}) of every file the outputs name; kinds
        filters on the output key (None: every key)."""
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


def _decode(msg: aiohttp.WSMessage) -> dict | None:
    if msg.type == aiohttp.WSMsgType.TEXT:
        try:
            m = json.loads(msg.data)
        except ValueError:
            return None
        if not isinstance(m, dict):
            return None
        data = m.get("data")
        return dict(data if isinstance(data, dict) else {}, type=m.get("type"))
    if msg.type == aiohttp.WSMsgType.BINARY:
        raw = msg.data
        if len(raw) < 8:
            return None
        event, n = struct.unpack(">II", raw[:8])
        if event == _BINARY_TEXT:
            return {"type": "progress_text", "node": raw[8:8 + n].decode(errors="replace"),
                    "text": raw[8 + n:].decode(errors="replace")}
        if event == _BINARY_PREVIEW:
            return {"type": "preview_image", "image_type": "image/png" if n == 2 else "image/jpeg",
                    "image": bytes(raw[8:])}
        if event == _BINARY_PREVIEW_WITH_METADATA:
            try:
                meta = json.loads(raw[8:8 + n])
            except ValueError:
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            return {"type": "preview_image", "image_type": meta.get("image_type", "image/jpeg"),
                    "node": meta.get("node_id"), "image": bytes(raw[8 + n:])}
    return None


class _Connection:
    """The client's one /ws connection: its messages, in order, shared by every Messages view."""

    def __init__(self):
        self.cond = threading.Condition()
        self.messages: list[dict] = []
        self.dropped = 0          # messages removed from the front (see _KEEP_MESSAGES)
        self.closed = False
        self.error: str | None = None
        self.ws = None
        self.task = None  # the reader task (held here: the loop keeps only a weak reference)

    @property
    def count(self) -> int:
        return self.dropped + len(self.messages)

    def since(self, index: int) -> list[dict]:
        return self.messages[max(0, index - self.dropped):]

    async def read(self, ws):
        try:
            async for msg in ws:
                ev = _decode(msg)
                if ev is None:
                    continue
                with self.cond:
                    self.messages.append(ev)
                    if len(self.messages) > _KEEP_MESSAGES:
                        cut = len(self.messages) - _KEEP_MESSAGES // 2
                        del self.messages[:cut]
                        self.dropped += cut
                    self.cond.notify_all()
        except Exception as e:  # noqa: BLE001  (any end of the connection ends the reader)
            self.error = f"{type(e).__name__}: {e}"
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()


class Messages:
    """The /ws messages that arrived after this view was made (Client.listen()). A context manager
    for symmetry with the code that uses it; leaving it changes nothing on the connection."""

    def __init__(self, conn: _Connection, start: int | None = None):
        self._conn = conn
        self._start = self._drained = self._next = conn.count if start is None else start

    @property
    def messages(self) -> list[dict]:
        with self._conn.cond:
            return list(self._conn.since(self._start))

    def of_type(self, type_: str, prompt_id: str | None = None) -> list[dict]:
        """Every message of that type ("progress", "executing", "progress_text", ...), optionally
        only those of one prompt."""
        return [m for m in self.messages if m.get("type") == type_
                and (prompt_id is None or m.get("prompt_id") == prompt_id)]

    def drain(self) -> list[dict]:
        """The messages that arrived since the last drain() (or since the view was made)."""
        with self._conn.cond:
            out = list(self._conn.since(self._drained))
            self._drained = self._conn.count
        return out

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        """Block until a message of this view satisfies predicate(message); return it.
        TimeoutError after timeout seconds; ServerError when the connection closes first."""
        found, seen = self._wait(predicate, timeout, self._start)
        if found is not None:
            return found
        if self._conn.closed:
            raise ServerError(f"/ws closed before the message came ({self._conn.error or 'closed by the server'})")
        raise TimeoutError(f"no matching /ws message in {timeout} s ({seen - self._start} messages seen)")

    def wait_next(self, predicate, timeout: float) -> dict | None:
        """The next matching message after those the previous wait_next() looked at (from the
        view's start the first time); None at the timeout or once the connection has closed."""
        found, self._next = self._wait(predicate, timeout, self._next)
        return found

    def _wait(self, predicate, timeout: float, seen: int) -> tuple[dict | None, int]:
        deadline = time.monotonic() + timeout
        with self._conn.cond:
            while True:
                for i, m in enumerate(self._conn.since(seen)):
                    if predicate(m):
                        return m, max(seen, self._conn.dropped) + i + 1
                seen = self._conn.count
                left = deadline - time.monotonic()
                if self._conn.closed or left <= 0:
                    return None, seen
                self._conn.cond.wait(left)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, holder: dict):
    if loop.is_closed():
        return
    if threading.current_thread() is thread:  # collected on its own loop: nothing to wait for there
        loop.call_soon(loop.stop)
        return

    async def close():
        conn = holder.get("conn")
        if conn is not None and conn.ws is not None:
            await conn.ws.close()
        if holder.get("session") is not None:
            await holder["session"].close()

    if thread.is_alive():
        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(5)
        except Exception:  # noqa: BLE001  (closing is best effort)
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    if not thread.is_alive():
        loop.close()


class Client:
    """One ComfyUI server. client_id ties /ws progress messages to the prompts queued here."""

    def __init__(self, url: str, timeout: float = 30.0, client_id: str | None = None):
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.last_node_errors: dict = {}
        self.ws_error: str | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"comfy-client {self.url}", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._held: dict = {}  # the session and the /ws connection, for the finalizer
        self._held["session"] = self._call(self._open_session(), 10)
        self._close = weakref.finalize(self, _shut_down, self._loop, self._thread, self._held)

    async def _open_session(self):
        return aiohttp.ClientSession()

    def _call(self, coro, timeout: float | None):
        """Run coro on the client's loop and wait for it here (a Ctrl-C here cancels it there)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(None if timeout is None else timeout + 10)
        except BaseException:
            fut.cancel()
            raise

    # ---- HTTP -------------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body, timeout: float) -> tuple[int, bytes]:
        async with self._held["session"].request(method, self.url + path, json=body,
                                                 timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            return r.status, await r.read()

    def request(self, method: str, path: str, body=None, timeout: float | None = None) -> tuple[int, bytes]:
        """(HTTP status, body bytes) of one request; ServerError when no answer comes."""
        timeout = timeout or self.timeout
        try:
            return self._call(self._request(method, path, body, timeout), timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as e:
            what = f"no answer in {timeout} s" if isinstance(e, (asyncio.TimeoutError, TimeoutError)) else \
                f"{type(e).__name__}: {e}"
            raise ServerError(f"{self.url}: {method} {path}: {what}") from None

    def _json(self, method: str, path: str, body=None, timeout: float | None = None):
        status, raw = self.request(method, path, body, timeout)
        payload = _loads(raw)
        if status >= 400:
            raise ServerError(f"{self.url}: {method} {path} answered {status}: "
                              f"{describe_rejection(payload) if isinstance(payload, dict) else payload}",
                              status, payload)
        if isinstance(payload, _NotJSON):
            raise ServerError(f"{self.url}: {method} {path} answered {status} with no JSON: {payload[:200]}",
                              status, str(payload))
        return payload

    def get(self, path: str, timeout: float | None = None):
        """GET path; its JSON answer (None for an empty body)."""
        return self._json("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float | None = None):
        """POST a JSON body to path; its JSON answer (None for an empty body)."""
        return self._json("POST", path, {} if body is None else body, timeout=timeout)

    def alive(self) -> bool:
        try:
            self.get("/system_stats", timeout=5)
            return True
        except (ServerError, ValueError):
            return False

    def object_info(self, node_class: str | None = None) -> dict | None:
        """GET /object_info (every node class), or the entry of one class (None if it is unknown)."""
        if node_class is None:
            return self.get("/object_info", timeout=120)
        return self.get("/object_info/" + urllib.parse.quote(node_class)).get(node_class)

    def queue(self, graph: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected when ComfyUI refuses the graph.
        When only some outputs fail validation ComfyUI still queues the others and answers 200:
        their errors are in self.last_node_errors ({} when every output is valid)."""
        body = {"prompt": graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        self.last_node_errors = {}
        status, raw = self.request("POST", "/prompt", body)
        payload = _loads(raw)
        if status == 400:
            raise PromptRejected(payload if isinstance(payload, dict) else {"error": {"message": str(payload)}})
        if status >= 300 or not isinstance(payload, dict) or "prompt_id" not in payload:
            detail = describe_rejection(payload) if isinstance(payload, dict) else payload
            raise ServerError(f"{self.url}: POST /prompt answered {status}: {detail}", status, payload)
        self.last_node_errors = payload.get("node_errors") or {}
        return payload["prompt_id"]

    def queue_ids(self) -> tuple[list[str], list[str]]:
        """(running, pending) prompt ids of the server's queue (GET /queue)."""
        q = self.get("/queue", timeout=10)
        return ([item[1] for item in q.get("queue_running", [])],
                [item[1] for item in q.get("queue_pending", [])])

    def delete_queued(self, prompt_ids: list[str]):
        """Remove pending prompts from the queue (POST /queue {"delete": ids}); a running one stays."""
        self.post("/queue", {"delete": list(prompt_ids)}, timeout=10)

    def clear_queue(self):
        """Remove every pending prompt (POST /queue {"clear": true})."""
        self.post("/queue", {"clear": True}, timeout=10)

    def interrupt(self, prompt_id: str | None = None):
        """POST /interrupt: stop the running prompt (the UI's Cancel); with prompt_id only if
        that one is running."""
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}, timeout=10)

    def free_memory(self, unload_models: bool = True):
        self.post("/free", {"unload_models": unload_models, "free_memory": True}, timeout=30)

    def history(self, prompt_id: str) -> dict | None:
        """The /history entry of a prompt, or None while it is queued or running."""
        return (self.get(f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id)

    def result(self, prompt_id: str) -> Result | None:
        """The finished prompt, or None while it is queued or running."""
        entry = self.history(prompt_id)
        return None if entry is None else Result.from_history(prompt_id, entry)

    def wait(self, prompt_id: str, timeout: float | None = None, poll: float = 0.25, on_event=None,
             watchdog=None, messages: Messages | None = None) -> Result:
        """Wait for a prompt to finish; its Result. on_event(message) gets this prompt's /ws
        messages (and the server-wide ones) as they come, while /ws answers. watchdog(), if given,
        is called at every poll and may raise (e.g. when the server process has died).
        messages: a view made before the prompt was queued (listen()), so that none of its messages
        is missed. TimeoutError after timeout seconds (None: no limit)."""
        if messages is None and (on_event is not None or self._held.get("conn") is not None):
            messages = self._messages_or_none()

        def deliver():
            for ev in messages.drain() if (messages is not None and on_event is not None) else ():
                if ev.get("prompt_id") in (None, prompt_id):
                    on_event(ev)

        def finished(m):
            return m.get("prompt_id") == prompt_id and (m.get("type") in _FINISHED or (
                m.get("type") == "executing" and m.get("node") is None))

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            deliver()
            res = self.result(prompt_id)
            if res is not None:
                deliver()
                return res
            if watchdog is not None:
                watchdog()
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}: prompt {prompt_id} not finished after {timeout} s")
            if messages is not None:
                # wake at once when the prompt ends, else check /history every poll seconds
                if messages.wait_next(finished, poll) is not None:
                    time.sleep(0.02)  # ComfyUI writes the history entry right after its last message
            else:
                time.sleep(poll)

    def run(self, graph: dict, timeout: float | None = None, on_event=None, extra_data: dict | None = None,
            watchdog=None) -> Result:
        """queue() + wait(), with /ws open first when on_event is given so that no message is
        missed. The result's node_errors are the outputs ComfyUI dropped at validation."""
        messages = self._messages_or_none() if on_event is not None or self._held.get("conn") is not None else None
        prompt_id = self.queue(graph, extra_data)
        node_errors = self.last_node_errors
        res = self.wait(prompt_id, timeout=timeout, on_event=on_event, watchdog=watchdog, messages=messages)
        res.node_errors = node_errors
        return res

    def download(self, item: dict, dest: Path) -> Path:
        """GET /view of one output file ({"filename", "subfolder", "type"}) into dest."""
        q = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                    "type": item.get("type", "output")})
        status, raw = self.request("GET", f"/view?{q}", timeout=120)
        if status != 200:
            raise ServerError(f"{self.url}: GET /view of {item['filename']} answered {status}", status, raw)
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(raw)
        return dest

    # ---- /ws --------------------------------------------------------------------------------

    async def _connect(self) -> _Connection:
        conn = _Connection()
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        conn.ws = await self._held["session"].ws_connect(
            f"{ws_url}/ws?clientId={urllib.parse.quote(self.client_id)}", max_msg_size=64 * 2 ** 20)
        conn.task = asyncio.ensure_future(conn.read(conn.ws))
        return conn

    def listen(self, timeout: float = 10.0) -> Messages:
        """A view of this client's /ws messages from now on, connecting first if needed (one
        connection per client: ComfyUI sends a client id's messages to its newest socket only).
        ServerError when /ws does not answer."""
        with self._lock:
            conn = self._held.get("conn")
            if conn is None or conn.closed:
                try:
                    conn = self._call(asyncio.wait_for(self._connect(), timeout), timeout)
                except (aiohttp.ClientError, asyncio.TimeoutError, TimeoutError) as e:
                    self.ws_error = f"{type(e).__name__}: {e}".rstrip(": ")
                    raise ServerError(f"{self.url}/ws did not answer: {self.ws_error}",
                                      getattr(e, "status", None)) from None
                # ComfyUI files the socket under the client id right after the handshake and then
                # sends "status": once it came, the prompts queued from here report to it.
                if Messages(conn, start=0).wait_next(lambda m: m.get("type") == "status", timeout) is None:
                    self.ws_error = conn.error or "no status message"
                    raise ServerError(f"{self.url}/ws sent no status message in {timeout} s ({self.ws_error})")
                self._held["conn"] = conn
                self.ws_error = None
            return Messages(conn)

    def _messages_or_none(self) -> Messages | None:
        try:
            return self.listen()
        except ServerError:
            return None  # ws_error says why; wait() polls /history without live progress

    def close(self):
        """Close /ws and the HTTP session and stop the client's thread."""
        self._close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NotJSON(str):
    """A body that is not JSON, as text."""


def _loads(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return _NotJSON(raw.decode(errors="replace"))
