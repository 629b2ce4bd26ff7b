"""SDXL, SD2-v, SD3, Flux and Lumina 2 end to end.

Each family's small model (harness/families.py, random weights, built once and cached) is
checked to be detected by ComfyUI as that family, its training loss is checked to be the
family's own objective (eps, v or flow velocity), and then a real ComfyUI server runs the whole
pack on it: Load Diffusion Model -> PaRa Trainer (checkpoints every step) -> PaRa Save ->
KSampler; a resume from the step-1 checkpoint; PaRa Loader -> KSampler; PaRa Load -> PaRa Merge
-> PaRa Apply -> KSampler; PaRa Export LoRA -> stock LoraLoaderModelOnly -> KSampler. The only
test-made inputs are the conditioning and latents (the node PaRaTestFamilyInputs of
harness/families.py): these families' text encoders and VAEs are too big to build here.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from harness import families as fm, models
from harness.server import ComfyServer, load_latent

pytestmark = pytest.mark.comfyui
FAMILIES = fm.FAMILY_NAMES


def skip_if_absent(name):
    if not fm.has_family(name):
        pytest.skip(f"ComfyUI {fm.comfyui_version()} has no {name} family (needs one of {fm.family(name).versions})")


# ----------------------------------------------------------------------------- in-process

@pytest.fixture(scope="module", params=FAMILIES)
def loaded(request, comfy_in_process):
    """(family name, ModelPatcher) loaded by ComfyUI's diffusion-model loader, fp16 storage."""
    skip_if_absent(request.param)
    model = fm.load(request.param, dtype=torch.float16)
    yield request.param, model
    del model


def test_comfyui_detects_the_family(loaded):
    name, model = loaded
    f = fm.family(name)
    assert fm.detected(model) == (f.config_class, f.model_type)
    # every tensor of the file landed in the model with its shape (nothing left at random)
    from safetensors import safe_open
    path = fm.cached(name)
    with safe_open(str(path), framework="pt") as fh:
        file_sd = {k: torch.empty(fh.get_slice(k).get_shape(), device="meta") for k in fh.keys()}
    # the loader's own key conversion (newer ComfyUI renames Flux's norm .scale to .weight)
    file_sd = model.model.model_config.process_unet_state_dict(file_sd)
    file_shapes = {k: tuple(v.shape) for k, v in file_sd.items()}
    model_shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    if path.is_symlink():  # built by another ComfyUI version: it may hold tensors this one ignores
        assert {k: file_shapes.get(k) for k in model_shapes} == model_shapes
    else:
        assert file_shapes == model_shapes


def test_training_loss_is_the_familys_own_objective(loaded, para_pack):
    """The trainer's loss, computed from ComfyUI's denoised output, equals the squared error of
    the network's raw prediction against the family's target: eps (SDXL), v (SD2-v), flow
    velocity noise - x0 (SD3, Flux, Lumina 2)."""
    import importlib
    training = importlib.import_module(para_pack.__name__ + ".nodes.training_loop")
    name, model = loaded
    ms = model.model.model_sampling
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.tensor([float(ms.percent_to_sigma(p)) for p in (0.2, 0.7)])
    xt = ms.noise_scaling(sigma, noise, x0, False)
    s = sigma.view(-1, 1, 1, 1)
    target = {"EPS": noise,
              "V_PREDICTION": (noise - s * x0) / (1 + s ** 2).sqrt(),
              "FLOW": noise - x0, "FLUX": noise - x0}[fm.family(name).model_type]
    delta = 0.1 * torch.randn(x0.shape, generator=g)
    denoised = ms.calculate_denoised(sigma, target + delta, xt)
    loss = training.diffusion_loss_sum(ms, denoised, x0, sigma)
    assert math.isclose(loss.item(), delta.square().sum().item(), rel_tol=1e-4)


# ----------------------------------------------------------------------------- through the server

@pytest.fixture(scope="module")
def family_server(comfyui_path):
    """A ComfyUI server with every family's model in models/diffusion_models and the test input
    node (harness/families.py) in custom_nodes."""
    paths = [fm.cached(n) for n in FAMILIES if fm.has_family(n)]
    server = ComfyServer(comfyui_path)
    for p in paths:
        server.add_model("diffusion_models", p)
    (server.custom_nodes_dir / "para_test_families.py").symlink_to(Path(fm.__file__).resolve())
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def sampler(model, inputs="in", seed=1):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": [inputs, 0], "negative": [inputs, 1], "latent_image": [inputs, 3], "denoise": 1.0}}


def save_latent(samples, prefix):
    return {"class_type": "SaveLatent", "inputs": {"samples": samples, "filename_prefix": prefix}}


def trainer(name, prefix, resume="[none]", save_every=1, gc=False):
    return {"class_type": "PaRaTrainer", "inputs": {
        "model": ["unet", 0], "latents": ["in", 2], "positive": ["in", 0], "rank": 2, "layers": "noxattn",
        "rank_cap": "reference", "steps": 2, "learning_rate": 1e-2, "optimizer": "AdamW", "batch_size": 1, "seed": 0,
        "training_dtype": "fp32", "gradient_checkpointing": gc, "init": "orthogonal", "save_every": save_every,
        "filename_prefix": prefix, "resume_from": resume}}


def base_nodes(name):
    return {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": fm.file_name(name), "weight_dtype": "default"}},
            "in": {"class_type": "PaRaTestFamilyInputs", "inputs": {"family": name, "seed": 0, "images": 2}}}


def latent(server, entry, prefix):
    files = [p for p in server.output_files(entry, "latents") if p.name.startswith(Path(prefix).name)]
    assert len(files) == 1, (prefix, server.output_files(entry, "latents"))
    return load_latent(files[0]).float()


def rel_diff(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", FAMILIES)
def test_train_resume_save_load_merge_export_through_the_server(name, family_server):
    skip_if_absent(name)
    from para_core import load_para, select_layers
    server = family_server
    f = fm.family(name)
    para_dir = server.models_dir / "para"

    # 1. train 2 steps (checkpoint after each), save, sample with the trained MODEL and the base
    g1 = dict(base_nodes(name), train=trainer(name, f"{name}/run"),
              save={"class_type": "PaRaSave", "inputs": {"para": ["train", 1], "filename_prefix": f"{name}/final",
                                                          "dtype": "fp32"}},
              ks_trained=sampler(["train", 0]), out_trained=save_latent(["ks_trained", 0], f"{name}/trained"),
              ks_base=sampler(["unet", 0]), out_base=save_latent(["ks_base", 0], f"{name}/base"))
    e1 = server.run(g1, timeout=600)
    final = f"{name}/final_00001_.safetensors"
    step1 = f"{name}/run_00001_step000001.safetensors"
    assert (para_dir / final).is_file() and (para_dir / step1).is_file()
    assert (para_dir / f"{name}/run_00001_step000002.trainer.pt").is_file()
    para = load_para(str(para_dir / final))
    meta = para.metadata
    assert meta["para.base_arch"] == f.config_class
    from para_core.write import ARCHITECTURES
    assert meta["modelspec.architecture"] == ARCHITECTURES[f.config_class] + "/para"
    assert json.loads(meta["para.train"])["steps"] == 2
    assert sorted(para.layers) == sorted("diffusion_model." + l for l in select_layers(fm.weight_shapes(name), "noxattn"))
    trained, base = latent(server, e1, f"{name}/trained"), latent(server, e1, f"{name}/base")
    assert torch.isfinite(trained).all() and rel_diff(trained, base) > 1e-4, "the adapter changed nothing"

    # 2. resume from the step-1 checkpoint to step 2; PaRa Loader; Merge (sum, second input at 0);
    #    Export LoRA
    g2 = dict(base_nodes(name), resume=trainer(name, f"{name}/resumed", resume=step1, save_every=0),
              save_resumed={"class_type": "PaRaSave", "inputs": {"para": ["resume", 1],
                                                                  "filename_prefix": f"{name}/resumed_final", "dtype": "fp32"}},
              loader={"class_type": "PaRaLoader", "inputs": {"model": ["unet", 0], "para_name": final, "strength": 1.0}},
              ks_loader=sampler(["loader", 0]), out_loader=save_latent(["ks_loader", 0], f"{name}/loader"),
              load={"class_type": "PaRaLoad", "inputs": {"para_name": final}},
              merge={"class_type": "PaRaMerge", "inputs": {"mode": "sum", "para_1": ["load", 0], "strength_1": 1.0,
                                                           "para_2": ["load", 0], "strength_2": 0.0}},
              apply={"class_type": "PaRaApply", "inputs": {"model": ["unet", 0], "para": ["merge", 0], "strength": 1.0}},
              ks_merged=sampler(["apply", 0]), out_merged=save_latent(["ks_merged", 0], f"{name}/merged"),
              export={"class_type": "PaRaExportLoRA", "inputs": {"model": ["unet", 0], "para": ["load", 0],
                                                                  "filename_prefix": f"{name}/lora", "strength": 1.0,
                                                                  "dtype": "fp32"}})
    e2 = server.run(g2, timeout=600)
    resumed = load_para(str(para_dir / f"{name}/resumed_final_00001_.safetensors"))
    for layer in para.layers:
        assert torch.allclose(resumed.B[layer], para.B[layer], atol=1e-6), f"resume differs at {layer}"
    loader, merged = latent(server, e2, f"{name}/loader"), latent(server, e2, f"{name}/merged")
    assert torch.equal(loader, trained), "PaRa Loader on the saved file differs from the trainer's MODEL"
    assert rel_diff(merged, loader) < 1e-4

    # 3. the exported LoRA through the stock loader gives PaRa Loader's result
    lora = f"{name}/lora_00001_.safetensors"
    assert (server.models_dir / "loras" / lora).is_file()
    g3 = dict(base_nodes(name),
              lora={"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["unet", 0], "lora_name": lora,
                                                                     "strength_model": 1.0}},
              ks_lora=sampler(["lora", 0]), out_lora=save_latent(["ks_lora", 0], f"{name}/lora"))
    e3 = server.run(g3, timeout=600)
    from_lora = latent(server, e3, f"{name}/lora")
    assert rel_diff(from_lora, loader) < 1e-3, rel_diff(from_lora, loader)


# ----------------------------------------------------------------------------- in-place blocks

def tiny_flux(comfy_in_process):
    """ComfyUI's Flux model class at hidden 128 (in-process only; too small for its detection)."""
    import comfy.model_patcher
    import comfy.supported_models
    import dataclasses
    from comfy.ldm.flux.model import FluxParams
    cfg = dict(fm.FLUX_DIT, hidden_size=128, num_heads=2, axes_dim=[16, 24, 24], image_model="flux")
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
        cfg["txt_ids_dims"] = []
    config = comfy.supported_models.Flux(cfg)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device=torch.device("cpu"))
    models.init_weights_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_trains_flux_blocks_that_update_their_input_in_place(checkpointing, comfy_in_process, para_pack):
    """Flux's blocks do x += gate * out after normalizing x: training through them must work,
    with and without gradient checkpointing, and both must give the same loss and B."""
    import importlib
    importlib.import_module(para_pack.__name__ + ".nodes").setup()
    trainer = importlib.import_module(para_pack.__name__ + ".nodes.trainer_node")
    results = []
    for gc in sorted({False, checkpointing}):
        with torch.inference_mode():
            model = tiny_flux(comfy_in_process)
            out = trainer.PaRaTrainer.execute(
                model=model, latents=fm.latents("flux"), positive=fm.conditioning("flux"), rank=2, layers="noxattn",
                rank_cap="reference", steps=2, learning_rate=1e-2, optimizer="AdamW", batch_size=1, seed=0,
                training_dtype="fp32", gradient_checkpointing=gc, init="orthogonal", save_every=0,
                filename_prefix="inplace", resume_from="[none]").args[:4]
        results.append(out)
    losses = results[-1][2]["loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    if len(results) == 2:
        assert results[0][2]["loss"] == pytest.approx(losses, rel=1e-5)
        for layer, B in results[0][1].B.items():
            assert torch.allclose(B, results[1][1].B[layer], atol=1e-6)
