"""harness.comfyui: which ComfyUI the tests and tools use, and that it is the one imported."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import comfyui


def fake_comfyui(folder: Path, version: str | None = None) -> Path:
    (folder / "comfy").mkdir(parents=True)
    (folder / "main.py").write_text("")
    if version:
        (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return folder


def test_find_comfyui_prefers_comfyui_path(tmp_path, monkeypatch):
    fake = fake_comfyui(tmp_path / "ComfyUI")
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    assert comfyui.find_comfyui() == fake.resolve()


def test_find_comfyui_ignores_a_folder_without_main_py(tmp_path, monkeypatch):
    (tmp_path / "comfy").mkdir()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert comfyui.find_comfyui() != tmp_path.resolve()


def test_comfyui_paths_lists_every_checkout_once_in_order(tmp_path, monkeypatch):
    a, b = fake_comfyui(tmp_path / "a", "0.3.64"), fake_comfyui(tmp_path / "b", "0.33.0")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("COMFYUI_PATHS", os.pathsep.join([str(b), str(tmp_path / "missing"), str(a), str(b)]))
    roots = comfyui.find_all_comfyui()
    assert roots[-2:] == [b.resolve(), a.resolve()] and len(set(roots)) == len(roots)
    assert [comfyui.comfyui_version(r) for r in roots[-2:]] == ["0.33.0", "0.3.64"]


def test_comfyui_path_comes_before_comfyui_paths(tmp_path, monkeypatch):
    a, b = fake_comfyui(tmp_path / "a"), fake_comfyui(tmp_path / "b")
    monkeypatch.setenv("COMFYUI_PATH", str(b))
    monkeypatch.setenv("COMFYUI_PATHS", os.pathsep.join([str(a), str(b)]))
    roots = comfyui.find_all_comfyui()
    assert roots[0] == comfyui.find_comfyui() == b.resolve()
    # (the ComfyUI that holds this checkout in custom_nodes, if any, comes between them)
    assert [r for r in roots if r in (a.resolve(), b.resolve())] == [b.resolve(), a.resolve()]


def test_the_comfyui_holding_the_pack_comes_after_comfyui_path_and_before_the_list(tmp_path, monkeypatch):
    a, b = fake_comfyui(tmp_path / "a"), fake_comfyui(tmp_path / "b")
    holder = fake_comfyui(tmp_path / "ComfyUI")
    pack = holder / "custom_nodes" / "ComfyUI-PaRa"
    pack.mkdir(parents=True)
    linked = tmp_path / "elsewhere" / "ComfyUI-PaRa"  # a pack linked into custom_nodes counts too
    linked.parent.mkdir()
    linked.symlink_to(pack, target_is_directory=True)
    monkeypatch.setenv("COMFYUI_PATH", str(b))
    monkeypatch.setenv("COMFYUI_PATHS", str(a))
    expected = [b.resolve(), holder.resolve(), a.resolve()]
    assert comfyui.find_all_comfyui(pack_root=pack) == expected
    assert comfyui.find_all_comfyui(pack_root=linked) == expected
    monkeypatch.delenv("COMFYUI_PATH")
    assert comfyui.find_comfyui(pack_root=pack) == holder.resolve()


def test_default_paths_are_both_comfyui_versions(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("COMFYUI_PATHS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    old, new = fake_comfyui(tmp_path / "ComfyUI", "0.3.64"), fake_comfyui(tmp_path / "ComfyUI-0.33", "0.33.0")
    assert comfyui.find_all_comfyui()[-2:] == [old.resolve(), new.resolve()]


def test_comfyui_version_reads_the_checkout_without_importing_it(tmp_path):
    assert comfyui.comfyui_version(fake_comfyui(tmp_path / "v", "0.33.0")) == "0.33.0"
    assert comfyui.comfyui_version(fake_comfyui(tmp_path / "none")) == "unknown"
    assert comfyui.version_tuple("0.33.0") > comfyui.version_tuple("0.3.64")


def test_the_comfyui_under_test_is_the_one_imported(comfyui_path, comfyui_version, comfy_in_process):
    import comfyui_version as imported
    assert Path(imported.__file__).resolve().parent == comfyui_path
    assert imported.__version__ == comfyui_version


def test_comfyuis_nodes_module_wins_over_the_packs_nodes_package(comfyui_path, comfy_in_process):
    """The pack's root is on sys.path (to import para_core and harness); `import nodes` must
    still be ComfyUI's nodes.py, also when it is imported for the first time after that."""
    root = str(comfyui.PACK_ROOT)
    code = (f"import sys; sys.path.insert(0, {root!r}); from harness import comfyui; "
            f"comfyui.configure_comfy({str(comfyui_path)!r}); "
            f"sys.path.insert(0, {root!r}); import nodes; print(nodes.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == comfyui_path / "nodes.py"


@pytest.mark.slow  # (and so never run again by the suite it starts, which runs no slow test)
def test_the_suite_runs_from_a_checkout_in_custom_nodes_named_as_the_readme_says(tmp_path, comfyui_path):
    """The README installs the pack as ComfyUI/custom_nodes/ComfyUI-PaRa: a folder name that is not
    a Python name, holding the pack's __init__.py, inside a ComfyUI that the harness then finds
    too. Tests collected and run from there (a copy of this checkout) pass."""
    import shutil
    holder = fake_comfyui(tmp_path / "ComfyUI")
    checkout = holder / "custom_nodes" / comfyui.PACK_DIR_NAME
    shutil.copytree(comfyui.PACK_ROOT, checkout, symlinks=True,
                    ignore=shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "results", "screenshots"))
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path))
    env.pop("PYTHONPATH", None)
    # every test module is collected (imported); the ones that run are quick and need no server
    out = subprocess.run([sys.executable, "-m", "pytest", str(checkout / "tests"), "-q", "-p", "no:cacheprovider",
                          "-m", "not server and not slow", "-k", "test_harness_comfyui or test_core_presets"],
                         cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, tail
    summary = tail.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ passed, \d+ deselected in .*", summary), tail
