"""PaRa's weight adapters (nodes/adapters/) in-process against real ComfyUI classes: the stock Load
LoRA path validates a PaRa file like PaRa Load (same checks, same messages; subject, merged and
reference files, float8 factors), the adapters survive ComfyUI's rebuild of a patch, and no
non-finite weight is ever applied."""
import os
import shutil

import pytest
import torch

from pack_helpers import folder, subject_state

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]


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


# ------------------------------------------------------------------------- stock Load LoRA validates like PaRa Load

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


# ------------------------------------------------------------------------- no non-finite weight is applied

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
