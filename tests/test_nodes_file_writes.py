"""Files the nodes write, in-process against real ComfyUI classes: with the umask's permissions,
never replacing a file another writer (another ComfyUI sharing the folder) made at the same
moment, PEFT exports into their own folder, a PEFT adapter's changed config read again, and the
crash leftovers removed at the pack's start but never listed before."""
import json
import os
import stat

import pytest
import torch

from pack_helpers import folder, subject_state

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]


def test_node_written_files_get_the_umasks_permissions(mods, tiny_model):
    old = os.umask(0o022)
    try:
        st = subject_state(mods, tiny_model)
        saved = mods.pn.PaRaSave.execute(para=st, filename_prefix="perm", dtype="fp32").args[0]
        lora = mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=st, filename_prefix="perm_lora", strength=1.0,
                                              dtype="fp32").args[0]
    finally:
        os.umask(old)
    for kind, name in (("para", saved), ("loras", lora)):
        assert stat.S_IMODE(os.stat(os.path.join(folder(kind), name)).st_mode) == 0o644


def another_writer_finishes_first(mods, monkeypatch):
    """Every write from here on loses a race, deterministically: another ComfyUI sharing the
    folder picked the same name at the same moment (both listed the folder before either wrote)
    and its file appears at that name just before this write's file is complete. Returns
    {name: the other writer's bytes}."""
    real, theirs = mods.write.atomic_write, {}

    def racing(path, write, *a, **k):
        name = os.fspath(path[0] if isinstance(path, (list, tuple)) else path)

        def write_then_lose(tmp):
            write(tmp)
            if name not in theirs:
                theirs[name] = f"the other server's {os.path.basename(name)}".encode()
                with open(name, "xb") as f:
                    f.write(theirs[name])

        return real(path, write_then_lose, *a, **k)

    monkeypatch.setattr(mods.write, "atomic_write", racing)
    return theirs


@pytest.mark.parametrize("node", ["PaRaSave", "PaRaExportLoRA"])
def test_a_name_another_writer_takes_during_a_save_is_never_replaced(mods, tiny_model, monkeypatch, node):
    from safetensors import safe_open
    st = subject_state(mods, tiny_model, seed=7)
    kind = "loras" if node == "PaRaExportLoRA" else "para"
    theirs = another_writer_finishes_first(mods, monkeypatch)
    if node == "PaRaSave":
        out = mods.pn.PaRaSave.execute(para=st, filename_prefix="raced/save", dtype="fp32")
    else:
        out = mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=st, filename_prefix="raced/lora", strength=1.0,
                                             dtype="fp32")
    (raced,) = theirs
    with open(raced, "rb") as f:
        assert f.read() == theirs[raced], "the other writer's file was replaced"
    mine = os.path.join(folder(kind), out.args[0])
    assert os.path.abspath(mine) != os.path.abspath(raced)
    assert f"models/{kind}/{out.args[0]}" in json.dumps(out.ui.as_dict())
    with safe_open(mine, "pt") as f:
        if node == "PaRaSave":
            layer = st.layers[0]
            assert torch.equal(f.get_tensor(f"{layer}.para_B"), st.B[layer])
        else:
            assert f.keys()
    assert not [n for n in os.listdir(os.path.dirname(mine)) if n.endswith(".para-tmp")]


def test_a_peft_export_never_writes_into_a_folder_another_writer_made(mods, tiny_model, monkeypatch):
    """format peft-deft writes a folder <prefix>_NNNNN_: another ComfyUI that listed models/para
    at the same moment made that folder (and wrote its adapter) just after this one listed it."""
    import folder_paths
    real, theirs = folder_paths.get_save_image_path, {}

    def listed_then_taken(prefix, folder_, *a, **k):
        got = real(prefix, folder_, *a, **k)
        full, filename, counter = got[0], got[1], got[2]
        other = os.path.join(full, f"{filename}_{counter:05}_")
        if prefix.startswith("raced_peft") and not theirs:
            os.makedirs(other)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                theirs[os.path.join(other, name)] = f"the other server's {name}".encode()
                with open(os.path.join(other, name), "wb") as f:
                    f.write(theirs[os.path.join(other, name)])
        return got

    monkeypatch.setattr(folder_paths, "get_save_image_path", listed_then_taken)
    st = subject_state(mods, tiny_model, seed=8)
    out = mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=st, filename_prefix="raced_peft", strength=1.0,
                                         dtype="fp32", format="peft-deft")
    assert theirs
    for path, data in theirs.items():
        with open(path, "rb") as f:
            assert f.read() == data, f"{path} was replaced"
    mine = os.path.join(folder("para"), out.args[0])
    assert os.path.dirname(mine) != os.path.dirname(next(iter(theirs)))
    assert sorted(os.listdir(os.path.dirname(mine))) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_peft_adapters_changed_config_is_read_again(mods, tiny_model):
    """PaRa Load reads a PEFT adapter's weights with its adapter_config.json: a changed config
    (here para=false, which the pack refuses) is noticed, not served from the cache."""
    st = subject_state(mods, tiny_model, seed=9)
    rel = mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=st, filename_prefix="peft_cfg", strength=1.0,
                                         dtype="fp32", format="peft-deft").args[0]
    stamp = mods.pn.PaRaLoad.fingerprint_inputs(para_name=rel)
    mods.pn.PaRaLoad.execute(para_name=rel)
    config = os.path.join(folder("para"), os.path.dirname(rel), "adapter_config.json")
    with open(config) as f:
        cfg = json.load(f)
    cfg["para"] = False
    with open(config, "w") as f:
        json.dump(cfg, f)
    assert mods.pn.PaRaLoad.fingerprint_inputs(para_name=rel) != stamp
    with pytest.raises(mods.core.ParaError, match="para"):
        mods.pn.PaRaLoad.execute(para_name=rel)


@pytest.mark.parametrize("prefix, says", [("bad\x00name", "NUL"), ("p" * 250, "too long")])
def test_a_peft_export_checks_its_prefix_first(mods, tiny_model, prefix, says):
    st = subject_state(mods, tiny_model, seed=8)
    before = sorted(os.listdir(folder("para")))
    with pytest.raises(mods.core.ParaError, match=f"input 'filename_prefix'.*{says}"):
        mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=st, filename_prefix=prefix, strength=1.0, dtype="fp32",
                                       format="peft-deft")
    assert sorted(os.listdir(folder("para"))) == before


def test_pack_start_removes_crash_leftovers_that_the_lists_never_show(mods):
    import folder_paths
    dead_pid = 2 ** 22 + 12345  # above the kernel's pid_max default: no such process
    leftovers = [os.path.join(folder("para"), f".x.safetensors.{dead_pid}-0123abcd.para-tmp"),
                 os.path.join(folder("loras"), f".y.safetensors.{dead_pid}-0123abcd.para-tmp"),
                 os.path.join(folder("para"), ".tmp-k2j4h5g6.safetensors"),
                 os.path.join(folder("para"), "run_00001_step000004.trainer.pt")]
    for p in leftovers:
        with open(p, "wb") as f:
            f.write(b"left")
    listed = set(folder_paths.get_filename_list("para"))
    assert os.path.basename(leftovers[0]) not in listed
    mods.nodes.setup()
    assert not [p for p in leftovers if os.path.exists(p)]
    folder_paths.filename_list_cache.clear()
    assert not {".tmp-k2j4h5g6.safetensors"} & set(folder_paths.get_filename_list("para"))
