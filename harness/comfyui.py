"""Find ComfyUI, configure and import it in this process, and import this pack the way ComfyUI does.

ComfyUI must be configured before its first import: `comfy.model_management` picks the device
when it is imported, and on a machine without an NVIDIA driver it crashes unless `args.cpu` is
already set. `configure_comfy()` does that cheaply, without importing torch; `setup_comfy()` also
imports ComfyUI's model management. Only the standard library is imported here.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
# The folder name the README installs the pack under (custom_nodes/ComfyUI-PaRa); servers link it so.
PACK_DIR_NAME = "ComfyUI-PaRa"

COMFYUI_MISSING = ("ComfyUI not found: set COMFYUI_PATH (one checkout) or COMFYUI_PATHS (several), or clone it "
                   "to ~/ComfyUI; see README")

DEFAULT_COMFYUI_PATHS = ("~/ComfyUI", "~/ComfyUI-0.33")


def is_comfyui_root(path) -> bool:
    path = Path(path)
    return (path / "main.py").is_file() and (path / "comfy").is_dir()


def comfyui_candidates(pack_root=None) -> list[tuple[str, Path]]:
    """Where ComfyUI is looked for, in order, as (reason, path): $COMFYUI_PATH; the ComfyUI that
    holds the pack (pack_root, default this checkout) in custom_nodes; then each entry of
    $COMFYUI_PATHS (os.pathsep separated), or, when that is unset, ~/ComfyUI and ~/ComfyUI-0.33."""
    out = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        out.append(("COMFYUI_PATH", Path(env).expanduser()))
    # A user's install: ComfyUI/custom_nodes/<pack>. Check the path as written and with symlinks
    # resolved, since packs are often linked into custom_nodes.
    packs = [Path(os.path.abspath(pack_root)), Path(pack_root).resolve()] if pack_root is not None else \
        [Path(os.path.abspath(__file__)).parent.parent, PACK_ROOT]
    for pack in packs:
        if pack.parent.name == "custom_nodes":
            out.append(("custom_nodes parent", pack.parent.parent))
    paths = os.environ.get("COMFYUI_PATHS")
    if paths is not None:
        out += [("COMFYUI_PATHS", Path(p).expanduser()) for p in paths.split(os.pathsep) if p.strip()]
    else:
        out += [(p, Path(p).expanduser()) for p in DEFAULT_COMFYUI_PATHS]
    return out


def find_all_comfyui(pack_root=None) -> list[Path]:
    """Every distinct ComfyUI root among comfyui_candidates(), in that order (each counts only if
    it has main.py and comfy/). The test suite runs once per root (.ci/run)."""
    roots: list[Path] = []
    for _, path in comfyui_candidates(pack_root):
        if is_comfyui_root(path) and path.resolve() not in roots:
            roots.append(path.resolve())
    return roots


def find_comfyui(pack_root=None) -> Path | None:
    """The ComfyUI root to use in this process, or None: the first of find_all_comfyui()
    ($COMFYUI_PATH first when it is a ComfyUI checkout)."""
    roots = find_all_comfyui(pack_root)
    return roots[0] if roots else None


def comfyui_version(root) -> str:
    """The version a ComfyUI checkout says it is (comfyui_version.py, else pyproject.toml), read
    from the files without importing anything; "unknown" when neither says."""
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


def configured() -> dict:
    """What configure_comfy() set in this process: {"root", "device", "base_directory"}; {} before."""
    return dict(_configured)


class _ComfyUINodesFinder:
    """A meta path finder that resolves the top-level module `nodes` to <ComfyUI root>/nodes.py."""

    def __init__(self, root: Path):
        self.path = Path(root) / "nodes.py"

    def find_spec(self, name, path=None, target=None):
        if name != "nodes" or path is not None:
            return None
        return importlib.util.spec_from_file_location("nodes", self.path)


def configure_comfy(root=None, base_directory=None, device: str | None = None) -> Path:
    """Put ComfyUI first on sys.path and set its command-line args; import no torch.

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

    # The pack has a nodes/ package and ComfyUI a nodes.py module: ComfyUI's must win, so its
    # root goes first and nothing may have imported the pack's nodes/ as `nodes` yet.
    loaded = sys.modules.get("nodes")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(root)):
        raise RuntimeError(
            f"`nodes` is already imported from {getattr(loaded, '__file__', loaded)}; ComfyUI's "
            "nodes.py cannot be imported. Import the pack's nodes/ through harness.comfyui.import_pack().")
    root_str = str(root)
    while root_str in sys.path:
        sys.path.remove(root_str)
    sys.path.insert(0, root_str)
    # The pack's root is on sys.path too (to import para_core and harness), often at the front;
    # from then on a first `import nodes` would find the pack's nodes/ package. ComfyUI's
    # nodes.py is `nodes` in this process whatever the path order.
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
