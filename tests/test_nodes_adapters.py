"""Issue 13 in-process against real ComfyUI classes: the stock Load LoRA path validates like PaRa
Load, no non-finite weight is applied, combos checked, node files' permissions and crash
leftovers, and the trainer's resume/checkpoint failures."""
import json
import os
import shutil
import stat

import pytest
import torch

from harness import models
from trainer_helpers import trainer_settings

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]


def folder(kind):
    import folder_paths
    return folder_paths.get_folder_paths(kind)[0]


def subject_state(mods, model, seed=1, rank=2, layers=None):
    shapes = mods.patching.layer_shapes(model)
    layers = layers or mods.core.select_layers(shapes, "noxattn")
    g = torch.Generator().manual_seed(seed)
    B = {l: torch.randn(shapes[l][0], rank, generator=g) for l in layers}
    return mods.core.ParaState(B=B, metadata=mods.core.build_metadata("subject", rank=rank, base_arch="SD15"))


def patched_weights(model):
    import comfy.model_management as mm
    with torch.no_grad():
        mm.load_models_gpu([model], force_full_load=True)
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def stock_load(model, name):
    """ComfyUI's own 'LoraLoaderModelOnly' node, then what KSampler does first: load (= patch) the model."""
    import nodes as comfy_nodes
    (patched,) = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)
    return patched_weights(patched)


def para_load(mods, model, name):
    """PaRa Loader on the same file (from models/para), patched the same way."""
    (patched,) = mods.pn.PaRaLoader.execute(model=model, para_name=name, strength=1.0).args
    return patched_weights(patched)


def write_raw(path, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


# ------------------------------------------------------------------------- 1. stock Load LoRA validates

def broken_files(mods, model):
    shapes = mods.patching.layer_shapes(model)
    layers = mods.core.select_layers(shapes, "noxattn")
    l0 = layers[0]
    out = shapes[l0][0]
    good = subject_state(mods, model).B
    cases = {}
    nan = {f"{l}.para_B": b.clone() for l, b in good.items()}
    nan[f"{l0}.para_B"][0, 0] = float("nan")
    cases["nan"] = (nan, "NaN or Inf", "load")
    cases["u_without_v"] = ({f"{l0}.para_U": torch.randn(out, 2)}, "para_U but no para_V", "load")
    cases["three_d"] = ({f"{l0}.para_B": torch.randn(out, 2, 1)}, "expected \\(out, rank\\)", "load")
    cases["scalar"] = ({f"{l0}.para_B": torch.tensor(1.0)}, "expected \\(out, rank\\)", "load")
    cases["wrong_out"] = ({f"{l0}.para_B": torch.randn(out + 3, 2)}, "output channels", "patch")
    inner = min(shapes[l0][0], int(torch.tensor(shapes[l0][1:]).prod()))
    cases["rank_too_high"] = ({f"{l0}.para_B": torch.randn(out, inner + 1)}, "more than the layer allows", "patch")
    return cases


CASES = ["nan", "u_without_v", "three_d", "scalar", "wrong_out", "rank_too_high"]


@pytest.mark.parametrize("case", CASES)
def test_stock_load_lora_rejects_what_para_load_rejects_with_the_same_message(mods, tiny_model, case):
    tensors, says, when = broken_files(mods, tiny_model)[case]
    name = f"broken_{case}.safetensors"
    write_raw(os.path.join(folder("loras"), name), tensors)
    shutil.copy(os.path.join(folder("loras"), name), os.path.join(folder("para"), name))
    base = patched_weights(tiny_model)
    with pytest.raises(mods.core.ParaError, match=says) as stock:
        stock_load(tiny_model, name)
    with pytest.raises(mods.core.ParaError, match=says) as ours:
        para_load(mods, tiny_model, name)
    stock_msg, our_msg = str(stock.value), str(ours.value)
    # ComfyUI hands the adapters the tensors only, and names the failed node (and so its file) itself.
    assert stock_msg.startswith(mods.adapters_base.STOCK_SOURCE + ": ")
    # Same text after the file name (patch-time ones name the model differently: this model vs its family).
    strip = lambda m: m.split(": ", 1)[1].split(" in this")[0]
    assert strip(stock_msg) == strip(our_msg)
    # Nothing of the failed prompt stays in the model: the next prompt sees the base weights.
    after = patched_weights(tiny_model)
    assert all(torch.equal(after[k], base[k]) for k in base)


def test_one_layer_under_two_names_stops_stock_load_lora_and_its_bypass(mods, tiny_model):
    import comfy.sd
    shapes = mods.patching.layer_shapes(tiny_model)
    l0 = mods.core.select_layers(shapes, "noxattn")[0]
    lora = {f"{l0}.para_B": torch.randn(shapes[l0][0], 2), f"{mods.core.kohya_name(l0)}.para_B": torch.randn(shapes[l0][0], 2)}
    loaders = [comfy.sd.load_lora_for_models]
    if hasattr(comfy.sd, "load_bypass_lora_for_models"):  # 0.33+
        loaders.append(comfy.sd.load_bypass_lora_for_models)
    for load in loaders:
        with pytest.raises(mods.core.ParaError, match="two spellings of the same layer"):
            load(tiny_model, None, lora, 1.0, 0)


def test_para_merge_honours_cancel(mods, tiny_model):
    """Cancel (ComfyUI's interrupt flag) stops a merge at its next layer: 100,000 layers took minutes
    and Cancel came 349 s late. Once cleared, the same merge runs."""
    import comfy.model_management as mm
    a, b = subject_state(mods, tiny_model, seed=1), subject_state(mods, tiny_model, seed=2)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            mods.pn.PaRaMerge.execute(mode="union", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0)
    finally:
        mm.interrupt_current_processing(False)
    (merged,) = mods.pn.PaRaMerge.execute(mode="union", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0).args
    assert merged.layers == a.layers


def float8_file(mods, model, kind, seed=0):
    """A PaRa file of ``kind`` on the first noxattn layer, stored in F8_E4M3 (as other tools write them)."""
    shapes = mods.patching.layer_shapes(model)
    l0 = mods.core.select_layers(shapes, "noxattn")[0]
    out, inner = shapes[l0][0], int(torch.tensor(shapes[l0][1:]).prod())
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, 2, generator=g))[0]
    second = {"subject": None, "merged": ("para_V", U * 0.5), "reference": ("para_D", torch.randn(2, inner, generator=g) * 0.1)}[kind]
    tensors = {f"{l0}.para_B": U} if second is None else {f"{l0}.para_U": U, f"{l0}.{second[0]}": second[1]}
    return l0, {k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}


@pytest.mark.parametrize("kind", ["subject", "merged", "reference"])
def test_float8_files_apply_the_same_through_para_loader_and_stock_load_lora(mods, tiny_model, kind):
    l0, tensors = float8_file(mods, tiny_model, kind)
    name = f"fp8_{kind}.safetensors"
    for where in ("loras", "para"):
        write_raw(os.path.join(folder(where), name), tensors)
    base = patched_weights(tiny_model)[l0 + ".weight"]
    stock, ours = stock_load(tiny_model, name)[l0 + ".weight"], para_load(mods, tiny_model, name)[l0 + ".weight"]
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-6)


def test_a_float8_subject_continues_in_the_stock_trainer(mods, tiny_model):
    import comfy.weight_adapter as wa
    l0, tensors = float8_file(mods, tiny_model, "subject")
    adapter = next(a for a in (cls.load(l0, tensors, 1.0, None) for cls in wa.adapters) if a is not None)
    trained = adapter.to_train()
    assert trained.para_B.dtype == torch.float32 and torch.equal(trained.para_B.detach(), tensors[f"{l0}.para_B"].float())


def test_para_loader_refuses_integer_reference_factors_like_stock_load_lora(mods, tiny_model):
    shapes = mods.patching.layer_shapes(tiny_model)
    l0 = mods.core.select_layers(shapes, "noxattn")[0]
    inner = int(torch.tensor(shapes[l0][1:]).prod())
    tensors = {f"{l0}.para_U": torch.ones(shapes[l0][0], 2, dtype=torch.int32),
               f"{l0}.para_D": torch.ones(2, inner, dtype=torch.int32)}
    for where in ("loras", "para"):
        write_raw(os.path.join(folder(where), "ref_int.safetensors"), tensors)
    with pytest.raises(mods.core.ParaError, match="para_U has dtype torch.int32"):
        para_load(mods, tiny_model, "ref_int.safetensors")
    with pytest.raises(mods.core.ParaError, match="para_U has dtype torch.int32"):
        stock_load(tiny_model, "ref_int.safetensors")


@pytest.mark.parametrize("kind", ["subject", "merged", "reference"])
def test_adapters_survive_comfyuis_rebuild_from_loaded_keys_and_weights(mods, tiny_model, kind):
    """ComfyUI 0.3x rebuilds every patch as type(a)(a.loaded_keys, weights) with its tensors moved
    (comfy.lora.prefetch_prepared_value, dynamic VRAM on CUDA): the rebuilt adapter computes the
    same weight, and its errors still name the file and the layer."""
    import comfy.lora
    shapes = mods.patching.layer_shapes(tiny_model)
    l0 = mods.core.select_layers(shapes, "noxattn")[0]
    out, inner = shapes[l0][0], int(torch.tensor(shapes[l0][1:]).prod())
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(out, 2, generator=g))[0]
    if kind == "reference":
        adapter = mods.reference_adapter.ReferenceAdapter.from_factors(U, torch.randn(2, inner, generator=g) * 0.1, "dog.safetensors", l0)
    else:
        V = U if kind == "subject" else torch.randn(out, 2, generator=g)
        adapter = mods.para.ParaAdapter.from_factors(U, V, "dog.safetensors", l0)
    rebuild = getattr(comfy.lora, "prefetch_prepared_value", None)  # 0.33; 0.3.64 has no rebuild, do what it does
    again = rebuild(adapter, [0], None, None, False) if rebuild else type(adapter)(adapter.loaded_keys, adapter.weights)
    assert type(again) is type(adapter) and again is not adapter
    W0 = mods.patching.original_weight(tiny_model, l0).float()
    key, same = l0 + ".weight", lambda w: w
    want = adapter.calculate_weight(W0.clone(), key, 0.7, 1.0, 0, same)
    torch.testing.assert_close(again.calculate_weight(W0.clone(), key, 0.7, 1.0, 0, same), want, rtol=0, atol=0)
    assert (want - W0).abs().max() > 1e-4
    with pytest.raises(mods.core.ParaError, match=f"dog.safetensors: layer {l0} has {out} output channels"):
        again.calculate_weight(torch.randn(out + 1, *shapes[l0][1:]), key, 1.0, 1.0, 0, same)


def test_stock_load_lora_still_applies_a_good_file(mods, tiny_model):
    st = subject_state(mods, tiny_model, seed=3)
    mods.core.save_para(st, os.path.join(folder("loras"), "good.safetensors"))
    mods.core.save_para(st, os.path.join(folder("para"), "good.safetensors"))
    stock = stock_load(tiny_model, "good.safetensors")
    ours = para_load(mods, tiny_model, "good.safetensors")
    for l in st.layers:
        torch.testing.assert_close(stock[l + ".weight"], ours[l + ".weight"], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- 4. no non-finite weight is applied

def test_huge_but_finite_factors_are_refused_by_para_loader_and_stock_load_lora(mods, tiny_model):
    st = subject_state(mods, tiny_model, seed=4)
    U = {l: torch.full((b.shape[0], 2), 3e38) for l, b in st.B.items()}
    merged = mods.core.ParaState(kind="merged", U=U, V={l: u.clone() for l, u in U.items()},
                                 metadata=mods.core.build_metadata("merged", merge_mode="sum"))
    for kind in ("para", "loras"):
        mods.core.save_para(merged, os.path.join(folder(kind), "huge.safetensors"))
    base = patched_weights(tiny_model)
    with pytest.raises(mods.core.ParaError, match="huge.safetensors.*not finite"):
        para_load(mods, tiny_model, "huge.safetensors")
    with pytest.raises(mods.core.ParaError, match="patched weight .* not finite"):  # ComfyUI names the node and file
        stock_load(tiny_model, "huge.safetensors")
    with pytest.raises(mods.core.ParaError, match="not finite"):
        mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=merged, filename_prefix="huge_lora", strength=1.0,
                                       dtype="fp32")
    assert not [f for f in os.listdir(folder("loras")) if f.startswith("huge_lora")]
    after = patched_weights(tiny_model)
    assert all(torch.equal(after[k], base[k]) for k in base)


# ------------------------------------------------------------------------- 7. combos through the API

@pytest.mark.parametrize("node, kwargs, input_name", [
    ("PaRaSave", dict(filename_prefix="evil"), "dtype"),
    ("PaRaExportLoRA", dict(filename_prefix="evil", strength=1.0), "dtype"),
])
def test_invalid_dtype_combo_is_an_error_naming_the_input(mods, tiny_model, node, kwargs, input_name):
    st = subject_state(mods, tiny_model)
    cls = getattr(mods.pn, node)
    if node == "PaRaExportLoRA":
        kwargs = dict(kwargs, model=tiny_model)
    with pytest.raises(mods.core.ParaError, match=f"input '{input_name}' is 'evil'; use one of fp32, fp16, bf16"):
        cls.execute(para=st, dtype="evil", **kwargs)


def test_invalid_merge_mode_is_an_error_naming_the_input(mods, tiny_model):
    a, b = subject_state(mods, tiny_model, 1), subject_state(mods, tiny_model, 2)
    with pytest.raises(mods.core.ParaError, match="input 'mode' is 'evil'"):
        mods.pn.PaRaMerge.execute(mode="evil", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0)


# ------------------------------------------------------------------------- 8. permissions, 3. leftovers

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


# ------------------------------------------------------------------------- trainer: 5, 6, 7

BASE = trainer_settings(filename_prefix="h")


@pytest.fixture
def model(comfy_in_process):
    with torch.inference_mode():
        return models.make_tiny_model(seed=0)


def train(mods, model, **kw):
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        out = mods.trainer.PaRaTrainer.execute(model=model, latents=lat, positive=models.random_conditioning(1),
                                               **dict(BASE, **kw))
    return out


def test_resume_with_a_new_learning_rate_uses_it(mods, model, monkeypatch):
    train(mods, model, steps=2, save_every=2, filename_prefix="lr_src")
    (name,) = [f for f in os.listdir(folder("para")) if f.startswith("lr_src_") and f.endswith(".safetensors")]
    seen = []
    real = mods.training.TrainingRun._one_step

    def spy(self, *a, **k):
        seen.append([g["lr"] for g in self.optimizer.param_groups])
        return real(self, *a, **k)

    monkeypatch.setattr(mods.training.TrainingRun, "_one_step", spy)
    train(mods, model, steps=3, learning_rate=0.5, resume_from=name, filename_prefix="lr_dst")
    assert seen == [[0.5]]


def test_a_checkpoint_that_cannot_be_written_warns_and_the_run_goes_on(mods, model, caplog, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mods.trainer, "save_para", disk_full)
    prefix = "ppp_full"
    out = train(mods, model, steps=3, save_every=1, filename_prefix=prefix)
    _, para, loss, steps = out.args[:4]
    assert steps == 3 and len(loss["loss"]) == 3 and para.layers
    assert sum("could not write the checkpoint" in r.getMessage() for r in caplog.records) == 3
    assert "could not be written" in json.dumps(out.ui.as_dict())
    assert not [f for f in os.listdir(folder("para")) if f.startswith("ppp")]


def test_a_failed_save_is_retried_at_the_next_one(mods, model, monkeypatch):
    real, calls = mods.trainer.save_para, []

    def flaky(state, path, *a, **k):  # disk full once, at step 1
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(state, path, *a, **k)

    monkeypatch.setattr(mods.trainer, "save_para", flaky)
    _, para, _, steps = train(mods, model, steps=2, save_every=1, filename_prefix="retry").args[:4]
    files = sorted(f for f in os.listdir(folder("para")) if f.startswith("retry_"))
    assert steps == 2 and files == ["retry_00001_step000002.safetensors", "retry_00001_step000002.trainer.pt"]


def resumable(mods, model, prefix):
    train(mods, model, steps=2, save_every=2, filename_prefix=prefix)
    (name,) = [f for f in os.listdir(folder("para")) if f.startswith(prefix + "_") and f.endswith(".safetensors")]
    return name, mods.trainer_state.trainer_state_path(os.path.join(folder("para"), name))


def test_trainer_state_of_another_rank_is_a_clear_error(mods, model):
    name, tpath = resumable(mods, model, "rank2")
    other, other_t = resumable(mods, model, "rank1_src")
    state = mods.trainer_state.load_trainer_state(other_t)
    for st in state["optimizer"]["state"].values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                st[k] = v[:, :1].clone()  # what a rank-1 run's moments look like
    torch.save(state, tpath)
    with pytest.raises(mods.core.ParaError, match=r"input 'resume_from'.*does not belong to .*another rank"):
        train(mods, model, steps=4, resume_from=name, filename_prefix="rank_resume")


@pytest.mark.parametrize("field, value", [("step", -5), ("layers", 7), ("loss_history", "abc")])
def test_damaged_trainer_state_is_an_error_naming_resume_from_and_the_field(mods, model, field, value):
    name, tpath = resumable(mods, model, f"dmg_{field}")
    state = torch.load(tpath, weights_only=True)
    state[field] = value
    torch.save(state, tpath)
    with pytest.raises(mods.core.ParaError, match=f"input 'resume_from'.*field '{field}'"):
        train(mods, model, steps=4, resume_from=name, filename_prefix="dmg_resume")


@pytest.mark.parametrize("dtype, advice, not_advice", [
    ("fp32", "Lower learning_rate", "fp16"),
    ("bf16", "training_dtype fp32", "instead of fp16"),
    ("fp16", "bf16 or fp32 instead of fp16", None),
])
def test_nan_stop_advice_depends_on_the_training_dtype(mods, model, monkeypatch, dtype, advice, not_advice):
    real = mods.training.diffusion_loss_sum
    monkeypatch.setattr(mods.training, "diffusion_loss_sum", lambda *a: real(*a) * float("nan"))
    with pytest.raises(mods.core.ParaError, match="NaN/Inf") as err:
        train(mods, model, steps=2, training_dtype=dtype, filename_prefix=f"nan_{dtype}")
    assert advice in str(err.value)
    if not_advice:
        assert not_advice not in str(err.value)


@pytest.mark.parametrize("case, says", [("nan", "NaN or Inf"), ("three_d", "expected \\(rank, in\\*kh\\*kw\\)"),
                                        ("wrong_out", "output channels")])
def test_stock_load_lora_checks_reference_files_too(mods, tiny_model, case, says):
    shapes = mods.patching.layer_shapes(tiny_model)
    l0 = mods.core.select_layers(shapes, "noxattn")[0]
    out, inner = shapes[l0][0], int(torch.tensor(shapes[l0][1:]).prod())
    U, D = torch.randn(out, 2), torch.randn(2, inner)
    if case == "nan":
        D[1, 1] = float("nan")
    elif case == "three_d":
        D = D[:, :, None]
    else:
        U = torch.randn(out + 1, 2)
    name = f"ref_{case}.safetensors"
    write_raw(os.path.join(folder("loras"), name), {f"{l0}.para_U": U, f"{l0}.para_D": D})
    base = patched_weights(tiny_model)
    with pytest.raises(mods.core.ParaError, match=says) as err:
        stock_load(tiny_model, name)
    assert str(err.value).startswith(mods.adapters_base.STOCK_SOURCE + ": ")
    after = patched_weights(tiny_model)
    assert all(torch.equal(after[k], base[k]) for k in base)
