"""Test helpers shared by the test suite and the demo: find ComfyUI, build test models
without downloads, and run a real ComfyUI server.

Only the standard library is imported at module level. torch, safetensors and ComfyUI are
imported inside the functions that need them, so this module can be imported (for example by
the demo command, or by .ci/run to report where ComfyUI is) without pytest and without ComfyUI.

ComfyUI must be configured before its first import: `comfy.model_management` picks the
device when it is imported, and on a machine without an NVIDIA driver it crashes unless
`args.cpu` is already set. `configure_comfy()` does that (cheaply, without importing torch);
`setup_comfy()` also imports ComfyUI's model management.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "ComfyUI-PaRa"

COMFYUI_MISSING = ("ComfyUI not found: set COMFYUI_PATH (one checkout) or COMFYUI_PATHS (several), or clone it "
                   "to ~/ComfyUI; see README")

# Bump when build_sd15_checkpoint changes what it writes: cached files with another version
# are rebuilt.
SD15_BUILDER_VERSION = "1"
SD15_CHECKPOINT_NAME = "test_sd15.safetensors"


# --------------------------------------------------------------------------------------------
# Finding and configuring ComfyUI
# --------------------------------------------------------------------------------------------

def is_comfyui_root(path) -> bool:
    path = Path(path)
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


DEFAULT_COMFYUI_PATHS = ("~/ComfyUI", "~/ComfyUI-0.33")


def comfyui_candidates() -> list[tuple[str, Path]]:
    """Where ComfyUI is looked for, in order, as (reason, path): $COMFYUI_PATH; the ComfyUI
    that holds this pack in custom_nodes; then each entry of $COMFYUI_PATHS (os.pathsep
    separated), or, when that is unset, ~/ComfyUI and ~/ComfyUI-0.33."""
    out = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        out.append(("COMFYUI_PATH", Path(env).expanduser()))
    # A user's install: ComfyUI/custom_nodes/<pack>. Check the path as written and with
    # symlinks resolved, since packs are often linked into custom_nodes.
    for pack in (Path(os.path.abspath(__file__)).parent.parent, PACK_ROOT):
        if pack.parent.name == "custom_nodes":
            out.append(("custom_nodes parent", pack.parent.parent))
    paths = os.environ.get("COMFYUI_PATHS")
    if paths is not None:
        out += [("COMFYUI_PATHS", Path(p).expanduser()) for p in paths.split(os.pathsep) if p.strip()]
    else:
        out += [(p, Path(p).expanduser()) for p in DEFAULT_COMFYUI_PATHS]
    return out


def find_all_comfyui() -> list[Path]:
    """Every distinct ComfyUI root among comfyui_candidates(), in that order (each counts only if
    it has main.py and comfy/). The test suite runs once per root (.ci/run)."""
    roots: list[Path] = []
    for _, path in comfyui_candidates():
        if is_comfyui_root(path) and path.resolve() not in roots:
            roots.append(path.resolve())
    return roots


def find_comfyui() -> Path | None:
    """The ComfyUI root to test against in this process, or None: the first of
    find_all_comfyui() ($COMFYUI_PATH first when it is a ComfyUI checkout)."""
    roots = find_all_comfyui()
    return roots[0] if roots else None


def comfyui_version(root) -> str:
    """The version a ComfyUI checkout says it is (comfyui_version.py, else pyproject.toml),
    read from the files without importing anything; "unknown" when neither says."""
    import re
    root = Path(root)
    for name, pattern in (("comfyui_version.py", r"__version__\s*=\s*[\"']([^\"']+)[\"']"),
                          ("pyproject.toml", r"(?m)^version\s*=\s*[\"']([^\"']+)[\"']")):
        try:
            m = re.search(pattern, (root / name).read_text(errors="replace"))
        except OSError:
            continue
        if m:
            return m.group(1)
    return "unknown"


def version_tuple(version: str) -> tuple:
    """"0.3.64" -> (0, 3, 64); parts that are not numbers count as 0."""
    return tuple(int(p) if p.isdigit() else 0 for p in str(version).split("."))


_configured: dict = {}


class _ComfyUINodesFinder:
    """A meta path finder that resolves the top-level module `nodes` to <ComfyUI root>/nodes.py."""

    def __init__(self, root: Path):
        self.path = Path(root) / "nodes.py"

    def find_spec(self, name, path=None, target=None):
        if name != "nodes" or path is not None:
            return None
        import importlib.util
        return importlib.util.spec_from_file_location("nodes", self.path)


def configure_comfy(root=None, base_directory=None, device: str | None = None) -> Path:
    """Put ComfyUI first on sys.path and set its command-line args for tests; import no torch.

    device: "cpu" (default, or $PARA_TEST_DEVICE) forces ComfyUI's --cpu; anything else
    (e.g. "cuda") lets ComfyUI pick its device.
    base_directory: sets --base-directory, so folder_paths (models/, output/, input/, temp/,
    user/) points there instead of into the ComfyUI checkout. Must be set before folder_paths
    is first imported.
    Idempotent; a second call with another root raises.
    """
    root = Path(root) if root is not None else find_comfyui()
    if root is None:
        raise RuntimeError(COMFYUI_MISSING)
    root = root.resolve()
    if not is_comfyui_root(root):
        raise RuntimeError(f"{root} is not a ComfyUI checkout (needs main.py and comfy/)")
    if _configured:
        if _configured["root"] != root:
            raise RuntimeError(f"ComfyUI already configured from {_configured['root']}, not {root}")
        return root

    # The pack has a nodes/ package and ComfyUI a nodes.py module: ComfyUI's must win, so
    # its root goes first and nothing may have imported the pack's nodes/ as `nodes` yet.
    loaded = sys.modules.get("nodes")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(root)):
        raise RuntimeError(
            f"`nodes` is already imported from {getattr(loaded, '__file__', loaded)}; ComfyUI's "
            "nodes.py cannot be imported. Import the pack's nodes/ through comfy_env.import_pack().")
    root_str = str(root)
    while root_str in sys.path:
        sys.path.remove(root_str)
    sys.path.insert(0, root_str)
    # Tests put the pack's root on sys.path too (to import para_core), often at the front; from
    # then on a first `import nodes` would find the pack's nodes/ package. ComfyUI's nodes.py
    # is `nodes` in this process whatever the path order.
    sys.meta_path.insert(0, _ComfyUINodesFinder(root))

    import comfy.options  # noqa: F401  (args_parsing stays False: ComfyUI ignores sys.argv)
    from comfy.cli_args import args

    device = device or os.environ.get("PARA_TEST_DEVICE", "cpu")
    if device == "cpu":
        args.cpu = True
    if base_directory is not None:
        if "folder_paths" in sys.modules:
            raise RuntimeError("folder_paths is already imported; set base_directory earlier")
        args.base_directory = str(base_directory)
    args.disable_auto_launch = True
    _configured.update(root=root, device=device, base_directory=base_directory)
    return root


def setup_comfy(root=None, base_directory=None, device: str | None = None) -> Path:
    """configure_comfy(), then import ComfyUI's model management (torch and device setup)."""
    root = configure_comfy(root, base_directory, device)
    import comfy.model_management  # noqa: F401
    return root


def import_pack(name: str = "comfyui_para_pack"):
    """Import this pack's __init__.py as a package, the way ComfyUI loads a custom node
    (importlib from the file, under a package name), so that its relative imports work and its
    nodes/ never collides with ComfyUI's nodes.py. Needs configure_comfy() first."""
    import importlib.util
    if name in sys.modules:
        return sys.modules[name]
    init = PACK_ROOT / "__init__.py"
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# --------------------------------------------------------------------------------------------
# Deterministic initialisation (ComfyUI builds its modules uninitialised, biases included)
# --------------------------------------------------------------------------------------------

def init_weights_(module, seed: int = 0):
    """Fill every tensor of module's state_dict: >= 2-D randn/sqrt(fan_in), 1-D weights 1,
    biases 0, 0-D tensors untouched. Deterministic for a given module structure and seed."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if t.dim() == 0 or not t.is_floating_point():
                continue
            if name.endswith("bias"):
                t.zero_()
            elif t.dim() == 1:
                t.fill_(1.0)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in ** 0.5)
    return module


# --------------------------------------------------------------------------------------------
# Tiny in-process SD1.5-style model
# --------------------------------------------------------------------------------------------

TINY_CONTEXT_DIM = 64

TINY_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": TINY_CONTEXT_DIM,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "use_checkpoint": False,
    "image_size": 32,
}

# The real-loader checkpoint's UNet: the smallest that ComfyUI still detects as SD1.5
# (detection needs model_channels 320 and context_dim 768).
SD15_SMALL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    context_dim=768,
)


def _sd15_config(unet_config: dict, dtype=None):
    import torch
    import comfy.supported_models

    class SD15ForTests(comfy.supported_models.SD15):
        pass

    SD15ForTests.unet_config = dict(unet_config)
    config = SD15ForTests(unet_config)  # adds SD15's unet_extra_config: num_heads 8, num_head_channels -1
    config.set_inference_dtype(dtype or torch.float32, None)
    return config


def make_tiny_model(seed: int = 0, dtype=None, unet_config: dict | None = None):
    """A tiny SD1.5-style ComfyUI model (EPS, SD15 latent format, context_dim 64) wrapped in a
    ModelPatcher on the CPU (or on ComfyUI's device when PARA_TEST_DEVICE is not cpu).
    Weights are initialised deterministically from seed. Needs setup_comfy() first."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    config = _sd15_config(unet_config or TINY_UNET_CONFIG, dtype)
    model = config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    load_device = mm.get_torch_device() if _configured.get("device", "cpu") != "cpu" else torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))


def random_conditioning(seed: int = 0, batch: int = 1, tokens: int = 77, dim: int = TINY_CONTEXT_DIM):
    """ComfyUI CONDITIONING ([[tensor (batch, tokens, dim), {}]]) with random values."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, dim, generator=gen), {}]]


def sample_latent(model, positive, negative, seed: int = 0, steps: int = 2, cfg: float = 1.0,
                  width: int = 64, height: int = 64, sampler: str = "euler", scheduler: str = "normal",
                  latent=None):
    """Run ComfyUI's KSampler path (nodes.common_ksampler) and return the latent tensor."""
    import torch
    import nodes
    if latent is None:
        latent = torch.zeros(1, 4, height // 8, width // 8)
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                   {"samples": latent})
    return out["samples"]


# --------------------------------------------------------------------------------------------
# Small SD1.5-format checkpoint for the real loaders
# --------------------------------------------------------------------------------------------

def _atomic_save(tensors: dict, path: Path, metadata: dict):
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_sd15_checkpoint(path, seed: int = 0, vae: str = "taesd") -> Path:
    """Write a small SD1.5-format checkpoint (fp16 safetensors) to path, atomically.

    UNet: ComfyUI's UNetModel, model_channels 320, one level, one res block, one transformer
    (25.8M params); text encoder: the full SD1 CLIP-L text model (comfy.sd1_clip.SDClipModel);
    VAE: TAESD-shaped ("taesd", default, 2.4M params) or the full SD AutoencoderKL ("kl").
    Every tensor is initialised from seed, so the same seed gives the same file contents.
    Keys: model.diffusion_model.*, cond_stage_model.*, first_stage_model.*; ComfyUI's
    CheckpointLoaderSimple loads it as SD15 (EPS). Imports ComfyUI (setup_comfy() if needed).
    """
    import torch
    if not _configured:
        setup_comfy()
    import comfy.sd1_clip
    import comfy.ops

    tensors = {}

    def add(prefix, module, drop=()):
        for k, v in module.state_dict().items():
            if k not in drop:
                tensors[prefix + k] = v.detach().to(torch.float16).contiguous()

    with torch.no_grad():
        unet = _sd15_config(SD15_SMALL_UNET_CONFIG).get_model({}, device=torch.device("cpu")).diffusion_model
        add("model.diffusion_model.", init_weights_(unet, seed))
        del unet

        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        # Real SD1.5 checkpoints carry neither (ComfyUI drops both when it saves an SD15).
        add("cond_stage_model.", init_weights_(clip, seed + 1),
            drop=("logit_scale", "transformer.text_projection.weight"))
        del clip

        if vae == "taesd":
            import comfy.taesd.taesd
            ae = init_weights_(comfy.taesd.taesd.TAESD(), seed + 2)
            # What ComfyUI's VAELoader sets for SD1.x TAESD: decode((x - shift) * scale).
            ae.vae_scale.fill_(0.18215)
            ae.vae_shift.fill_(0.0)
        elif vae == "kl":
            from comfy.ldm.models.autoencoder import AutoencoderKL
            ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                        "attn_resolutions": [], "dropout": 0.0}
            ae = init_weights_(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed + 2)
        else:
            raise ValueError(f"vae must be 'taesd' or 'kl', not {vae!r}")
        add("first_stage_model.", ae)
        del ae

    metadata = {
        "modelspec.title": "PaRa test SD1.5 (random weights, not a real model)",
        "para_test.builder_version": SD15_BUILDER_VERSION,
        "para_test.seed": str(seed),
        "para_test.vae": vae,
    }
    _atomic_save(tensors, Path(path), metadata)
    return Path(path)


def cache_dir() -> Path:
    """Where built test models are cached, outside the repo: $PARA_TEST_CACHE or
    ~/.cache/comfyui-para."""
    return Path(os.environ.get("PARA_TEST_CACHE") or Path.home() / ".cache" / "comfyui-para").expanduser()


def cached_metadata(path: Path) -> dict | None:
    """The safetensors metadata of a cached test model, or None when it is missing or unreadable
    (then the caller rebuilds it)."""
    if not Path(path).is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def _checkpoint_is_current(path: Path, seed: int, vae: str) -> bool:
    meta = cached_metadata(path)
    if meta is None:
        return False
    return (meta.get("para_test.builder_version") == SD15_BUILDER_VERSION
            and meta.get("para_test.seed") == str(seed) and meta.get("para_test.vae") == vae)


def cached_sd15_checkpoint(seed: int = 0, vae: str = "taesd") -> Path:
    """The test checkpoint in cache_dir(), built if missing or made by another builder version."""
    name = SD15_CHECKPOINT_NAME if (seed, vae) == (0, "taesd") else f"test_sd15_{vae}_s{seed}.safetensors"
    path = cache_dir() / name
    if not _checkpoint_is_current(path, seed, vae):
        build_sd15_checkpoint(path, seed=seed, vae=vae)
    return path


# --------------------------------------------------------------------------------------------
# API-format graphs
# --------------------------------------------------------------------------------------------

def txt2img_graph(ckpt_name: str = SD15_CHECKPOINT_NAME, positive: str = "a photo of a cat",
                  negative: str = "", seed: int = 0, steps: int = 2, cfg: float = 2.0,
                  width: int = 64, height: int = 64, sampler: str = "euler",
                  scheduler: str = "normal", save: str = "image", prefix: str = "para_test") -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler, then
    VAEDecode -> SaveImage (save="image"), SaveLatent (save="latent") or both ("both").
    Node ids: "ckpt", "pos", "neg", "latent", "sampler", "decode", "save_image", "save_latent";
    the MODEL feeding the sampler is ["ckpt", 0], so a test can splice a node in between."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
    }
    if save in ("image", "both"):
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
        g["save_image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    if save in ("latent", "both"):
        g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                                    "filename_prefix": f"latents/{prefix}"}}
    if save not in ("image", "latent", "both"):
        raise ValueError(f"save must be 'image', 'latent' or 'both', not {save!r}")
    return g


def load_latent(path):
    """The latent tensor from a SaveLatent file (model-space values, as KSampler output them)."""
    from safetensors.torch import load_file
    return load_file(str(path))["latent_tensor"]


# --------------------------------------------------------------------------------------------
# A real ComfyUI server in a subprocess
# --------------------------------------------------------------------------------------------

class PromptRejected(Exception):
    """POST /prompt answered 400: the graph did not validate. .body holds ComfyUI's JSON
    ({"error": {...}, "node_errors": {...}})."""

    def __init__(self, body):
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message", "") if isinstance(err, dict) else str(err)
        details = err.get("details", "") if isinstance(err, dict) else ""
        node_errors = body.get("node_errors") if isinstance(body, dict) else None
        super().__init__(f"prompt rejected: {msg} {details} node_errors={json.dumps(node_errors)}".strip())


class ExecutionFailed(Exception):
    """The prompt ran and ended with status 'error'. .history holds the history entry."""

    def __init__(self, message, history):
        self.history = history
        super().__init__(message)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WsCollector:
    """Collects the JSON messages that the server sends on /ws to one client id, in a
    background thread. Use as a context manager, or call close()."""

    def __init__(self, url: str):
        import websocket  # websocket-client
        self.messages: list[dict] = []
        self.binary: list[bytes] = []
        self._cond = threading.Condition()
        self._ws = websocket.create_connection(url, timeout=10)
        self._ws.settimeout(0.5)
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
            with self._cond:
                if isinstance(msg, bytes):
                    self.binary.append(msg)
                else:
                    try:
                        self.messages.append(json.loads(msg))
                    except ValueError:
                        pass
                self._cond.notify_all()

    def of_type(self, type_: str, prompt_id: str | None = None) -> list[dict]:
        """The data of every message of that type (e.g. "progress", "executing",
        "execution_error"), optionally only for one prompt."""
        with self._cond:
            out = [m.get("data", {}) for m in self.messages if m.get("type") == type_]
        if prompt_id is not None:
            out = [d for d in out if d.get("prompt_id") == prompt_id]
        return out

    def wait_for(self, predicate, timeout: float = 60.0) -> dict:
        """Block until a message satisfies predicate(message); return it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for m in self.messages[seen:]:
                    if predicate(m):
                        return m
                seen = len(self.messages)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching websocket message in {timeout}s "
                                       f"({len(self.messages)} messages seen)")
                self._cond.wait(left)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self._ws.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _die_with_parent():
    """In the child: get SIGTERM when the test process dies, even if it is killed and never
    reaches stop() (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


class ComfyServer:
    """ComfyUI's main.py in a subprocess, on a free loopback port, with every folder in a
    temporary base directory and this pack linked in as custom_nodes/ComfyUI-PaRa.

        server = ComfyServer(checkpoints=[path]).start()
        entry = server.run(graph)            # history entry; raises on rejection/error
        server.stop()
    """

    def __init__(self, comfyui_root=None, base_dir=None, checkpoints=(), port: int | None = None,
                 python: str | None = None, extra_args=(), link_pack: bool = True,
                 device: str | None = None):
        root = Path(comfyui_root) if comfyui_root else find_comfyui()
        if root is None:
            raise RuntimeError(COMFYUI_MISSING)
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
        self.client_id = uuid.uuid4().hex
        self.python = python or sys.executable
        self.extra_args = list(extra_args)
        self.device = device or os.environ.get("PARA_TEST_DEVICE", "cpu")
        self.proc: subprocess.Popen | None = None
        self._log_file = None

        for d in (self.models_dir / "checkpoints", self.models_dir / "para", self.models_dir / "loras",
                  self.output_dir, self.input_dir, self.user_dir, self.custom_nodes_dir):
            d.mkdir(parents=True, exist_ok=True)
        for ckpt in checkpoints:
            self.add_model("checkpoints", ckpt)
        if link_pack:
            link = self.custom_nodes_dir / PACK_DIR_NAME
            if not link.exists():
                link.symlink_to(PACK_ROOT, target_is_directory=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def add_model(self, folder: str, path, name: str | None = None) -> Path:
        """Symlink a file into models/<folder>/ (visible to ComfyUI's loaders without a restart)."""
        dest = self.models_dir / folder / (name or Path(path).name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        dest.symlink_to(Path(path).resolve())
        return dest

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
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=str(self.comfyui_root), env=env,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"ComfyUI exited with code {rc} while starting; log:\n{self.log_tail()}")
            try:
                self._get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"ComfyUI did not answer within {timeout}s; log:\n{self.log_tail()}")
            time.sleep(0.25)

    def stop(self):
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

    # ---- HTTP --------------------------------------------------------------------------------

    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """GET /object_info (every node), or the entry of one node class."""
        if node_class is None:
            return self._get("/object_info", timeout=60)
        return self._get("/object_info/" + urllib.parse.quote(node_class)).get(node_class)

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected (with ComfyUI's JSON) when
        the graph does not validate."""
        body = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
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
            raise RuntimeError(f"POST /prompt answered {e.code}: {payload}") from None
        return out["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self._get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 120.0, poll: float = 0.1) -> dict:
        """Poll /history/<id> until the prompt has finished (success or error); return its
        history entry. Raises TimeoutError (with the log tail) after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # ComfyUI adds the entry once the prompt has finished
                return entry
            if not self.running:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}; log:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s; log:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, prompt: dict, timeout: float = 120.0, check: bool = True) -> dict:
        """queue() + wait(). With check=True, a prompt that ends in error raises ExecutionFailed
        with ComfyUI's exception message."""
        entry = self.wait(self.queue(prompt), timeout)
        if check and status_str(entry) != "success":
            raise ExecutionFailed(f"prompt failed: {error_message(entry)}", entry)
        return entry

    def interrupt(self):
        """POST /interrupt: cancels the running prompt (the UI's Cancel button)."""
        self._request("POST", "/interrupt", {})

    def clear_queue(self):
        self._request("POST", "/queue", {"clear": True})

    def free_memory(self, unload_models: bool = True):
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": True})

    def ws_messages(self) -> WsCollector:
        """Connect to /ws with this server's client id and collect messages in the background.
        Open it before queue() to see that prompt's progress/executing messages."""
        return WsCollector(f"ws://{self.host}:{self.port}/ws?clientId={self.client_id}")

    def output_files(self, entry: dict, kind: str | None = None) -> list[Path]:
        """Paths of the files a finished prompt reported in its outputs (images, latents, ...);
        kind filters on the output key ("images", "latents")."""
        roots = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for key, items in node_out.items():
                if kind is not None and key != kind:
                    continue
                for item in items if isinstance(items, list) else []:
                    if isinstance(item, dict) and "filename" in item:
                        base = roots.get(item.get("type", "output"), self.output_dir)
                        paths.append(base / item.get("subfolder", "") / item["filename"])
        return paths


def status_str(entry: dict) -> str | None:
    return (entry.get("status") or {}).get("status_str")


def error_details(entry: dict) -> dict | None:
    """The data of the execution_error (or execution_interrupted) message of a history entry:
    exception_message, exception_type, node_id, node_type, traceback."""
    for msg in (entry.get("status") or {}).get("messages", []):
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] in ("execution_error", "execution_interrupted"):
            return dict(msg[1], event=msg[0])
    return None


def error_message(entry: dict) -> str | None:
    """The exception message of a failed prompt (None when it did not fail)."""
    d = error_details(entry)
    if d is None:
        return None
    if d["event"] == "execution_interrupted":
        return "interrupted"
    return d.get("exception_message", "").strip()


# The module-level helpers, also reachable from a server object.
ComfyServer.error_message = staticmethod(error_message)
ComfyServer.error_details = staticmethod(error_details)
ComfyServer.status_str = staticmethod(status_str)
ComfyServer.load_latent = staticmethod(load_latent)
