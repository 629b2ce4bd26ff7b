"""A real ComfyUI server for tests and tools: main.py in a subprocess on a free loopback port,
every folder (models/, input/, output/, user/, custom_nodes/) in one base directory, this pack
linked into its custom_nodes/ as ComfyUI-PaRa. Talk to it through .client (harness.client).

    with ComfyServer(checkpoints=[path]) as server:     # started; stopped and cleaned up after
        result = server.run(graph)                      # raises ExecutionFailed when it fails
        latents = server.output_files(result, "latents")
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import comfyui


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_latent(path):
    """The latent tensor of a SaveLatent file (model-space values, as KSampler output them)."""
    from safetensors.torch import load_file
    return load_file(str(path))["latent_tensor"]


def _die_with_parent():
    """In the child: get SIGTERM when the parent dies, even if it is killed and never reaches
    stop() (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:  # noqa: BLE001  (best effort: not Linux)
        pass


class ComfyServer:
    """ComfyUI's main.py in a subprocess. base_dir: its --base-directory (a temporary folder,
    removed by cleanup(), when not given); checkpoints: files linked into models/checkpoints;
    device "cpu" (default, or $PARA_TEST_DEVICE) adds --cpu."""

    def __init__(self, comfyui_root=None, base_dir=None, checkpoints=(), port: int | None = None,
                 python: str | None = None, extra_args=(), link_pack: bool = True,
                 device: str | None = None):
        root = Path(comfyui_root) if comfyui_root else comfyui.find_comfyui()
        if root is None:
            raise RuntimeError(comfyui.COMFYUI_MISSING)
        self.comfyui_root = root.resolve()
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="para-comfy-server-"))
        self.models_dir = self.base_dir / "models"
        self.output_dir = self.base_dir / "output"
        self.input_dir = self.base_dir / "input"
        self.temp_dir = self.base_dir / "temp"
        self.user_dir = self.base_dir / "user"
        self.custom_nodes_dir = self.base_dir / "custom_nodes"
        self.log_path = self.base_dir / "comfyui.log"
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.device = device or os.environ.get("PARA_TEST_DEVICE", "cpu")
        self.proc: subprocess.Popen | None = None
        self.client = None  # a harness.client.Client once started
        self._log_file = None

        for d in (self.models_dir / "checkpoints", self.models_dir / "para", self.models_dir / "loras",
                  self.output_dir, self.input_dir, self.user_dir, self.custom_nodes_dir):
            d.mkdir(parents=True, exist_ok=True)
        for ckpt in checkpoints:
            self.add_model("checkpoints", ckpt)
        if link_pack:
            link = self.custom_nodes_dir / comfyui.PACK_DIR_NAME
            if not link.exists():
                link.symlink_to(comfyui.PACK_ROOT, target_is_directory=True)

    # ---- folders -----------------------------------------------------------------------------

    def add_model(self, folder: str, path, name: str | None = None) -> Path:
        """Symlink a file into models/<folder>/ (visible to ComfyUI's loaders without a restart)."""
        dest = self.models_dir / folder / (name or Path(path).name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(Path(path).resolve())
        return dest

    def output_files(self, result, kind: str | None = None) -> list[Path]:
        """Paths of the files a finished prompt (a client Result) reported in its outputs;
        kind filters on the output key ("images", "latents")."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        return [roots.get(item.get("type", "output"), self.output_dir) / item.get("subfolder", "") / item["filename"]
                for _, item in result.files(None if kind is None else (kind,))]

    # ---- lifecycle ---------------------------------------------------------------------------

    def _frontend_args(self) -> list[str]:
        check = subprocess.run([self.python, "-c", "import comfyui_frontend_package"],
                               capture_output=True, cwd=str(self.comfyui_root))
        if check.returncode == 0:
            return []
        empty = self.base_dir / "frontend"
        empty.mkdir(exist_ok=True)
        return ["--front-end-root", str(empty)]

    def command(self) -> list[str]:
        cmd = [self.python, "main.py", "--listen", self.host, "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               # keep ComfyUI's sqlite file out of the ComfyUI checkout
               "--database-url", f"sqlite:///{self.user_dir / 'comfyui.db'}"]
        if self.device == "cpu":
            cmd.append("--cpu")
        return cmd + self._frontend_args() + self.extra_args

    def start(self, timeout: float = 120.0) -> "ComfyServer":
        """Start main.py and wait until /system_stats answers; then .client is connected."""
        from .client import Client, ServerError
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_root), env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        self.client = Client(self.url)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"ComfyUI exited with code {rc} while starting; log:\n{self.log_tail()}")
            try:
                self.client.get("/system_stats", timeout=2)
                return self
            except ServerError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self):
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self):
        """stop(), then remove the base directory if this object made it."""
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.cleanup()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def import_failures(self) -> list[str]:
        """Custom-node folders that ComfyUI reported as failing to import."""
        return [line.strip() for line in self.log_text().splitlines() if "(IMPORT FAILED)" in line]

    # ---- prompts -----------------------------------------------------------------------------

    def _check_running(self):
        if not self.running:
            raise RuntimeError(f"ComfyUI died; log:\n{self.log_tail()}")

    def wait(self, prompt_id: str, timeout: float = 120.0, on_event=None):
        """client.wait() that also fails at once when the server process dies, and puts the log
        tail into a timeout."""
        try:
            return self.client.wait(prompt_id, timeout=timeout, on_event=on_event, watchdog=self._check_running)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; log:\n{self.log_tail()}") from None

    def run(self, graph: dict, timeout: float = 120.0, check: bool = True, on_event=None):
        """Queue graph and wait for it; its client Result. check=True: a prompt that ends in error
        raises ExecutionFailed with ComfyUI's exception message."""
        from .client import ExecutionFailed
        try:
            result = self.client.run(graph, timeout=timeout, on_event=on_event, watchdog=self._check_running)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; log:\n{self.log_tail()}") from None
        if check and not result.ok:
            raise ExecutionFailed(f"prompt failed: {result.error}", result)
        return result
