"""Quantized base weights (issue 12 item 5): ComfyUI 0.3x loads fp8/int8 checkpoints as
QuantizedTensor; every place PaRa reads W0 (patching, fingerprint, singular-vector inits, export,
bake, inspect) uses the dequantized weight, or refuses with a message that says what to do."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness import comfyui, models
from para_core import ParaError, ParaState, build_metadata, export_lora, fingerprint, save_para
from para_core.base_model import Checkpoint, bake

P = "model.diffusion_model."


def comfy_quant(fmt: str, **extra) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt, **extra}).encode()), dtype=torch.uint8)


def quantize_fp8(w: torch.Tensor):
    scale = w.abs().max() / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())


def quantize_int8_rows(w: torch.Tensor):
    scale = w.abs().amax(dim=1) / 127.0
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


@pytest.fixture
def files(tmp_path):
    """A small checkpoint with an fp8 layer, a per-channel int8 layer and a plain layer, the same
    checkpoint dequantized, and a PaRa file for the three layers."""
    g = torch.Generator().manual_seed(0)
    W = {"input_blocks.1.1.proj": torch.randn(64, 32, generator=g) * 0.1,
         "input_blocks.1.1.ff": torch.randn(48, 32, generator=g) * 0.1,
         "input_blocks.1.0.conv": torch.randn(40, 8, 3, 3, generator=g) * 0.1}
    q_fp8, s_fp8 = quantize_fp8(W["input_blocks.1.1.proj"])
    q_i8, s_i8 = quantize_int8_rows(W["input_blocks.1.1.ff"])
    quant = {P + "input_blocks.1.1.proj.weight": q_fp8, P + "input_blocks.1.1.proj.weight_scale": s_fp8,
             P + "input_blocks.1.1.proj.comfy_quant": comfy_quant("float8_e4m3fn"),
             P + "input_blocks.1.1.ff.weight": q_i8, P + "input_blocks.1.1.ff.weight_scale": s_i8,
             P + "input_blocks.1.1.ff.comfy_quant": comfy_quant("int8_tensorwise"),
             P + "input_blocks.1.0.conv.weight": W["input_blocks.1.0.conv"].half(),
             P + "input_blocks.1.1.proj.bias": torch.randn(64, generator=g),
             "cond_stage_model.x.weight": torch.randn(4, 4, generator=g)}
    deq = {P + "input_blocks.1.1.proj.weight": q_fp8.float() * s_fp8,
           P + "input_blocks.1.1.ff.weight": q_i8.float() * s_i8[:, None],
           P + "input_blocks.1.0.conv.weight": W["input_blocks.1.0.conv"].half()}
    save_file(quant, str(tmp_path / "quant.safetensors"))
    save_file(deq, str(tmp_path / "plain.safetensors"))
    B = {"diffusion_model." + l: torch.randn(w.shape[0], 2, generator=g) for l, w in W.items()}
    para = tmp_path / "subject.safetensors"
    save_para(ParaState(B=B, metadata=build_metadata("subject", rank=2, layers="custom")), str(para))
    return {"quant": tmp_path / "quant.safetensors", "plain": tmp_path / "plain.safetensors", "para": para,
            "deq": deq, "B": B, "raw": quant}


def test_checkpoint_reads_quantized_weights_dequantized(files):
    with Checkpoint(files["quant"]) as ck:
        for k, want in files["deq"].items():
            layer = k[len("model."):-len(".weight")]
            got = ck.weight(layer)
            assert got.dtype == (torch.float32 if ck.quantized(k) else want.dtype)
            torch.testing.assert_close(got, want)


def test_quantized_fingerprint_is_the_dequantized_weights(files):
    layers = sorted("diffusion_model." + k[len(P):-len(".weight")] for k in files["deq"])
    with Checkpoint(files["quant"]) as q, Checkpoint(files["plain"]) as p:
        assert q.fingerprint(layers) == p.fingerprint(layers)


def test_export_lora_against_a_quantized_base_uses_w0(files):
    from para_core import load_para
    st = load_para(str(files["para"]))
    with Checkpoint(files["quant"]) as q, Checkpoint(files["plain"]) as p:
        a = export_lora(st, q.weight, 1.0, torch.float32)
        b = export_lora(st, lambda l: p.weight(l).float(), 1.0, torch.float32)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bake_requantizes_quantized_layers_and_keeps_the_rest(files, tmp_path):
    from para_core import load_para
    st = load_para(str(files["para"]))
    out = tmp_path / "baked.safetensors"
    bake(str(files["quant"]), [(st, 1.0)], "sum", str(out))
    baked, raw = load_file(str(out)), files["raw"]
    assert baked.keys() == raw.keys()
    assert all(baked[k].dtype == raw[k].dtype for k in raw)
    for k in ("cond_stage_model.x.weight", P + "input_blocks.1.1.proj.bias", P + "input_blocks.1.1.proj.comfy_quant"):
        assert torch.equal(baked[k], raw[k])
    with Checkpoint(out) as ck:
        for k, W0 in files["deq"].items():
            layer = k[len("model."):-len(".weight")]
            Q = torch.linalg.qr(files["B"][layer].double())[0]
            W = W0.double().reshape(W0.shape[0], -1)
            want = (W - Q @ (Q.t() @ W)).reshape(W0.shape)
            got = ck.weight(layer).double()
            err = (got - want).norm() / want.norm()
            assert err < 0.08, f"{layer}: relative error {err:.3f} after requantizing"
            assert (got - W0.double()).norm() > 5 * (got - want).norm(), f"{layer}: PaRa not applied"


def test_unsupported_quantization_is_refused_with_advice(files, tmp_path):
    raw = dict(files["raw"])
    raw[P + "input_blocks.1.1.proj.comfy_quant"] = comfy_quant("nvfp4")
    path = tmp_path / "nvfp4.safetensors"
    save_file(raw, str(path))
    with Checkpoint(path) as ck:
        with pytest.raises(ParaError, match="nvfp4.*unquantized checkpoint"):
            ck.weight("diffusion_model.input_blocks.1.1.proj")


def test_cli_inspect_and_export_accept_a_quantized_base(files, tmp_path):
    import subprocess
    env_py = sys.executable
    r = subprocess.run([env_py, "-m", "para_core", "inspect", str(files["para"]), "--base", str(files["quant"])],
                       cwd=str(comfyui.PACK_ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "lora.safetensors"
    r = subprocess.run([env_py, "-m", "para_core", "export-lora", "--base", str(files["quant"]), "--para",
                        str(files["para"]), "-o", str(out)], cwd=str(comfyui.PACK_ROOT), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_legacy_scaled_fp8_files_are_read_with_their_scale(tmp_path):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 16, generator=g)
    q, s = quantize_fp8(W)
    path = tmp_path / "scaled.safetensors"
    save_file({P + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn), P + "a.weight": q,
               P + "a.scale_weight": s}, str(path))
    with Checkpoint(path) as ck:
        torch.testing.assert_close(ck.weight("diffusion_model.a"), q.float() * s)


# ------------------------------------------------------------------ inside ComfyUI (0.3x)

@pytest.fixture(scope="module")
def fp8_checkpoint(sd15_checkpoint):
    """The test checkpoint with every 2-D diffusion-model weight stored as fp8 + comfy_quant."""
    path = models.cache_dir() / "test_sd15_fp8.safetensors"
    if not path.exists() or path.stat().st_mtime < sd15_checkpoint.stat().st_mtime:
        sd = load_file(str(sd15_checkpoint))
        for k in list(sd):
            if k.startswith(P) and k.endswith(".weight") and sd[k].dim() == 2:
                layer = k[: -len(".weight")]
                sd[k], sd[layer + ".weight_scale"] = quantize_fp8(sd[k].float())
                sd[layer + ".comfy_quant"] = comfy_quant("float8_e4m3fn")
        models.atomic_save(sd, path, {})
    return path


@pytest.fixture(scope="module")
def quantized_model(comfy_in_process, fp8_checkpoint, mods):
    qo = pytest.importorskip("comfy.quant_ops")
    if not getattr(qo, "_CK_AVAILABLE", True):
        pytest.skip("comfy_kitchen is not installed: this ComfyUI cannot load quantized checkpoints")
    import comfy.sd
    mp = comfy.sd.load_checkpoint_guess_config(str(fp8_checkpoint), output_vae=False, output_clip=False)[0]
    return mp, qo.QuantizedTensor


LAYER = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def test_model_weights_are_quantized_tensors_and_w0_is_dequantized(quantized_model, mods):
    import comfy.utils
    mp, QT = quantized_model
    patching = mods("nodes.patching")
    raw = comfy.utils.get_attr(mp.model, LAYER + ".weight")
    assert isinstance(raw, QT), "the test checkpoint did not load quantized"
    W0 = patching.original_weight(mp, LAYER)
    assert not isinstance(W0, QT) and W0.dtype.is_floating_point
    torch.testing.assert_close(W0, raw.dequantize())
    assert patching.model_fingerprint(mp, [LAYER]) == fingerprint({LAYER: raw.dequantize()})


def test_para_patching_on_a_quantized_model_reduces_w0_and_unpatches_exactly(quantized_model, mods):
    import comfy.utils
    mp, QT = quantized_model
    core = mods("para_core")
    patching = mods("nodes.patching")
    layers = [l for l in patching.layer_shapes(mp) if l.endswith((".to_q", ".to_k", ".ff.net.2"))
              and isinstance(comfy.utils.get_attr(mp.model, l + ".weight"), QT)]
    assert len(layers) >= 3
    g = torch.Generator().manual_seed(3)
    shapes = patching.layer_shapes(mp)
    state = core.ParaState(B={l: torch.randn(shapes[l][0], 4, generator=g) for l in layers},
                           metadata=core.build_metadata("subject", rank=4, layers="custom", base_arch="SD15"))
    before = {l: comfy.utils.get_attr(mp.model, l + ".weight").dequantize().clone() for l in layers}
    m = patching.apply_para(mp, state, 1.0)
    m.patch_model()
    try:
        for l in layers:
            w = comfy.utils.get_attr(m.model, l + ".weight")
            assert isinstance(w, QT), f"{l}: patching left a non-quantized weight"
            Q = torch.linalg.qr(state.B[l].double())[0]
            W0 = before[l].double()
            want = W0 - Q @ (Q.t() @ W0)
            err = (w.dequantize().double() - want).norm() / want.norm()
            assert err < 0.08, f"{l}: relative error {err:.3f}"
    finally:
        m.unpatch_model()
    for l in layers:
        assert torch.equal(comfy.utils.get_attr(mp.model, l + ".weight").dequantize(), before[l])


def test_singular_vector_init_and_export_read_the_dequantized_weight(quantized_model, mods):
    mp, QT = quantized_model
    patching = mods("nodes.patching")
    projection = mods("para_core.functional.projection")
    W0 = patching.original_weight(mp, LAYER)
    B = projection.init_B(W0, 4, "top-singular")
    U = torch.linalg.svd(W0.float(), full_matrices=False)[0][:, :4]
    torch.testing.assert_close((B.t() @ U).abs(), torch.eye(4), rtol=1e-4, atol=1e-4)


def test_para_trainer_trains_on_a_quantized_model(quantized_model, mods):
    """Every Linear of a quantized checkpoint is ComfyUI's mixed-precision Linear (not an
    nn.Linear) holding a QuantizedTensor: the trainer reads it dequantized, as its forward does."""
    import comfy.utils
    mp, QT = quantized_model
    trainer = mods("nodes.trainer_node")
    assert isinstance(comfy.utils.get_attr(mp.model, LAYER + ".weight"), QT)
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    with torch.inference_mode():
        out_model, state, loss, steps = trainer.PaRaTrainer.execute(
            model=mp, latents=lat, positive=pos, rank=2, layers="noxattn", rank_cap="none", steps=2,
            learning_rate=1e-2, optimizer="AdamW", batch_size=1, seed=0, training_dtype="fp32",
            gradient_checkpointing=False, init="top-singular", save_every=0, filename_prefix="quant",
            resume_from="[none]", custom_layers="*attn1.to_q, *attn1.to_out.0, *proj_in").args[:4]
    assert steps == 2 and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert LAYER in state.B and torch.isfinite(state.B[LAYER]).all()
    assert out_model.patches


def test_bypass_loading_works_on_a_quantized_model(quantized_model, mods):
    """Load LoRA (Bypass) leaves the quantized weights alone; its result is weight patching's up
    to the fp8 rounding that patching adds when it requantizes W'."""
    import comfy.sd
    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        pytest.skip("no bypass loading in this ComfyUI")
    import comfy.utils
    mp, QT = quantized_model
    patching = mods("nodes.patching")
    shapes = patching.layer_shapes(mp)
    g = torch.Generator().manual_seed(8)
    layers = [l for l in shapes if l.endswith((".to_q", ".to_v", ".ff.net.2", ".proj_in"))]
    lora = {f"{l}.para_B": torch.randn(shapes[l][0], 4, generator=g) for l in layers}
    stored = lambda l: comfy.utils.get_attr(mp.model, l + ".weight")
    quantized = [l for l in layers if isinstance(stored(l), QT)]
    assert quantized
    raw = {l: stored(l).dequantize().clone() for l in quantized}
    pos, neg = models.random_conditioning(1, dim=768), models.random_conditioning(2, dim=768)
    run = lambda m: models.sample_latent(m, pos, neg, seed=1, steps=2, cfg=2.0)
    base = run(mp)
    bypassed = run(comfy.sd.load_bypass_lora_for_models(mp, None, lora, 1.0, 0)[0])
    for l in quantized:  # still the same quantized weight
        assert isinstance(stored(l), QT) and torch.equal(stored(l).dequantize(), raw[l]), f"bypass rewrote {l}"
    patched = run(comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 0)[0])
    change, gap = (patched - base).norm(), (bypassed - patched).norm()
    assert change > 0 and gap < 0.2 * change, f"bypass differs from patching by {gap:.4f} (PaRa's change {change:.4f})"
