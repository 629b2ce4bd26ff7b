"""PaRa in ComfyUI's own trainer: TrainLoraNode with algorithm "PaRa" trains
PaRa (weight-wrapper and bypass mode), and the stock loaders load what it saves."""
import shutil

import pytest
import torch

from harness import models
from harness.server import load_latent

pytestmark = pytest.mark.comfyui
ALGORITHM = "PaRa"


def test_para_is_offered_in_comfyuis_adapter_map(mods):
    import comfy.weight_adapter as wa
    assert wa.adapter_maps[ALGORITHM] is mods.para.ParaAdapter
    assert mods.para.ParaAdapter in wa.adapters


def test_create_train_follows_the_rank_rule_and_starts_as_paper_para(mods):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(320, 64, generator=g)
    t = mods.para.ParaAdapter.create_train(W, rank=8, alpha=1.0)
    assert isinstance(t, mods.para.ParaTrainDiff) and tuple(t.para_B.shape) == (320, 8)
    assert [n for n, _ in t.named_parameters()] == ["para_B"]  # saved as <layer>.para_B: a PaRa file
    Q = torch.linalg.qr(t.para_B.detach().double())[0]
    torch.testing.assert_close(t(W).double(), W.double() - Q @ (Q.t() @ W.double()), rtol=1e-5, atol=1e-5)
    assert tuple(mods.para.ParaAdapter.create_train(torch.randn(160, 8, 3, 3), rank=8).para_B.shape) == (160, 4)
    tiny = mods.para.ParaAdapter.create_train(torch.randn(4, 320, 3, 3), rank=8)  # e.g. the latent output conv
    assert list(tiny.parameters()) == [] and torch.equal(tiny(W[:4]), W[:4])


def test_to_train_continues_a_subject_and_refuses_a_merged_file(mods):
    B = torch.randn(64, 3)
    t = mods.para.ParaAdapter.load("l", {"l.para_B": B}).to_train()
    torch.testing.assert_close(t.para_B.detach(), B)
    merged = mods.para.ParaAdapter.load("l", {"l.para_U": B, "l.para_V": B})
    with pytest.raises(Exception, match="merged"):
        merged.to_train()


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_bypass_training_gives_the_weight_wrapper_gradients(mods, conv):
    g = torch.Generator().manual_seed(1)
    layer = torch.nn.Conv2d(8, 80, 3, padding=1) if conv else torch.nn.Linear(8, 80)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    x = torch.randn(2, 8, 5, 5, generator=g) if conv else torch.randn(3, 8, generator=g)
    target = torch.randn_like(layer(x))
    grads = []
    for mode in ("wrapper", "bypass"):
        t = mods.para.ParaAdapter.create_train(layer.weight, rank=2)
        with torch.no_grad():
            t.para_B.copy_(torch.randn(80, 2, generator=torch.Generator().manual_seed(2)))
        if mode == "wrapper":
            W = t(layer.weight)
            y = layer._conv_forward(x, W, layer.bias) if conv else torch.nn.functional.linear(x, W, layer.bias)
        else:
            y = t.bypass_forward(layer.forward, x)
        (y - target).square().mean().backward()
        grads.append(t.para_B.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("B", [torch.zeros(64, 3), torch.full((64, 3), 1e-40), torch.ones(64, 3)],
                         ids=["zeros", "1e-40", "dependent-columns"])
def test_to_train_refuses_a_B_without_a_basis(mods, B):
    """QR(B) has no gradient there: TrainLoraNode would train NaN and Save LoRA write it."""
    with pytest.raises(Exception, match="rank-deficient or vanishing.*existing_lora"):
        mods.para.ParaAdapter.load("l", {"l.para_B": B}, 1.0, None).to_train()


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_to_train_continues_a_reference_file_in_weight_and_bypass_mode(mods, conv):
    """A reference file (para_U/para_D, PaRa Trainer's parametrization reference) as existing_lora:
    U and D train on, the weight wrapper is W0 - U D, and bypass gives the wrapper's gradients."""
    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Conv2d(8, 80, 3, padding=1) if conv else torch.nn.Linear(8, 80)
    with torch.no_grad():
        layer.bias.normal_(generator=g)
    inner = layer.weight[0].numel()
    U, D = torch.randn(80, 2, generator=g), torch.randn(2, inner, generator=g) * 0.1
    x = torch.randn(2, 8, 5, 5, generator=g) if conv else torch.randn(3, 8, generator=g)
    target = torch.randn_like(layer(x))
    from comfy.weight_adapter.base import WeightAdapterTrainBase
    modes = ("wrapper", "bypass") if hasattr(WeightAdapterTrainBase, "bypass_forward") else ("wrapper",)  # 0.33+
    grads = []
    for mode in modes:
        t = mods.reference_adapter.ReferenceAdapter.load("l", {"l.para_U": U, "l.para_D": D}, 1.0, None).to_train()
        assert [n for n, _ in t.named_parameters()] == ["para_U", "para_D"]  # saved as a reference file again
        if mode == "wrapper":
            W = t(layer.weight)
            torch.testing.assert_close(W, layer.weight - (U @ D).reshape(layer.weight.shape))
            y = layer._conv_forward(x, W, layer.bias) if conv else torch.nn.functional.linear(x, W, layer.bias)
        else:  # the geometry ComfyUI's bypass hook sets on the adapter
            t.is_conv, t.conv_dim = conv, 2 if conv else 0
            t.kernel_size, t.in_channels = (3, 3) if conv else (), 8
            t.kw_dict = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1} if conv else {}
            y = t.bypass_forward(layer.forward, x)
        (y - target).square().mean().backward()
        grads.append((t.para_U.grad.clone(), t.para_D.grad.clone()))
    assert grads[0][0].abs().sum() > 0 and grads[0][1].abs().sum() > 0
    for a, b in zip(grads[0], grads[-1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ through the server

def train_graph(info, prefix, **overrides):
    """Checkpoint -> TrainLoraNode(algorithm PaRa) -> SaveLoRA; any input this ComfyUI's
    TrainLoraNode has and the test does not set takes its default."""
    spec = info["TrainLoraNode"]["input"]
    inputs = {"model": ["ckpt", 0], "latents": ["latent", 0], "positive": ["pos", 0]}
    for name, entry in {**spec.get("required", {}), **spec.get("optional", {})}.items():
        if name not in inputs and isinstance(entry, (list, tuple)) and len(entry) > 1 and "default" in entry[1]:
            inputs[name] = entry[1]["default"]
    inputs.update(steps=2, batch_size=1, learning_rate=1e-3, rank=4, seed=0, algorithm=ALGORITHM,
                  training_dtype="fp32", lora_dtype="fp32", gradient_checkpointing=False)
    inputs.update(overrides)
    inputs = {k: v for k, v in inputs.items() if k in {**spec.get("required", {}), **spec.get("optional", {})}}
    lora_out = info["TrainLoraNode"]["output"].index("LORA_MODEL")
    save_node = "SaveLoRA" if "SaveLoRA" in info else "SaveLoRANode"  # 0.3.64's id
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "train": {"class_type": "TrainLoraNode", "inputs": inputs},
        "save": {"class_type": save_node, "inputs": {"lora": ["train", lora_out], "prefix": f"loras/{prefix}"}},
    }


def saved_lora(server, prefix):
    files = sorted((server.output_dir / "loras").glob(f"{prefix}*.safetensors"))
    assert files, f"SaveLoRA wrote nothing for {prefix}"
    return files[-1]


def sample_with(server, prefix, node=None):
    g = models.txt2img_graph(save="latent", seed=5, prefix=prefix)
    if node is not None:
        g["m"] = node
        g["sampler"]["inputs"]["model"] = ["m", 0]
    (path,) = server.output_files(server.run(g, timeout=180), "latents")
    return load_latent(path)


def test_train_lora_node_trains_para_and_stock_loaders_load_it(comfy_server):
    from safetensors.torch import load_file
    info = comfy_server.client.object_info()
    if "TrainLoraNode" not in info:
        pytest.skip("this ComfyUI has no TrainLoraNode")
    algo = info["TrainLoraNode"]["input"]["required"]["algorithm"]
    options = algo[0] if isinstance(algo[0], list) else algo[1]["options"]
    assert ALGORITHM in options, f"TrainLoraNode does not offer PaRa: {options}"

    comfy_server.run(train_graph(info, "stock_para"), timeout=600)
    path = saved_lora(comfy_server, "stock_para")
    sd = load_file(str(path))
    para_keys = [k for k in sd if k.endswith(".para_B")]
    assert para_keys and all(k.startswith("diffusion_model.") for k in para_keys)
    q = sd["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.para_B"]
    assert tuple(q.shape) == (320, 4) and torch.isfinite(q).all()
    assert not any(k.startswith("diffusion_model.out.2") for k in para_keys), "the 4-channel output conv got a rank"
    from para_core import load_para
    st = load_para(str(path))  # PaRa's own reader takes it too (the stock trainer's diff tensors aside)
    assert st.kind == "subject" and len(st.layers) == len(para_keys)

    name = "stock_para_trained.safetensors"
    shutil.copy(path, comfy_server.models_dir / "loras" / name)
    base = sample_with(comfy_server, "st_base")
    stock = sample_with(comfy_server, "st_stock", {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["ckpt", 0], "lora_name": name, "strength_model": 1.0}})
    assert (stock - base).abs().max() > 1e-3, "the trained PaRa file changed nothing"
    if "LoraLoaderBypassModelOnly" in info:
        bypass = sample_with(comfy_server, "st_bypass", {"class_type": "LoraLoaderBypassModelOnly", "inputs": {
            "model": ["ckpt", 0], "lora_name": name, "strength_model": 1.0}})
        torch.testing.assert_close(bypass, stock, rtol=1e-3, atol=1e-3)


def test_train_lora_node_bypass_mode_continues_a_para_file(comfy_server):
    """Bypass-mode training starting from a PaRa file (existing_lora -> to_train): B moves, the
    result is a PaRa file again. (Its gradients equal weight mode's: the in-process test above;
    TrainLoraNode draws sigmas from the unseeded global RNG, so two server runs differ.)"""
    from safetensors.torch import load_file
    info = comfy_server.client.object_info()
    spec = info.get("TrainLoraNode", {}).get("input", {})
    if "bypass_mode" not in {**spec.get("required", {}), **spec.get("optional", {})}:
        pytest.skip("this ComfyUI's TrainLoraNode has no bypass mode (added after 0.3.64)")
    comfy_server.run(train_graph(info, "stock_start", steps=1), timeout=600)
    start_name = "para_start_1_steps_00001_.safetensors"  # TrainLoraNode reads the step count from the name
    shutil.copy(saved_lora(comfy_server, "stock_start"), comfy_server.models_dir / "loras" / start_name)
    comfy_server.run(train_graph(comfy_server.client.object_info(), "stock_bypass", steps=1, bypass_mode=True,
                                 existing_lora=start_name, optimizer="SGD", learning_rate=0.1), timeout=600)
    start = load_file(str(comfy_server.models_dir / "loras" / start_name))
    after = load_file(str(saved_lora(comfy_server, "stock_bypass")))
    keys = [k for k in start if k.endswith(".para_B")]
    assert keys and set(keys) == {k for k in after if k.endswith(".para_B")}
    assert all(torch.isfinite(after[k]).all() for k in keys)
    moved = max((after[k] - start[k]).abs().max().item() for k in keys)
    assert moved > 1e-6, "bypass-mode training did not move B"


def test_train_lora_node_continues_a_reference_file_and_refuses_a_B_without_basis(comfy_server, sd15_checkpoint):
    """existing_lora = a reference file (PaRa Trainer's parametrization reference): its layers train
    on as para_U/para_D, the result loads in stock Load LoRA; = a subject file whose B is all zeros:
    a clear error (before: an empty NotImplementedError, and a NaN para_B written)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    import para_core
    info = comfy_server.client.object_info()
    if "TrainLoraNode" not in info:
        pytest.skip("this ComfyUI has no TrainLoraNode")
    with safe_open(str(sd15_checkpoint), "pt") as f:
        shapes = {k[len("model."):-len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys()
                  if k.startswith("model.diffusion_model.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) >= 2}
    layers = para_core.select_layers(shapes, "selfattn")
    g = torch.Generator().manual_seed(0)
    U = {l: torch.randn(shapes[l][0], 2, generator=g) * 0.1 for l in layers}
    D = {l: torch.randn(2, int(torch.tensor(shapes[l][1:]).prod()), generator=g) * 0.01 for l in layers}
    start = "ref_start_1_steps_00001_.safetensors"  # TrainLoraNode reads the step count from the name
    para_core.save_para(para_core.reference_state(U, D), str(comfy_server.models_dir / "loras" / start))
    comfy_server.run(train_graph(info, "stock_ref", steps=1, existing_lora=start, optimizer="SGD", learning_rate=0.1),
                     timeout=600)
    after = load_file(str(saved_lora(comfy_server, "stock_ref")))
    for l in layers:
        for name, t in (("para_U", U[l]), ("para_D", D[l])):
            assert torch.isfinite(after[f"{l}.{name}"]).all()
    assert max((after[f"{l}.para_D"] - D[l]).abs().max().item() for l in layers) > 0, "U and D did not train"
    name = "stock_ref_trained.safetensors"
    shutil.copy(saved_lora(comfy_server, "stock_ref"), comfy_server.models_dir / "loras" / name)
    base = sample_with(comfy_server, "ref_base")
    stock = sample_with(comfy_server, "ref_stock", {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["ckpt", 0], "lora_name": name, "strength_model": 1.0}})
    assert (stock - base).abs().max() > 1e-3

    zero = "zero_1_steps_00001_.safetensors"
    save_file({f"{layers[0]}.para_B": torch.zeros(shapes[layers[0]][0], 2)}, str(comfy_server.models_dir / "loras" / zero))
    entry = comfy_server.run(train_graph(info, "stock_zero", steps=1, existing_lora=zero), timeout=600, check=False)
    message = entry.message or ""
    assert "rank-deficient or vanishing" in message and layers[0] in message, message[:500]
    assert not list((comfy_server.output_dir / "loras").glob("stock_zero*.safetensors"))
