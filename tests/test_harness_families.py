"""harness.families' cache: one file per module layout (shared by ComfyUI versions whose modules
agree), rebuilt when stale, and the old one-folder-per-version files cleaned up.

Uses SD3 (the smallest family, 4 MB) in a temporary PARA_TEST_CACHE."""
import pytest

from harness import families as fm, models


@pytest.fixture
def cache(tmp_path, monkeypatch, comfy_in_process):
    monkeypatch.setenv("PARA_TEST_CACHE", str(tmp_path))
    return tmp_path / "families"


def test_the_file_is_named_by_its_layout_not_by_the_comfyui_version(cache):
    path = fm.cached("sd3")
    sig = fm.signature("sd3")
    assert path == cache / sig / fm.file_name("sd3")
    assert fm.comfyui_version() not in path.parts
    meta = models.cached_metadata(path)
    assert meta["para_test.signature"] == sig and meta["para_test.family"] == "sd3"
    # the signature covers what the file holds: seed, and each tensor's name and shape
    assert fm.signature("sd3", seed=1) != sig
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    module = {k: list(v.shape) for k, v in fm._module("sd3", meta=True).state_dict().items()}
    assert shapes == module


def test_a_current_file_is_reused_and_a_stale_one_rebuilt(cache):
    path = fm.cached("sd3")
    mtime = path.stat().st_mtime_ns
    assert fm.cached("sd3") == path and path.stat().st_mtime_ns == mtime
    # a file of another layout under this signature's name (as a ComfyUI upgrade would leave)
    import torch
    models.atomic_save({"x": torch.zeros(1)}, path, {"para_test.family": "sd3", "para_test.seed": "0",
                                                     "para_test.builder_version": fm.BUILDER_VERSION,
                                                     "para_test.config": "old", "para_test.signature": "0" * 16})
    assert fm.cached("sd3") == path
    assert models.cached_metadata(path)["para_test.signature"] == fm.signature("sd3")


def test_old_per_version_files_are_removed_and_nothing_else(cache):
    import torch
    meta = {"para_test.family": "sd3", "para_test.seed": "0", "para_test.builder_version": fm.BUILDER_VERSION,
            "para_test.config": fm._config_tag("sd3")}
    old = cache / "0.3.64" / fm.file_name("sd3")                        # the old layout
    models.atomic_save({"x": torch.zeros(1)}, old, meta)
    outdated = cache / ("a" * 16) / fm.file_name("sd3")                 # an older builder's config
    models.atomic_save({"x": torch.zeros(1)}, outdated, dict(meta, **{"para_test.config": "old"}))
    other_layout = cache / ("b" * 16) / fm.file_name("sd3")             # another ComfyUI's layout
    models.atomic_save({"x": torch.zeros(1)}, other_layout, dict(meta, **{"para_test.signature": "b" * 16}))
    other_family = cache / "0.3.64" / fm.file_name("flux")              # not this family's
    models.atomic_save({"x": torch.zeros(1)}, other_family, dict(meta, **{"para_test.family": "flux"}))
    foreign = cache / "0.33.0" / fm.file_name("sd3")                    # not ours: no para_test metadata
    models.atomic_save({"x": torch.zeros(1)}, foreign, {})

    path = fm.cached("sd3")
    assert path.is_file()
    assert not old.exists() and not outdated.exists() and not outdated.parent.exists()
    assert other_layout.exists() and other_family.exists() and foreign.exists()


def _as_built_elsewhere(path, sig, drop=None):
    """The file at path re-saved as another ComfyUI version would have built it (its own signature
    folder), optionally without one tensor; returns the new file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in load_file(str(path)).items() if k != drop}
    other = path.parent.parent / sig / path.name
    models.atomic_save(tensors, other, dict(meta, **{"para_test.signature": sig}))
    return other


def test_a_file_another_comfyui_built_is_shared_when_it_loads_completely(cache):
    import shutil
    built = fm.cached("sd3")
    other = _as_built_elsewhere(built, "c" * 16)
    shutil.rmtree(built.parent)
    path = fm.cached("sd3")
    assert path == built and path.is_symlink() and path.resolve() == other.resolve()
    assert fm.cached("sd3") == path and path.is_symlink()       # the link is reused, nothing rebuilt
    assert other.exists()


def test_a_file_missing_a_weight_here_is_not_shared(cache):
    import shutil
    built = fm.cached("sd3")
    other = _as_built_elsewhere(built, "d" * 16, drop="final_layer.linear.weight")
    shutil.rmtree(built.parent)
    path = fm.cached("sd3")
    assert path.is_file() and not path.is_symlink()
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert "final_layer.linear.weight" in f.keys()
    assert other.exists()                                        # another layout's file stays
