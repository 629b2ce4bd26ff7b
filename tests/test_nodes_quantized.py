"""Quantized base weights inside ComfyUI 0.3x: a checkpoint of fp8 weights (comfy_quant) loads as
QuantizedTensor, and PaRa patching, singular-vector inits, export, the trainer and bypass loading
all read the dequantized W0. The file-level side (checkpoint reader, fingerprint, bake, CLI) is in
test_core_quantized.py."""
import pytest
import torch
from safetensors.torch import load_file

from core_helpers import comfy_quant, quantize_fp8
from harness import models
from para_core import fingerprint

pytestmark = pytest.mark.comfyui
P = "model.diffusion_model."


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
