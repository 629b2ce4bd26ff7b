"""Pytest fixtures for the PaRa tests.

Core tests (para_core only) need nothing from here and always run. Tests that need ComfyUI
use one of the fixtures below or the `comfyui` marker; they are skipped with one clear
message when no ComfyUI checkout is found (see harness.comfyui.find_comfyui).

At configure time, when ComfyUI is found, its root goes first on sys.path and its args are set
for tests (CPU, a temporary --base-directory): nothing is imported from ComfyUI yet, but a test
module may then `import comfy...` / `import nodes` (ComfyUI's nodes.py) at module level.
The pack itself is imported with harness.comfyui.import_pack() (fixture `para_pack`), never as
`import nodes`.

The repository root holds the pack's __init__.py (what ComfyUI imports); pytest would collect the
root as a package and import that file as a test module, which fails when the folder's name is
not a Python name (custom_nodes/ComfyUI-PaRa, as the README installs it). The plugin below makes
the root a plain directory for pytest, whatever its name.
"""

import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from harness import comfyui, models, server

REPO_ROOT = Path(__file__).resolve().parent.parent

# Fixtures that need a ComfyUI checkout; tests using them get the `comfyui` marker.
COMFY_FIXTURES = {"comfyui_path", "comfyui_version", "comfy_in_process", "comfy_base_dir", "tiny_model",
                  "tiny_model_factory", "sd15_checkpoint", "comfy_server", "para_pack", "mods"}
SERVER_FIXTURES = {"comfy_server"}

_state = {"root": None, "base_dir": None, "version": None}


class _RepoRootIsADirectory:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    # Registered as a plugin (not a conftest hook): pytest asks the hooks of a directory's
    # parent how to collect it, and no conftest lies above the root.
    config.pluginmanager.register(_RepoRootIsADirectory(), "para-repo-root-is-a-directory")
    config.addinivalue_line("markers", "comfyui: needs a ComfyUI checkout (skipped when none is found)")
    config.addinivalue_line("markers", "server: starts a ComfyUI server subprocess")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    root = comfyui.find_comfyui()
    if root is not None:
        base = Path(tempfile.mkdtemp(prefix="para-comfy-inproc-"))
        for sub in ("models/checkpoints", "models/para", "models/loras", "input", "output", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        comfyui.configure_comfy(root, base_directory=base)
        _state.update(root=root, base_dir=base, version=comfyui.comfyui_version(root))


def pytest_unconfigure(config):
    if _state["base_dir"] is not None:
        shutil.rmtree(_state["base_dir"], ignore_errors=True)


def pytest_report_header(config):
    root = _state["root"]
    others = [str(r) for r in comfyui.find_all_comfyui()[1:]]
    also = f" (also found, not tested in this run: {', '.join(others)}; .ci/run tests each)" if others else ""
    return (f"ComfyUI {_state['version']}: {root}{also}" if root
            else f"ComfyUI: absent ({comfyui.COMFYUI_MISSING})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line that says which ComfyUI this run covered and how its ComfyUI tests went
    (.ci/run collects these lines, one per ComfyUI version)."""
    counts = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        reports = terminalreporter.stats.get(outcome, [])
        counts[outcome] = sum(1 for r in reports if getattr(r, "when", "call") in ("call", "setup")
                              and "comfyui" in getattr(r, "keywords", {}))
    total = sum(1 for r in terminalreporter.stats.get("passed", []) if getattr(r, "when", "") == "call")
    what = f"ComfyUI {_state['version']} at {_state['root']}" if _state["root"] else "no ComfyUI"
    terminalreporter.write_line(
        f"PARA-COVERED: {what}: ComfyUI tests {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['error']} errors, {counts['skipped']} skipped; {total} passed in all")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=comfyui.COMFYUI_MISSING)
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & COMFY_FIXTURES and not item.get_closest_marker("comfyui"):
            item.add_marker("comfyui")
        if names & SERVER_FIXTURES and not item.get_closest_marker("server"):
            item.add_marker("server")
        if _state["root"] is None and item.get_closest_marker("comfyui"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    """The ComfyUI root (skips the test when there is none)."""
    if _state["root"] is None:
        pytest.skip(comfyui.COMFYUI_MISSING)
    return _state["root"]


@pytest.fixture(scope="session")
def comfyui_version(comfyui_path) -> str:
    """The version of the ComfyUI under test, e.g. "0.3.64" or "0.33.0" (compare with
    harness.comfyui.version_tuple)."""
    return _state["version"]


@pytest.fixture(scope="session")
def comfy_base_dir(comfyui_path) -> Path:
    """The in-process ComfyUI's --base-directory (models/, output/, input/, temp/, user/), a
    session temp folder, so tests never write into the ComfyUI checkout."""
    return _state["base_dir"]


@pytest.fixture(scope="session")
def comfy_in_process(comfyui_path) -> Path:
    """ComfyUI importable in this process, on the CPU (unless PARA_TEST_DEVICE says otherwise),
    with folder_paths under comfy_base_dir. Returns the ComfyUI root."""
    return comfyui.setup_comfy(comfyui_path)


@pytest.fixture(scope="session")
def tiny_model_factory(comfy_in_process):
    """make(seed=0, dtype=None, unet_config=None) -> a fresh tiny SD1.5-style ModelPatcher
    (model_channels 32, context_dim 64, channel_mult [1, 2]; CPU; deterministic weights)."""
    return models.make_tiny_model


@pytest.fixture
def tiny_model(tiny_model_factory):
    """A fresh tiny SD1.5-style ModelPatcher, weights from seed 0. Conditioning: (1, 77, 64),
    e.g. harness.models.random_conditioning(seed)."""
    return tiny_model_factory(seed=0)


@pytest.fixture(scope="session")
def sd15_checkpoint(comfy_in_process, comfy_base_dir) -> Path:
    """Path of the small SD1.5-format test checkpoint (cached in $PARA_TEST_CACHE or
    ~/.cache/comfyui-para, built on first use). It is also linked into the in-process
    models/checkpoints, so nodes.CheckpointLoaderSimple().load_checkpoint(path.name) works."""
    path = models.cached_sd15_checkpoint()
    link = comfy_base_dir / "models" / "checkpoints" / path.name
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(path)
    return path


@pytest.fixture(scope="session")
def comfy_server(comfyui_path, sd15_checkpoint):
    """A running ComfyUI server (harness.server.ComfyServer; its .client talks to it) with the test
    checkpoint in models/checkpoints and this pack in custom_nodes/ComfyUI-PaRa; stopped at
    session end."""
    srv = server.ComfyServer(comfyui_path, checkpoints=[sd15_checkpoint])
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="session")
def para_pack(comfy_in_process):
    """This pack imported in-process the way ComfyUI imports a custom node (its __init__.py as a
    package), e.g. para_pack.NODE_CLASS_MAPPINGS."""
    return comfyui.import_pack()


class PackModules:
    """The pack's modules as ComfyUI imports them (under the pack's package name, see para_pack):
    by dotted path, ``mods("nodes.patching")`` or ``mods["nodes.patching"]``, or by a short name
    of SHORT, ``mods.patching``. Each module is imported on first use."""

    SHORT = {
        "core": "para_core",
        "projection": "para_core.functional.projection",
        "reference": "para_core.functional.reference",
        "trainer_state": "para_core.trainer_state",
        "write": "para_core.write",
        "nodes": "nodes",
        "pn": "nodes.para_nodes",
        "patching": "nodes.patching",
        "trainer": "nodes.trainer_node",
        "training": "nodes.training_loop",
        "previews": "nodes.previews",
        "dynamic_vram": "nodes.dynamic_vram",
        "peft": "nodes.peft",
        "adapters_base": "nodes.adapters.base",
        "para": "nodes.adapters.para",
        "reference_adapter": "nodes.adapters.reference",
    }

    def __init__(self, package):
        self.package = package

    def __call__(self, name: str):
        return importlib.import_module(f"{self.package.__name__}.{name}")

    __getitem__ = __call__

    def __getattr__(self, short: str):
        if short not in PackModules.SHORT:
            raise AttributeError(f"PackModules has no short name {short!r}; use mods({short!r}) with a dotted path")
        return self(PackModules.SHORT[short])


@pytest.fixture(scope="session")
def mods(para_pack) -> PackModules:
    """The pack's modules in-process (PackModules), with the pack's nodes set up (nodes.setup():
    models/para registered with folder_paths, as at ComfyUI's start)."""
    importlib.import_module(para_pack.__name__ + ".nodes").setup()
    return PackModules(para_pack)


@pytest.fixture
def umask_022():
    """The process umask set to 022 for one test (files written should then be 0644)."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@pytest.fixture(autouse=True)
def torch_grad_mode_is_restored(request):
    """Every test starts with torch's grad mode as the session had it. A test that calls code
    which switches it off process-wide (``torch.set_grad_enabled(False)``, e.g. bench/quality.py's
    run, called in-process) would otherwise make every later gradient test fail with "element 0
    of tensors does not require grad" far from the cause; the guard restores it and names the
    test that leaked it."""
    torch = sys.modules.get("torch")
    before = torch.is_grad_enabled() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if before is None:
        before = True  # torch was first imported by this test: its default is grad enabled
    if torch.is_grad_enabled() != before:
        torch.set_grad_enabled(before)
        import warnings
        warnings.warn(f"{request.node.nodeid} left torch grad mode {'on' if not before else 'off'} process-wide "
                      "(torch.set_grad_enabled); restored for the next tests. Scope it with torch.no_grad() instead.",
                      pytest.PytestWarning)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module (use with pytest.mark.usefixtures): the tiny test models' ops
    are too small to gain from threads, and on a shared 2-core machine two spinning OpenMP threads
    make every training step several times slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
