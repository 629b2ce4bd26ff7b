"""PaRa nodes in-process against real ComfyUI classes: patching through
ModelPatcher.add_patches, the stock LoRA loaders, export, merge, dtypes, errors."""
import math

import pytest
import torch

from harness import models

pytestmark = pytest.mark.comfyui

STRENGTH = 0.8


def dense_reduce(W0, Qs, strengths):
    """Plain reference: W0 - sum s_i Q_i Q_i^T W0 with the out x out projectors formed."""
    W = W0.reshape(W0.shape[0], -1).double()
    P = sum(s * (Q.double() @ Q.double().t()) for Q, s in zip(Qs, strengths))
    return (W - P @ W).reshape(W0.shape)


def qr(B):
    return torch.linalg.qr(B.double())[0]


def subject(mods, model, seed, rank=2, preset="noxattn"):
    shapes = mods.patching.layer_shapes(model)
    layers = mods.core.select_layers(shapes, preset)
    g = torch.Generator().manual_seed(seed)
    B = {l: torch.randn(shapes[l][0], rank, generator=g) for l in layers}
    md = mods.core.build_metadata("subject", rank=rank, layers=preset, base_arch=mods.patching.model_family(model),
                             base_fingerprint=mods.patching.model_fingerprint(model, layers))
    return mods.core.ParaState(B=B, metadata=md)


def weights_after(model):
    import comfy.model_management as mm
    with torch.no_grad():  # as in the server, which runs nodes under inference mode
        mm.load_models_gpu([model], force_full_load=True)
    sd = {k: v.detach().clone() for k, v in model.model.state_dict().items()}
    return sd


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def test_apply_equals_dense_reference_and_unpatches_exactly(tiny_model, mods):
    base = snapshot(tiny_model)
    st = subject(mods, tiny_model, 1)
    (patched,) = mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=STRENGTH).args
    assert not tiny_model.patches, "the input model must stay unpatched"
    after = weights_after(patched)
    for l in st.layers:
        ref = dense_reduce(base[l + ".weight"], [qr(st.B[l])], [STRENGTH])
        torch.testing.assert_close(after[l + ".weight"].double(), ref, rtol=1e-5, atol=1e-5)
    for k, v in base.items():
        if k[: -len(".weight")] not in st.layers:
            assert torch.equal(after[k], v), k
    patched.unpatch_model()
    for k, v in snapshot(tiny_model).items():
        assert torch.equal(v, base[k]), f"unpatch not bit-exact at {k}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_apply_in_low_precision_weights(tiny_model_factory, mods, dtype):
    model = tiny_model_factory(seed=0, dtype=dtype)
    base = snapshot(model)
    assert base["diffusion_model.input_blocks.1.0.in_layers.2.weight"].dtype == dtype
    st = subject(mods, model, 2)
    (patched,) = mods.pn.PaRaApply.execute(model=model, para=st, strength=1.0).args
    after = weights_after(patched)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for l in st.layers:
        w = after[l + ".weight"]
        assert w.dtype == dtype
        ref = dense_reduce(base[l + ".weight"].float(), [qr(st.B[l])], [1.0])
        torch.testing.assert_close(w.double(), ref, rtol=tol, atol=tol)
    patched.unpatch_model()
    assert all(torch.equal(v, base[k]) for k, v in snapshot(model).items())


def test_lowvram_partial_load_gives_same_output(tiny_model, mods):
    """With weights left offloaded (LowVramPatch), ComfyUI applies the adapter at forward time."""
    st = subject(mods, tiny_model, 3)
    (patched,) = mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=1.0).args
    pos = models.random_conditioning(0)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0])

    def run(lowvram):
        patched.unpatch_model()
        patched.load(torch.device("cpu"), lowvram_model_memory=lowvram, force_patch_weights=False, full_load=not lowvram)
        with torch.no_grad():
            out = patched.model.apply_model(x, sigma, c_crossattn=pos[0][0])
        counter = patched.model.lowvram_patch_counter
        patched.unpatch_model()
        return out, counter

    full, _ = run(0)
    low, counter = run(1)
    assert counter, "the partial load did not leave any weight to patch lazily"
    torch.testing.assert_close(low, full, rtol=1e-4, atol=1e-4)


def test_stock_lora_loader_reads_para_files(tiny_model, mods, tmp_path):
    import comfy.sd
    import comfy.utils
    st = subject(mods, tiny_model, 4)
    (ours,) = mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=STRENGTH).args
    expected = weights_after(ours)
    ours.unpatch_model()
    for naming in ("comfy", "kohya"):
        path = tmp_path / f"subject_{naming}.safetensors"
        state = st if naming == "comfy" else st.renamed({l: mods.core.kohya_name(l) for l in st.layers})
        mods.core.save_para(state, str(path))
        sd = comfy.utils.load_torch_file(str(path), safe_load=True)
        stock, _ = comfy.sd.load_lora_for_models(tiny_model, None, sd, STRENGTH, 0)
        got = weights_after(stock)
        stock.unpatch_model()
        for l in st.layers:
            torch.testing.assert_close(got[l + ".weight"], expected[l + ".weight"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 2e-3)])
def test_exported_lora_reproduces_para_weights(tiny_model, mods, comfy_base_dir, dtype, tol):
    import comfy.sd
    import comfy.utils
    import folder_paths
    st = subject(mods, tiny_model, 5)
    (ours,) = mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=1.0).args
    expected = weights_after(ours)
    ours.unpatch_model()
    out = mods.pn.PaRaExportLoRA.execute(model=tiny_model, para=st, filename_prefix=f"exp_{dtype}", strength=1.0, dtype=dtype)
    name = out.args[0]
    assert name in folder_paths.get_filename_list("loras")
    lora_sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
    assert any(k.endswith(".lora_up.weight") for k in lora_sd)
    for s in (1.0, 0.5):
        stock, _ = comfy.sd.load_lora_for_models(tiny_model, None, lora_sd, s, 0)
        got = weights_after(stock)
        stock.unpatch_model()
        if s == 1.0:
            ref = expected
        else:
            (half,) = mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=s).args
            ref = weights_after(half)
            half.unpatch_model()
        for l in st.layers:
            torch.testing.assert_close(got[l + ".weight"], ref[l + ".weight"], rtol=tol, atol=tol)


def test_merge_modes_give_their_formulas(tiny_model, mods):
    base = snapshot(tiny_model)
    a = subject(mods, tiny_model, 6)
    b = subject(mods, tiny_model, 7)
    sa, sb = 1.0, 0.6
    for mode in ("sum", "sequential"):  # union: test_union_merge_is_projection_onto_union
        (merged,) = mods.pn.PaRaMerge.execute(mode=mode, para_1=a, strength_1=sa, para_2=b, strength_2=sb).args
        assert merged.kind == "merged" and merged.metadata["para.merge_mode"] == mode
        (patched,) = mods.pn.PaRaApply.execute(model=tiny_model, para=merged, strength=1.0).args
        after = weights_after(patched)
        patched.unpatch_model()
        for l in a.layers[:12]:
            W0 = base[l + ".weight"]
            Qa, Qb = qr(a.B[l]), qr(b.B[l])
            Wm = W0.reshape(W0.shape[0], -1).double()
            n = Wm.shape[0]
            I = torch.eye(n, dtype=torch.float64)
            if mode == "sum":
                ref = Wm - (sa * Qa @ Qa.t() + sb * Qb @ Qb.t()) @ Wm
            else:
                ref = (I - sb * Qb @ Qb.t()) @ (I - sa * Qa @ Qa.t()) @ Wm
            torch.testing.assert_close(after[l + ".weight"].reshape(n, -1).double(), ref, rtol=1e-4, atol=1e-4)


def test_union_merge_is_projection_onto_union(tiny_model, mods):
    base = snapshot(tiny_model)
    a = subject(mods, tiny_model, 8)
    b = subject(mods, tiny_model, 9)
    (merged,) = mods.pn.PaRaMerge.execute(mode="union", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0).args
    (patched,) = mods.pn.PaRaApply.execute(model=tiny_model, para=merged, strength=1.0).args
    after = weights_after(patched)
    patched.unpatch_model()
    for l in a.layers:
        W0 = base[l + ".weight"]
        Wm = W0.reshape(W0.shape[0], -1).double()
        Q = torch.linalg.qr(torch.cat([a.B[l], b.B[l]], 1).double())[0]
        if Q.shape[1] > min(Wm.shape):
            continue
        ref = Wm - Q @ (Q.t() @ Wm)
        torch.testing.assert_close(after[l + ".weight"].reshape(Wm.shape).double(), ref, rtol=1e-4, atol=1e-4)


def test_wrong_family_file_is_an_error_naming_the_layer(tiny_model, mods, tiny_model_factory):
    other = tiny_model_factory(seed=0, unet_config=dict(models.TINY_UNET_CONFIG, model_channels=64))
    st = subject(mods, other, 10)
    with pytest.raises(mods.core.ParaError, match=r"layer diffusion_model\.\S+"):
        mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=1.0)
    assert not tiny_model.patches


def test_nan_strength_is_rejected(tiny_model, mods):
    st = subject(mods, tiny_model, 11)
    with pytest.raises(mods.core.ParaError, match="strength"):
        mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=math.nan)


def test_fingerprint_mismatch_warns(tiny_model, tiny_model_factory, mods, caplog):
    other = tiny_model_factory(seed=1)  # same family, other weights (a "fine-tune")
    st = subject(mods, other, 12)
    with pytest.warns(mods.core.FingerprintWarning, match=st.metadata["para.base_fingerprint"]):
        mods.pn.PaRaApply.execute(model=tiny_model, para=st, strength=1.0)


def test_save_then_load_through_nodes(tiny_model, mods):
    import folder_paths
    st = subject(mods, tiny_model, 13)
    name = mods.pn.PaRaSave.execute(para=st, filename_prefix="roundtrip", dtype="fp32").args[0]
    assert name in folder_paths.get_filename_list("para")
    (loaded,) = mods.pn.PaRaLoad.execute(para_name=name).args
    assert loaded.kind == "subject" and loaded.metadata["para.base_arch"] == st.metadata["para.base_arch"]
    for l in st.layers:
        assert torch.equal(loaded.B[l], st.B[l])
    (m,) = mods.pn.PaRaLoader.execute(model=tiny_model, para_name=name, strength=1.0).args
    assert len(m.patches) == len(st.layers)


def test_apply_with_fp8_storage(tiny_model_factory, mods):
    """fp8 weights: ComfyUI patches in float32 and rounds back (stochastically) to fp8."""
    dtype = torch.float8_e4m3fn
    model = tiny_model_factory(seed=0, dtype=dtype)
    base = snapshot(model)
    st = subject(mods, model, 14)
    (patched,) = mods.pn.PaRaApply.execute(model=model, para=st, strength=1.0).args
    after = weights_after(patched)
    for l in st.layers:
        w = after[l + ".weight"]
        assert w.dtype == dtype
        ref = dense_reduce(base[l + ".weight"].float(), [qr(st.B[l])], [1.0])
        # e4m3 keeps 3 mantissa bits: one rounding step is up to 1/8 of the value
        torch.testing.assert_close(w.double(), ref, rtol=0.15, atol=0.02)
    patched.unpatch_model()
    assert all(torch.equal(v.view(torch.uint8), base[k].view(torch.uint8)) if v.dtype == dtype else torch.equal(v, base[k])
               for k, v in snapshot(model).items())


# ------------------------------------------------------------------------- errors and Cancel

def test_para_merge_honours_cancel(mods, tiny_model):
    """Cancel (ComfyUI's interrupt flag) stops a merge at its next layer: 100,000 layers took minutes
    and Cancel came 349 s late. Once cleared, the same merge runs."""
    import comfy.model_management as mm
    a, b = subject(mods, tiny_model, 1), subject(mods, tiny_model, 2)
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            mods.pn.PaRaMerge.execute(mode="union", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0)
    finally:
        mm.interrupt_current_processing(False)
    (merged,) = mods.pn.PaRaMerge.execute(mode="union", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0).args
    assert merged.layers == a.layers


@pytest.mark.parametrize("node, kwargs, input_name", [
    ("PaRaSave", dict(filename_prefix="evil"), "dtype"),
    ("PaRaExportLoRA", dict(filename_prefix="evil", strength=1.0), "dtype"),
])
def test_invalid_dtype_combo_is_an_error_naming_the_input(mods, tiny_model, node, kwargs, input_name):
    st = subject(mods, tiny_model, 1)
    cls = getattr(mods.pn, node)
    if node == "PaRaExportLoRA":
        kwargs = dict(kwargs, model=tiny_model)
    with pytest.raises(mods.core.ParaError, match=f"input '{input_name}' is 'evil'; use one of fp32, fp16, bf16"):
        cls.execute(para=st, dtype="evil", **kwargs)


def test_invalid_merge_mode_is_an_error_naming_the_input(mods, tiny_model):
    a, b = subject(mods, tiny_model, 1), subject(mods, tiny_model, 2)
    with pytest.raises(mods.core.ParaError, match="input 'mode' is 'evil'"):
        mods.pn.PaRaMerge.execute(mode="evil", para_1=a, strength_1=1.0, para_2=b, strength_2=1.0)
