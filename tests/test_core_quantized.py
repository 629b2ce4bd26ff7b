"""Quantized base weights in files (para_core/quantized.py, base_model.py): ComfyUI 0.3x stores fp8/int8
checkpoints with a scale and a comfy_quant tensor; the checkpoint reader, fingerprint, export,
bake and the CLI use the dequantized weight (bake requantizes), or refuse with a message that says
what to do. Inside ComfyUI (QuantizedTensor models): test_nodes_quantized.py."""
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from core_helpers import comfy_quant, quantize_fp8
from harness import comfyui
from para_core import ParaError, ParaState, build_metadata, export_lora, save_para
from para_core.base_model import Checkpoint, bake

P = "model.diffusion_model."


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
