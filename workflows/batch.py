"""Queue a sweep of one API workflow on one or several running ComfyUI servers.

    python workflows/batch.py workflows/api/2_generate_with_para_file.json \\
        --seeds 1,2,3 --strengths 0,0.5,1 --grid --out sweep_out
    python workflows/batch.py my_api_workflow.json --set 6.inputs.seed=1..8 \\
        --set "PaRa Loader.para_name=a.safetensors,b.safetensors" \\
        --server http://gpu1:8188 --server http://gpu2:8188
    python workflows/batch.py WORKFLOW.json --sweep sweep.yaml --mode list

Parameters (each one an axis of the sweep):
  --set NODE.inputs.NAME=V1,V2,...   any input; NODE is a node id, its title or a unique
                                     class_type; "NODE.NAME" also works. Values: comma separated
                                     (numbers and true/false are parsed), A..B for an integer range,
                                     a JSON list ('PATH=["a, b", "c"]'), or @FILE (one value a line).
  --seeds, --strengths, --para       shorthands: every KSampler seed; every PaRa Loader/Apply (or
                                     Load LoRA) strength; every PaRa Loader/Load file.
  --ckpt, --size, --width, --height, shorthands: every checkpoint loader's ckpt_name; every width
  --steps, --cfg, --sampler,         and height (empty latents, image loaders; --size sets both);
  --scheduler                        the samplers' steps, cfg, sampler_name and scheduler. One value
                                     sets it for every job; several sweep it.
  --prompt TEXT (repeatable)         the positive prompt (the text encoder feeding a KSampler's
                                     positive input).
  --sweep FILE                       JSON or YAML: {"mode": "grid", "set": {PATH: [values]},
                                     "jobs": [{PATH: value, ...}, ...]}.
--mode grid (default) makes every combination; --mode list pairs the i-th values of each axis.

Jobs go to the servers round robin (at most --max-queued waiting on each), or to a ComfyUI that
batch.py starts itself with --start-server BASE_DIR (e.g. the demo's demo_output/comfyui). A job
that ComfyUI rejects or that fails is reported and the rest go on; the exit code is 1 if any job
failed. Ctrl-C or SIGTERM removes this batch's waiting jobs from the servers' queues, interrupts
its running ones, writes the manifest and exits 130 (143 for SIGTERM).
Outputs are downloaded into --out with manifest.csv and manifest.json saying which parameters
made which file; --grid adds an XY grid image (strength across, seed down).
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root makes harness/ and workflows/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.client import Client, PromptRejected, Result, describe_rejection  # noqa: E402
from workflows import api_graph  # noqa: E402


class SweepError(ValueError):
    pass


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------

@dataclass
class Axis:
    """One swept parameter: a label, the input paths it sets (a shorthand may set several
    nodes), and its values."""
    label: str
    paths: list[str]
    values: list


def parse_value(text: str):
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_values(spec: str) -> list:
    """'1,2,3' | '1..4' | '["a, b", "c"]' | '@file.txt' -> a list of values."""
    spec = spec.strip()
    if spec.startswith("@"):
        lines = Path(spec[1:]).expanduser().read_text().splitlines()
        return [parse_value(line) for line in lines if line.strip()]
    if spec.startswith("["):
        try:
            values = json.loads(spec)
        except ValueError as e:
            raise SweepError(f"{spec!r} is not a JSON list: {e}") from None
        return values if isinstance(values, list) else [values]
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if ".." in part:
            a, _, b = part.partition("..")
            try:
                lo, hi = int(a), int(b)
            except ValueError:
                out.append(parse_value(part))
                continue
            step = 1 if hi >= lo else -1
            out.extend(range(lo, hi + step, step))
        else:
            out.append(parse_value(part))
    if not out:
        raise SweepError(f"no values in {spec!r}")
    return out


def canonical(graph: dict, path: str) -> str:
    node, name = api_graph.split_path(path)
    nid = api_graph.find(graph, node)
    if name not in graph[nid].get("inputs", {}):
        raise SweepError(f"{path}: node {nid} ({api_graph.title(graph[nid])}) has no input {name!r}; it has "
                         f"{', '.join(graph[nid].get('inputs', {}))}")
    return f"{nid}.inputs.{name}"


def _inputs_of(graph: dict, class_types: tuple, name: str) -> list[str]:
    return [f"{nid}.inputs.{name}" for nid, n in graph.items()
            if n["class_type"] in class_types and name in n.get("inputs", {})]


def shorthand_paths(graph: dict, what: str) -> list[str]:
    """The inputs a shorthand flag sets."""
    if what == "seed":
        paths = _inputs_of(graph, ("KSampler",), "seed") + _inputs_of(graph, ("KSamplerAdvanced", "RandomNoise"), "noise_seed")
    elif what == "strength":
        paths = _inputs_of(graph, ("PaRaLoader", "PaRaApply"), "strength") or \
            _inputs_of(graph, ("LoraLoader", "LoraLoaderModelOnly"), "strength_model")
    elif what == "para":
        paths = _inputs_of(graph, ("PaRaLoader", "PaRaLoad"), "para_name")
        if len(paths) > 1:
            raise SweepError(f"--para: the workflow loads several PaRa files ({', '.join(paths)}); "
                             "use --set NODE.para_name=... for each")
    elif what == "ckpt":
        paths = [f"{nid}.inputs.ckpt_name" for nid, n in graph.items()
                 if "ckpt_name" in n.get("inputs", {}) and not is_link(n["inputs"]["ckpt_name"])]
    elif what in ("width", "height"):
        paths = [f"{nid}.inputs.{what}" for nid, n in graph.items()
                 if isinstance(n.get("inputs", {}).get(what), int) and not isinstance(n["inputs"][what], bool)]
    elif what == "size":
        paths = shorthand_paths(graph, "width") + shorthand_paths(graph, "height")
    elif what in ("steps", "cfg", "sampler_name", "scheduler"):
        classes = {"steps": ("KSampler", "KSamplerAdvanced", "BasicScheduler"),
                   "cfg": ("KSampler", "KSamplerAdvanced", "CFGGuider"),
                   "sampler_name": ("KSampler", "KSamplerAdvanced", "KSamplerSelect"),
                   "scheduler": ("KSampler", "KSamplerAdvanced", "BasicScheduler")}[what]
        paths = _inputs_of(graph, classes, what)
    elif what == "prompt":
        paths = []
        for n in graph.values():
            if n["class_type"] in ("KSampler", "KSamplerAdvanced"):
                src = n["inputs"].get("positive")
                if is_link(src) and graph.get(src[0], {}).get("class_type") == "CLIPTextEncode":
                    p = f"{src[0]}.inputs.text"
                    if p not in paths:
                        paths.append(p)
    else:
        raise SweepError(what)
    if not paths:
        raise SweepError(f"--{what}: the workflow has no node this flag can set; use --set NODE.inputs.NAME=...")
    return paths


# (argparse dest, axis label) of the flags that set inputs by what they are rather than by path
SHORTHANDS = (("seeds", "seed"), ("strengths", "strength"), ("para", "para"), ("ckpt", "ckpt"), ("size", "size"),
              ("width", "width"), ("height", "height"), ("steps", "steps"), ("cfg", "cfg"),
              ("sampler", "sampler_name"), ("scheduler", "scheduler"))


def is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)


def load_sweep_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise SweepError(f"{path} is YAML but PyYAML is not installed (pip install pyyaml), or use JSON") from None
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with 'set' and/or 'jobs' (and 'mode')")
    unknown = set(data) - {"mode", "set", "jobs"}
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)} (use mode, set, jobs)")
    return data


def build_axes(graph: dict, args) -> tuple[list[Axis], list[dict], str]:
    """Axes from the flags and the sweep file, explicit jobs from the sweep file, and the mode.
    A parameter given one value is no axis: it is set in the graph itself (see fixed_inputs)."""
    axes: list[Axis] = []
    jobs: list[dict] = []
    mode = args.mode
    if args.sweep:
        data = load_sweep_file(Path(args.sweep))
        mode = mode or data.get("mode")
        for path, values in (data.get("set") or {}).items():
            values = values if isinstance(values, list) else parse_values(str(values))
            axes.append(Axis(path, [canonical(graph, path)], values))
        for i, job in enumerate(data.get("jobs") or []):
            if not isinstance(job, dict):
                raise SweepError(f"{args.sweep}: jobs[{i}] is not a mapping of PATH: value")
            jobs.append({canonical(graph, p): v for p, v in job.items()})
    for spec in args.set or []:
        path, sep, values = spec.partition("=")
        if not sep:
            raise SweepError(f"--set {spec!r}: write PATH=V1,V2 (e.g. 3.inputs.seed=1,2,3)")
        axes.append(Axis(path.strip(), [canonical(graph, path.strip())], parse_values(values)))
    for flag, what in SHORTHANDS:
        spec = getattr(args, flag, None)
        if spec is not None:
            axes.append(Axis(what, shorthand_paths(graph, what), parse_values(str(spec))))
    if args.prompt:
        axes.append(Axis("prompt", shorthand_paths(graph, "prompt"), list(args.prompt)))
    seen: dict[str, str] = {}
    for ax in axes:
        for p in ax.paths:
            if p in seen:
                raise SweepError(f"{p} is swept twice ({seen[p]} and {ax.label})")
            seen[p] = ax.label
    return axes, jobs, mode or "grid"


def fixed_inputs(graph: dict, axes: list[Axis]) -> tuple[dict, list[Axis], dict]:
    """Apply the one-value parameters to (a copy of) the graph: (graph, the real axes, {path: value})."""
    g = copy.deepcopy(graph)
    fixed = {}
    for a in axes:
        if len(a.values) == 1:
            for p in a.paths:
                api_graph.set_input(g, p, a.values[0], create=True)
                fixed[p] = a.values[0]
    return g, [a for a in axes if len(a.values) != 1], fixed


def expand(axes: list[Axis], jobs: list[dict], mode: str) -> list[dict]:
    """Every job's parameters: {label: value}, in order."""
    if mode == "grid":
        combos = [dict(zip([a.label for a in axes], vals)) for vals in itertools.product(*[a.values for a in axes])]
    elif mode == "list":
        lengths = {len(a.values) for a in axes if len(a.values) != 1}
        if len(lengths) > 1:
            raise SweepError("--mode list pairs the i-th values of every axis, so each needs the same number of values "
                             f"(or one): got {', '.join(f'{a.label}: {len(a.values)}' for a in axes)}")
        n = lengths.pop() if lengths else 1
        combos = [{a.label: a.values[i if len(a.values) > 1 else 0] for a in axes} for i in range(n)] if axes else [{}]
    else:
        raise SweepError(f"--mode is grid or list, not {mode!r}")
    if jobs:
        combos = [dict(j, **c) for j in jobs for c in combos]
    return combos


def job_graph(graph: dict, axes: list[Axis], params: dict) -> dict:
    g = copy.deepcopy(graph)
    by_label = {a.label: a for a in axes}
    for label, value in params.items():
        for path in by_label[label].paths if label in by_label else [label]:
            api_graph.set_input(g, path, value, create=True)
    return g


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------

@dataclass
class Job:
    index: int
    params: dict
    graph: dict
    status: str = "pending"   # pending, queued, ok, error, rejected, cancelled
    server: str = ""
    prompt_id: str = ""
    error: str = ""
    seconds: float = 0.0
    files: list = field(default_factory=list)
    attempts: int = 0
    _t0: float = 0.0

    def describe(self) -> str:
        return " ".join(f"{k}={short(v)}" for k, v in self.params.items()) or "(no parameters)"


def short(v, n: int = 40) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= n else s[: n - 3] + "..."


class Runner:
    def __init__(self, servers: list[str], out: Path, max_queued: int = 2, timeout: float | None = None,
                 poll: float = 0.3, log=print):
        self.clients = [Client(u) for u in servers]
        self.down: set[int] = set()
        self.fail_counts = {i: 0 for i in range(len(self.clients))}
        self.out = out
        self.max_queued = max_queued
        self.timeout = timeout
        self.poll = poll
        self.log = log
        self._rr = 0

    def run(self, jobs: list[Job]) -> list[Job]:
        """Run every job. On KeyboardInterrupt (Ctrl-C; main() turns SIGTERM into one too) the
        jobs this run queued are taken off the servers (cancel), then the interrupt goes on."""
        self.pending = deque(jobs)
        self.inflight: dict[int, list[Job]] = {i: [] for i in range(len(self.clients))}
        try:
            return self._run(jobs, self.pending, self.inflight)
        except KeyboardInterrupt:
            # a second Ctrl-C must not cut the clean-up short (it is bounded: cancel's wait)
            try:
                held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
            except ValueError:  # not the main thread: signals go elsewhere anyway
                held = {}
            try:
                self.cancel()
            finally:
                for sig, handler in held.items():
                    signal.signal(sig, handler)
            raise

    def cancel(self, wait: float = 10.0):
        """Remove this run's waiting jobs from each server's queue (POST /queue delete) and
        interrupt its running ones (POST /interrupt with their prompt id, so another user's
        prompt is never stopped); repeated until none is left on the server or `wait` s passed.
        Jobs not yet queued are dropped. Every one of them ends with status 'cancelled'."""
        for job in self.pending:
            job.status, job.error = "cancelled", "not queued (the batch was stopped)"
        self.pending.clear()
        for i, running in self.inflight.items():
            ours = {j.prompt_id: j for j in running}
            if not ours:
                continue
            c = self.clients[i]
            removed, interrupted = set(), set()
            deadline = time.monotonic() + wait
            try:
                while True:
                    run_ids, wait_ids = c.queue_ids()
                    waiting = [p for p in wait_ids if p in ours]
                    if waiting:
                        c.delete_queued(waiting)
                        removed.update(waiting)
                    active = [p for p in run_ids if p in ours]
                    for p in active:
                        c.interrupt(p)
                        interrupted.add(p)
                    if (not waiting and not active) or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
            except (OSError, ValueError) as e:
                self.log(f"could not clean up on {c.url} ({e}); its queue may still hold jobs of this batch")
            for pid, job in ours.items():
                job.status = "cancelled"
                job.error = ("interrupted while running" if pid in interrupted else
                             "removed from the queue" if pid in removed else "stopped (it had finished or left the queue)")
            running.clear()
            parts = ([f"removed {len(removed)} waiting job(s)"] if removed else []) + \
                ([f"interrupted job {', '.join(str(ours[p].index) for p in sorted(interrupted))}"] if interrupted else [])
            self.log(f"stopped: {c.url}: {'; '.join(parts) or 'nothing of this batch was left on it'}")

    def _run(self, jobs: list[Job], pending: deque, inflight: dict) -> list[Job]:
        total = len(jobs)
        finished = 0
        while pending or any(inflight.values()):
            while pending:
                i = self._next_server(inflight)
                if i is None:
                    break
                job = pending.popleft()
                self._submit(i, job, inflight, pending, total)
                if job.status in ("rejected", "error"):
                    finished += 1
            if not pending and not any(inflight.values()):
                break
            if len(self.down) == len(self.clients):
                for job in list(pending):
                    job.status, job.error = "error", "no server reachable"
                    self.log(f"FAILED job {job.index}: no server reachable")
                    finished += 1
                pending.clear()
                break
            time.sleep(self.poll)
            for i, running in inflight.items():
                for job in list(running):
                    try:
                        res = self.clients[i].result(job.prompt_id)
                        self.fail_counts[i] = 0
                    except (OSError, ValueError) as e:
                        self._server_trouble(i, e, inflight, pending)
                        break
                    if res is None:
                        if self.timeout and time.monotonic() - job._t0 > self.timeout:
                            running.remove(job)
                            job.status, job.error = "error", f"timed out after {self.timeout:.0f} s"
                            finished += 1
                            self.log(f"[{finished}/{total}] FAILED job {job.index} on {job.server}: {job.error}")
                        continue
                    running.remove(job)
                    finished += 1
                    self._finish(i, job, res)
                    mark = "ok" if job.status == "ok" else f"FAILED: {job.error}"
                    files = f" -> {', '.join(job.files)}" if job.files else ""
                    self.log(f"[{finished}/{total}] job {job.index} {mark} ({job.seconds:.1f} s, {job.server}){files}")
        return jobs

    def _next_server(self, inflight) -> int | None:
        n = len(self.clients)
        for k in range(n):
            i = (self._rr + k) % n
            if i not in self.down and len(inflight[i]) < self.max_queued:
                self._rr = (i + 1) % n
                return i
        return None

    def _submit(self, i: int, job: Job, inflight, pending, total):
        c = self.clients[i]
        job.server, job.attempts = c.url, job.attempts + 1
        try:
            job.prompt_id = c.queue(job.graph)
        except PromptRejected as e:
            job.status, job.error = "rejected", str(e)
            self.log(f"FAILED job {job.index} ({job.describe()}): ComfyUI rejected it: {e}")
            return
        except (OSError, RuntimeError) as e:
            pending.appendleft(job)
            self._server_trouble(i, e, inflight, pending, force=True)
            return
        job.status, job._t0 = "queued", time.monotonic()
        inflight[i].append(job)
        self.log(f"queued job {job.index}/{total} on {c.url}: {job.describe()}")
        if c.last_node_errors:
            self.log(f"warning: job {job.index}: ComfyUI runs only the valid outputs: "
                     + describe_rejection({"node_errors": c.last_node_errors}))

    def _server_trouble(self, i: int, err, inflight, pending, force: bool = False):
        self.fail_counts[i] += 1
        if not force and self.fail_counts[i] < 3:
            return
        self.down.add(i)
        self.log(f"server {self.clients[i].url} is not answering ({err}); its jobs go to the other servers")
        for job in inflight[i]:
            if job.attempts < 2:
                job.status = "pending"
                pending.append(job)
            else:
                job.status, job.error = "error", f"server {job.server} stopped answering"
        inflight[i] = []

    def _finish(self, i: int, job: Job, res: Result):
        job.seconds = time.monotonic() - job._t0
        if not res.ok:
            job.status, job.error = "error", res.error or "failed"
            return
        job.status = "ok"
        for nid, item in res.files():
            if item.get("type") == "temp" and item.get("filename", "").startswith("ComfyUI_temp"):
                continue  # previews
            name = f"job{job.index:04d}_{nid}_{Path(item['filename']).name}"
            try:
                self.clients[i].download(item, self.out / name)
                job.files.append(name)
            except OSError as e:
                job.error = f"could not download {item['filename']}: {e}"


# ------------------------------------------------------------------------------------------
# Manifest and grid
# ------------------------------------------------------------------------------------------

def write_manifest(out: Path, workflow: str, servers: list[str], mode: str, axes: list[Axis], jobs: list[Job],
                   fixed: dict | None = None):
    labels = []
    for j in jobs:
        for k in j.params:
            if k not in labels:
                labels.append(k)
    data = {
        "workflow": workflow, "servers": servers, "mode": mode, "fixed": fixed or {},
        "axes": [{"label": a.label, "paths": a.paths, "values": a.values} for a in axes],
        "jobs": [{"job": j.index, "status": j.status, "params": j.params,
                  "inputs": {p: v for a in axes for p in a.paths for k, v in j.params.items() if k == a.label},
                  "files": j.files, "server": j.server, "prompt_id": j.prompt_id, "seconds": round(j.seconds, 2),
                  "error": j.error} for j in jobs],
    }
    (out / "manifest.json").write_text(json.dumps(data, indent=2) + "\n")
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["job", "status", *labels, "files", "server", "prompt_id", "seconds", "error"])
        for j in jobs:
            w.writerow([j.index, j.status, *[json.dumps(j.params[k]) if not isinstance(j.params.get(k), str)
                                             else j.params[k] for k in labels],
                        ";".join(j.files), j.server, j.prompt_id, f"{j.seconds:.2f}", j.error])


def find_axis(axes: list[Axis], want: str | None, default_word: str) -> Axis | None:
    if want:
        for a in axes:
            if a.label == want or want in a.paths:
                return a
        raise SweepError(f"--grid axis {want!r} is not swept (swept: {', '.join(a.label for a in axes)})")
    for a in axes:
        if a.label == default_word or any(p.endswith(f".{default_word}") or p.endswith(f"_{default_word}")
                                          or p.endswith(f".{default_word}_model") for p in a.paths):
            return a
    return None


def make_grids(out: Path, axes: list[Axis], jobs: list[Job], x_label=None, y_label=None) -> list[Path]:
    """XY grid images: x = the strength axis, y = the seed axis (or the axes named), one
    grid per combination of the other axes. A failed job leaves a gray cell."""
    from PIL import Image, ImageDraw, ImageFont
    x = find_axis(axes, x_label, "strength")
    y = find_axis(axes, y_label, "seed")
    if x is None or y is None or x is y:
        raise SweepError("--grid needs a strength axis and a seed axis (e.g. --strengths 0,0.5,1 --seeds 1,2), "
                         "or name them with --grid-x/--grid-y")
    others = [a for a in axes if a not in (x, y)]
    groups: dict[tuple, dict] = {}
    for j in jobs:
        key = tuple(json.dumps(j.params.get(a.label)) for a in others)
        groups.setdefault(key, {})[(json.dumps(j.params.get(x.label)), json.dumps(j.params.get(y.label)))] = j
    font = ImageFont.load_default()
    paths = []
    for gi, (key, cells) in enumerate(groups.items()):
        imgs = {}
        cw = ch = 0
        for k, j in cells.items():
            pngs = [f for f in j.files if f.lower().endswith((".png", ".jpg", ".webp"))]
            if j.status == "ok" and pngs:
                im = Image.open(out / pngs[0]).convert("RGB")
                if max(im.size) < 128:  # small test images: enlarge, keeping the pixels sharp
                    f = 128 // max(im.size)
                    im = im.resize((im.width * f, im.height * f), Image.NEAREST)
                imgs[k] = im
                cw, ch = max(cw, im.width), max(ch, im.height)
        cw, ch = max(cw, 64), max(ch, 64)
        cell_w = max(cw, 90)
        left, top, pad = 110, 40, 6
        W = left + len(x.values) * (cell_w + pad)
        H = top + len(y.values) * (ch + pad) + (18 if others else 0)
        grid = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(grid)
        d.text((4, 4), f"x: {x.label}\ny: {y.label}", fill="black", font=font)
        for xi, xv in enumerate(x.values):
            d.text((left + xi * (cell_w + pad) + 4, top - 16), short(xv, 18), fill="black", font=font)
        for yi, yv in enumerate(y.values):
            d.text((4, top + yi * (ch + pad) + ch // 2 - 6), short(yv, 18), fill="black", font=font)
            for xi, xv in enumerate(x.values):
                pos = (left + xi * (cell_w + pad), top + yi * (ch + pad))
                im = imgs.get((json.dumps(xv), json.dumps(yv)))
                if im is None:
                    d.rectangle([pos, (pos[0] + cw - 1, pos[1] + ch - 1)], fill=(170, 170, 170))
                    d.text((pos[0] + 4, pos[1] + 4), "failed", fill="black", font=font)
                else:
                    grid.paste(im, pos)
        if others:
            d.text((4, H - 16), ", ".join(f"{a.label}={short(json.loads(v), 30)}" for a, v in zip(others, key)),
                   fill="black", font=font)
        path = out / ("grid.png" if len(groups) == 1 else f"grid_{gi + 1:02d}.png")
        grid.save(path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("workflow", help="API-format workflow JSON (or a shipped name such as 2_generate_with_para_file)")
    p.add_argument("--server", action="append", help="ComfyUI URL, repeat for several (default http://127.0.0.1:8188)")
    p.add_argument("--start-server", metavar="BASE_DIR",
                   help="start a headless ComfyUI for this batch with BASE_DIR as its --base-directory (its models/, "
                        "input/, output/; e.g. demo_output/comfyui), on a free port; stopped at the end. ComfyUI "
                        "is found like the demo finds it (COMFYUI_PATH, ~/ComfyUI)")
    p.add_argument("--cpu", action="store_true", help="with --start-server: run that ComfyUI on the CPU")
    p.add_argument("--set", action="append", metavar="PATH=VALUES", help="sweep an input (see above)")
    p.add_argument("--seeds", metavar="VALUES", help="sweep every KSampler seed, e.g. 1,2,3 or 1..8")
    p.add_argument("--strengths", metavar="VALUES", help="sweep the PaRa (or LoRA) strength, e.g. 0,0.5,1")
    p.add_argument("--para", metavar="FILES", help="sweep the PaRa file (names in models/para)")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="sweep the positive prompt (repeat the flag)")
    p.add_argument("--ckpt", metavar="NAMES", help="the checkpoint (a name in models/checkpoints)")
    p.add_argument("--size", metavar="PIXELS", help="image width and height, e.g. 512")
    p.add_argument("--width", metavar="PIXELS", help="image width")
    p.add_argument("--height", metavar="PIXELS", help="image height")
    p.add_argument("--steps", metavar="VALUES", help="sampler steps")
    p.add_argument("--cfg", metavar="VALUES", help="sampler cfg")
    p.add_argument("--sampler", metavar="NAMES", help="sampler_name, e.g. euler or dpmpp_2m")
    p.add_argument("--scheduler", metavar="NAMES", help="scheduler, e.g. normal or karras")
    p.add_argument("--sweep", metavar="FILE", help="JSON/YAML sweep file (set, jobs, mode)")
    p.add_argument("--mode", choices=("grid", "list"), help="grid: every combination (default); list: zip the axes")
    p.add_argument("--out", default="batch_output", help="output folder (default ./batch_output)")
    p.add_argument("--grid", action="store_true", help="also write an XY grid image (strength x seed)")
    p.add_argument("--grid-x", metavar="AXIS", help="grid columns: an axis label or path (default: strength)")
    p.add_argument("--grid-y", metavar="AXIS", help="grid rows: an axis label or path (default: seed)")
    p.add_argument("--max-queued", type=int, default=2, help="jobs waiting on one server at a time (default 2)")
    p.add_argument("--timeout", type=float, help="seconds one job may take before it counts as failed")
    p.add_argument("--dry-run", action="store_true", help="print the jobs, queue nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        graph = api_graph.load(args.workflow)
        axes, explicit, mode = build_axes(graph, args)
        graph, axes, fixed = fixed_inputs(graph, axes)
        combos = expand(axes, explicit, mode)
    except (SweepError, api_graph.GraphError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    jobs = [Job(i + 1, params, job_graph(graph, axes, params)) for i, params in enumerate(combos)]
    servers = args.server or ["http://127.0.0.1:8188"]
    print(f"{len(jobs)} job(s) ({mode} over {', '.join(f'{a.label} x{len(a.values)}' for a in axes) or 'nothing'}"
          + (f"; fixed: {', '.join(f'{p}={short(v)}' for p, v in fixed.items())}" if fixed else "")
          + f") on {len(servers)} server(s)", flush=True)
    if args.dry_run:
        for j in jobs:
            print(f"  job {j.index}: {j.describe()}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stopped_by = []

    def stop(signum, frame):  # SIGTERM ends the batch like Ctrl-C: clean up, then exit
        stopped_by.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    server = None
    try:
        if args.start_server:
            server = start_server(Path(args.start_server), args.cpu)
            if server is None:
                return 2
            servers = [server.url]
        return _run_jobs(args, jobs, servers, out, mode, axes, fixed)
    except KeyboardInterrupt:
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        print(f"stopped by {signal.Signals(signum).name}", file=sys.stderr, flush=True)
        return 128 + int(signum)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.stop()


def start_server(base: Path, cpu: bool):
    """A headless ComfyUI on a free loopback port with base as its base directory and this pack
    in its custom_nodes (harness.server, as the demo does); None (after a message) if it
    cannot start."""
    from harness import comfyui, server as comfy_server  # noqa: PLC0415
    root = comfyui.find_comfyui()
    if root is None:
        print(f"error: --start-server: {comfyui.COMFYUI_MISSING}", file=sys.stderr)
        return None
    if not (base / "models").is_dir():
        print(f"error: --start-server {base}: no models/ folder there; give a ComfyUI base directory such as the "
              "demo's demo_output/comfyui (run python workflows/demo.py first)", file=sys.stderr)
        return None
    device = "cpu" if cpu or not _has_gpu() else "cuda"
    server = comfy_server.ComfyServer(root, base_dir=base.resolve(), device=device)
    print(f"starting ComfyUI ({root}) on {server.url} with base directory {base} ...", flush=True)
    try:
        server.start(timeout=180)
    except Exception as e:  # noqa: BLE001  (any start failure is reported with the log)
        print(f"error: ComfyUI did not start: {e}\n(log: {server.log_path})", file=sys.stderr)
        server.stop()
        return None
    return server


def _has_gpu() -> bool:
    try:
        import torch  # noqa: PLC0415
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def _run_jobs(args, jobs, servers, out, mode, axes, fixed) -> int:
    runner = Runner(servers, out, max_queued=args.max_queued, timeout=args.timeout,
                    log=lambda m: print(m, flush=True))
    live = [c.url for c in runner.clients if c.alive()]
    if not live:
        print(f"error: no ComfyUI answers at {', '.join(servers)} (start one with: python main.py --listen)",
              file=sys.stderr)
        return 2
    for c in runner.clients:
        if c.url not in live:
            print(f"warning: {c.url} does not answer; using the others", flush=True)
    runner.down = {i for i, c in enumerate(runner.clients) if c.url not in live}
    t0 = time.monotonic()
    try:
        runner.run(jobs)
    finally:  # also when stopped: the manifest says what ran and what was cancelled
        write_manifest(out, args.workflow, servers, mode, axes, jobs, fixed)
    grids = []
    if args.grid:
        try:
            grids = make_grids(out, axes, jobs, args.grid_x, args.grid_y)
        except SweepError as e:
            print(f"no grid: {e}", file=sys.stderr)
    ok = sum(j.status == "ok" for j in jobs)
    failed = [j for j in jobs if j.status != "ok"]
    print(f"{ok} ok, {len(failed)} failed in {time.monotonic() - t0:.1f} s; manifest: {out / 'manifest.csv'}"
          + (f"; grid: {', '.join(str(g) for g in grids)}" if grids else ""))
    for j in failed:
        print(f"  job {j.index} ({j.describe()}): {j.error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
