"""PaRa Trainer with parametrization=reference (docs/spec.md section 1b): U and D trained freely,
W' = W0 - U D. In-process on the tiny model with real ComfyUI classes (under inference mode, as
the server runs nodes), then through the real server: init=reference with the smallest learning
rate gives, after one step, W0 - U0 U0^T W0 (U0 = the first r unit vectors); a reference file through
the stock Load LoRA equals PaRa Loader, and so does its exported LoRA."""
import json
import math
import os

import pytest
import torch

from harness import models
from harness.server import load_latent
from pack_helpers import trainer_settings

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]

BASE = trainer_settings(rank=4, steps=3, init="reference", filename_prefix="ref", parametrization="reference")


@pytest.fixture
def model(comfy_in_process):
    with torch.inference_mode():
        return models.make_tiny_model(seed=0)


def latents(n=1, seed=0):
    return {"samples": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}


def train(mods, model, lat=None, **kw):
    lat = latents() if lat is None else lat
    with torch.inference_mode():
        out = mods.trainer.PaRaTrainer.execute(model=model, latents=lat, positive=models.random_conditioning(1),
                                               **dict(BASE, **kw))
    return out.args[:4]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() >= 2}


def patched_weights(model_patcher):
    import comfy.model_management as mm
    with torch.no_grad():
        mm.load_models_gpu([model_patcher], force_full_load=True)
    after = snapshot(model_patcher)
    model_patcher.unpatch_model()
    return after


def para_dir():
    import folder_paths
    return folder_paths.get_folder_paths("para")[0]


# ------------------------------------------------------------------------- in-process

def test_one_tiny_step_from_init_reference_is_W0_minus_U0_U0T_W0(mods, model):
    base = snapshot(model)
    out_model, para, _, steps = train(mods, model, steps=1, learning_rate=1e-7)
    assert steps == 1 and para.kind == "reference"
    after = patched_weights(out_model)
    for l in para.layers:
        W0 = base[l + ".weight"]
        r = para.rank(l)
        U0 = torch.eye(W0.shape[0], r)
        expected = (W0.reshape(W0.shape[0], -1) - U0 @ (U0.t() @ W0.reshape(W0.shape[0], -1))).reshape(W0.shape)
        # AdamW's first step moves every entry by about lr = 1e-7
        torch.testing.assert_close(after[l + ".weight"], expected, rtol=0, atol=1e-5)
        assert after[l + ".weight"][:r].abs().max() < 1e-5  # the first r output channels are gone


def test_U_and_D_both_train_in_float32_and_the_base_is_untouched(mods, model):
    base = snapshot(model)
    _, para, loss, _ = train(mods, model, steps=3)
    assert all(torch.equal(v, base[k]) for k, v in snapshot(model).items())
    l = para.layers[0]
    W0 = base[l + ".weight"]
    U0, D0 = mods.reference.init(W0, para.rank(l), "reference")
    assert not torch.equal(para.U[l], U0) and not torch.equal(para.D[l], D0)
    assert all(t.dtype == torch.float32 for t in list(para.U.values()) + list(para.D.values()))
    md = json.loads(para.metadata["para.train"])
    assert md["parametrization"] == "reference" and md["init"] == "reference"
    assert para.num_params() == sum(para.rank(l) * (W.shape[0] + W[0].numel())
                                    for l, W in ((l, base[l + ".weight"]) for l in para.layers))


def test_training_forward_equals_the_patched_model(mods, model):
    out_model, para, _, _ = train(mods, model, steps=2)
    import comfy.model_management as mm
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, ctx = torch.tensor([2.0, 0.5]), models.random_conditioning(2)[0][0].expand(2, -1, -1)
    with torch.no_grad():
        mm.load_models_gpu([out_model], force_full_load=True)
        patched = out_model.model.apply_model(x, sigma, c_crossattn=ctx)
        out_model.unpatch_model()
        mm.load_models_gpu([model], force_full_load=True)
        modules = {l: dict(model.model.named_modules())[l] for l in para.layers}
        for side in ("activation", "weight"):
            fwd = mods.reference_adapter.ReferenceForward(modules, {l: torch.nn.Parameter(u) for l, u in para.U.items()},
                                                 {l: torch.nn.Parameter(d) for l, d in para.D.items()}, side=side)
            fwd.install()
            try:
                out = model.model.apply_model(x, sigma, c_crossattn=ctx)
            finally:
                fwd.remove()
            assert set(fwd.sides.values()) == {side}
            torch.testing.assert_close(out, patched, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_training_keeps_U_and_D_float32_masters(mods, model, dtype):
    _, para, loss, _ = train(mods, model, steps=2, training_dtype=dtype)
    assert all(math.isfinite(v) for v in loss["loss"])
    for t in list(para.U.values()) + list(para.D.values()):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()


def test_gradient_checkpointing_gives_the_same_U_and_D(mods, model):
    # SGD: Adam's first steps are lr * sign(g), which turns float noise in near-zero gradients into
    # steps of size lr; SGD compares the gradients themselves.
    _, plain, _, _ = train(mods, model, steps=2, filename_prefix="ref_gc_off", optimizer="SGD")
    _, ckpt, _, _ = train(mods, model, steps=2, filename_prefix="ref_gc_on", gradient_checkpointing=True,
                          optimizer="SGD")
    for l in plain.layers:
        torch.testing.assert_close(ckpt.U[l], plain.U[l], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ckpt.D[l], plain.D[l], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", ["orthogonal", "top-singular"])
def test_other_inits_start_from_the_papers_model(mods, model, init):
    base = snapshot(model)
    out_model, para, _, _ = train(mods, model, steps=1, learning_rate=1e-7, init=init)
    after = patched_weights(out_model)
    for l in para.layers[:3]:
        W0 = base[l + ".weight"]
        gen_U = para.U[l]  # after a 1e-7 step: U0 = QR(B0) up to 1e-6
        Wm = W0.reshape(W0.shape[0], -1)
        expected = (Wm - gen_U @ (gen_U.t() @ Wm)).reshape(W0.shape)
        torch.testing.assert_close(after[l + ".weight"], expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(gen_U.t() @ gen_U, torch.eye(gen_U.shape[1]), rtol=0, atol=1e-4)


def test_resume_a_reference_run_equals_training_in_one_go(mods, model):
    _, whole, loss, _ = train(mods, model, latents(2), steps=4, save_every=2, filename_prefix="refwhole")
    mid = sorted(f for f in os.listdir(para_dir()) if f.startswith("refwhole_") and f.endswith(".safetensors"))[0]
    assert mid.endswith("_step000002.safetensors")
    assert mods.core.load_para(os.path.join(para_dir(), mid)).kind == "reference"
    # parametrization left at 'paper': the file's kind decides
    _, resumed, loss2, steps = train(mods, model, latents(2), steps=4, resume_from=mid, filename_prefix="refres",
                                     parametrization="paper")
    assert steps == 4 and resumed.kind == "reference"
    assert loss2["loss"] == pytest.approx(loss["loss"], rel=1e-6, abs=1e-7)
    for l in whole.layers:
        torch.testing.assert_close(resumed.U[l], whole.U[l], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(resumed.D[l], whole.D[l], rtol=1e-6, atol=1e-7)


def test_reference_code_rank_cap_and_ratio_reach_the_file(mods, model):
    shapes = mods.patching.layer_shapes(model)
    _, para, _, _ = train(mods, model, steps=1, rank=4, rank_cap="reference-code", rank_ratio=16)
    for l in para.layers:
        assert para.rank(l) == mods.core.effective_rank(4, shapes[l], "reference-code", 16)
    ranks = {para.rank(l) for l in para.layers}
    assert len(ranks) > 1  # the tiny model's 32-wide convs are capped, its Linear layers are not
    assert all(para.rank(l) == 4 for l in para.layers if len(shapes[l]) == 2)
    assert json.loads(para.metadata["para.train"])["rank_ratio"] == 16


@pytest.mark.parametrize("changes, input_name", [
    ({"parametrization": "lora"}, "parametrization"),
    ({"rank_ratio": 0}, "rank_ratio"),
])
def test_invalid_reference_inputs_name_the_input(mods, model, changes, input_name):
    with pytest.raises(mods.core.ParaError, match=f"input '{input_name}'"):
        train(mods, model, **changes)


# ------------------------------------------------------------------------- through the server

@pytest.fixture(scope="module")
def server_files(comfy_server, sd15_checkpoint):
    """The training image in input/, a subject file with B = the first 4 unit vectors (the paper's
    form of the expected model) and a trained-looking reference file, for the test checkpoint."""
    from PIL import Image
    from safetensors import safe_open
    import para_core as core
    img = Image.new("RGB", (64, 64))
    img.putdata([((x * 4) % 256, (y * 4) % 256, 128) for y in range(64) for x in range(64)])
    img.save(comfy_server.input_dir / "para_ref_train.png")
    shapes, weights = {}, {}
    with safe_open(str(sd15_checkpoint), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) >= 2:
                layer = k[len("model."):-len(".weight")]
                shapes[layer] = tuple(f.get_slice(k).get_shape())
                weights[layer] = f.get_tensor(k)
    layers = core.select_layers(shapes, "noxattn")
    ranks = {l: core.effective_rank(4, shapes[l], "reference") for l in layers}
    para = comfy_server.models_dir / "para"
    core.save_para(core.ParaState(B={l: torch.eye(shapes[l][0], ranks[l]) for l in layers},
                                  metadata=core.build_metadata("subject", layers="noxattn", base_arch="SD15")),
                   str(para / "unit_subject.safetensors"))
    g = torch.Generator().manual_seed(5)
    U = {l: torch.randn(shapes[l][0], 2, generator=g) * 0.3 for l in layers}
    D = {l: torch.randn(2, math.prod(shapes[l][1:]), generator=g) * 0.02 for l in layers}
    core.save_para(core.reference_state(U, D, layers="noxattn", base_arch="SD15"), str(para / "ref_file.safetensors"))
    return {"image": "para_ref_train.png", "layers": layers}


def _sample_graph(prefix):
    return models.txt2img_graph(save="latent", seed=11, prefix=prefix, steps=2)


def run_latent(server, g):
    entry = server.run(g, timeout=300)
    (path,) = server.output_files(entry, "latents")
    return load_latent(path)


@pytest.mark.server
def test_server_one_tiny_reference_step_gives_W0_minus_U0_U0T_W0(comfy_server, server_files):
    g = _sample_graph("ref_step")
    g["load"] = {"class_type": "LoadImage", "inputs": {"image": server_files["image"]}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
    g["train"] = {"class_type": "PaRaTrainer", "inputs": dict(
        BASE, model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=4, rank_cap="reference",
        steps=1, learning_rate=1e-7, save_every=1, filename_prefix="srv_ref", custom_layers="", trigger_words="")}
    g["sampler"]["inputs"]["model"] = ["train", 0]
    trained = run_latent(comfy_server, g)
    e = _sample_graph("ref_expected")
    e["para"] = {"class_type": "PaRaLoader", "inputs": {"model": ["ckpt", 0], "para_name": "unit_subject.safetensors",
                                                         "strength": 1.0}}
    e["sampler"]["inputs"]["model"] = ["para", 0]
    expected = run_latent(comfy_server, e)
    base = run_latent(comfy_server, _sample_graph("ref_base"))
    print(f"one reference step: |trained - expected| {(trained - expected).abs().max():.2e}, "
          f"|expected - base| {(expected - base).abs().max():.2e}")
    assert (expected - base).abs().max() > 1e-2  # removing those channels changes the samples
    torch.testing.assert_close(trained, expected, rtol=0, atol=2e-3 * expected.abs().max().item())
    saved = sorted((comfy_server.models_dir / "para").glob("srv_ref_*_step000001.safetensors"))
    assert len(saved) == 1
    import para_core as core
    st = core.load_para(str(saved[0]))
    assert st.kind == "reference" and set(st.layers) == set(server_files["layers"])
    for l in st.layers[:5]:
        torch.testing.assert_close(st.U[l], torch.eye(st.U[l].shape[0], st.rank(l)), rtol=0, atol=1e-6)


@pytest.mark.server
def test_server_reference_file_through_stock_load_lora_equals_para_loader(comfy_server, server_files):
    para = _sample_graph("ref_para")
    para["para"] = {"class_type": "PaRaLoader", "inputs": {"model": ["ckpt", 0], "para_name": "ref_file.safetensors",
                                                           "strength": 0.8}}
    para["sampler"]["inputs"]["model"] = ["para", 0]
    via_para = run_latent(comfy_server, para)
    # stock Load LoRA reads models/loras: put the very file there
    import shutil
    shutil.copy(comfy_server.models_dir / "para" / "ref_file.safetensors",
                comfy_server.models_dir / "loras" / "ref_file_as_lora.safetensors")
    stock = _sample_graph("ref_stock")
    stock["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0],
                                                                    "lora_name": "ref_file_as_lora.safetensors",
                                                                    "strength_model": 0.8}}
    stock["sampler"]["inputs"]["model"] = ["lora", 0]
    via_stock = run_latent(comfy_server, stock)
    base = run_latent(comfy_server, _sample_graph("ref_base2"))
    print(f"stock Load LoRA vs PaRa Loader: {(via_stock - via_para).abs().max():.2e} "
          f"(adapter moves the latent by {(via_para - base).abs().max():.2e})")
    assert (via_para - base).abs().max() > 1e-2
    torch.testing.assert_close(via_stock, via_para, rtol=0, atol=1e-4 * via_para.abs().max().item() + 1e-5)


@pytest.mark.server
def test_server_exported_lora_of_a_reference_file_equals_para_loader(comfy_server, server_files):
    export = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
        "load": {"class_type": "PaRaLoad", "inputs": {"para_name": "ref_file.safetensors"}},
        "export": {"class_type": "PaRaExportLoRA", "inputs": {"model": ["ckpt", 0], "para": ["load", 0],
                                                              "filename_prefix": "ref_export", "strength": 1.0,
                                                              "dtype": "fp32"}},
    }
    comfy_server.run(export, timeout=120)
    exported = sorted((comfy_server.models_dir / "loras").glob("ref_export_*.safetensors"))
    assert exported
    para = _sample_graph("ref_para1")
    para["para"] = {"class_type": "PaRaLoader", "inputs": {"model": ["ckpt", 0], "para_name": "ref_file.safetensors",
                                                           "strength": 0.5}}
    para["sampler"]["inputs"]["model"] = ["para", 0]
    via_para = run_latent(comfy_server, para)
    stock = _sample_graph("ref_lora1")
    stock["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0],
                                                                    "lora_name": exported[-1].name,
                                                                    "strength_model": 0.5}}
    stock["sampler"]["inputs"]["model"] = ["lora", 0]
    via_lora = run_latent(comfy_server, stock)
    print(f"exported LoRA vs PaRa Loader: {(via_lora - via_para).abs().max():.2e}")
    torch.testing.assert_close(via_lora, via_para, rtol=0, atol=1e-4 * via_para.abs().max().item() + 1e-5)
