"""PEFT DEFT adapters in ComfyUI: the same UNet as a diffusers model (with the real peft) and as
the SD1.5 test checkpoint that ComfyUI loads; import, export and the server."""
import copy
import json
import shutil

import pytest
import torch

from harness import models
from harness.server import load_latent

pytestmark = pytest.mark.comfyui

peft = pytest.importorskip("peft", minversion="0.21.2",
                           reason="peft >= 0.21.2 (the version with DEFT) is not installed: pip install 'peft>=0.21.2'")
diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install diffusers")
from peft import DeftConfig, PeftModel, get_peft_model  # noqa: E402

# Every Linear of an SD1.5 UNet (proj_in/proj_out are 1x1 convs there, which DEFT cannot adapt)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "time_emb_proj", "linear_1", "linear_2"]


@pytest.fixture(scope="module")
def ldm_unet_sd(sd15_checkpoint):
    from safetensors.torch import load_file
    return {k: v.float() for k, v in load_file(str(sd15_checkpoint)).items() if k.startswith("model.diffusion_model.")}


@pytest.fixture(scope="module")
def dunet(ldm_unet_sd):
    """The test checkpoint's UNet as a diffusers UNet2DConditionModel (diffusers' own conversion)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(320,), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=768, attention_head_dim=8)
    missing, unexpected = unet.load_state_dict(convert_ldm_unet_checkpoint(ldm_unet_sd, {"layers_per_block": 1}),
                                               strict=False)
    assert not missing and not unexpected
    return unet.eval()


@pytest.fixture(scope="module")
def cmodel(sd15_checkpoint, comfy_in_process):
    import comfy.sd
    model = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=False, output_clip=False)[0]
    assert type(model.model.model_config).__name__ == "SD15"
    return model


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 768, generator=g)


def diffusers_out(unet):
    x, t, c = inputs()
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=c).sample


def comfy_out(model):
    """The ComfyUI UNet's raw output (x, timesteps, context) with model's patches applied."""
    x, t, c = inputs()
    model.patch_model()
    try:
        with torch.no_grad():
            return model.model.diffusion_model(x, timesteps=t, context=c).float()
    finally:
        model.unpatch_model()


def deft_adapter(dunet, folder, method, seed=3):
    model = get_peft_model(copy.deepcopy(dunet), DeftConfig(r=4, para=True, decomposition_method=method,
                                                            target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "deft_P" in name:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[0] ** -0.5)
    model.eval().save_pretrained(str(folder))
    return model


def test_comfyui_and_diffusers_maps_agree(mods, cmodel, ldm_unet_sd):
    """ComfyUI's map (unet_to_diffusers / model_lora_keys_unet) and diffusers' conversion give
    the same name for every adapted layer of the checkpoint."""
    layers = {"diffusion_model." + k[len("model.diffusion_model."):-len(".weight")]
              for k, v in ldm_unet_sd.items() if k.endswith(".weight") and v.dim() >= 2}
    comfy_map = {d: l for d, l in mods["nodes.peft"].diffusers_names(cmodel).items() if l in layers}
    cli_map = mods["para_core.peft"].diffusers_unet_names(layers)
    assert set(cli_map.values()) == layers  # every >= 2-D weight has a diffusers name
    assert cli_map == {d: comfy_map[d] for d in cli_map}


@pytest.mark.parametrize("method", ["qr", "relu"])
def test_peft_adapter_in_comfyui_gives_peft_output(mods, dunet, cmodel, tmp_path, method):
    peft_model = deft_adapter(dunet, tmp_path / "a", method)
    core = mods["para_core"]
    state = core.load_para(str(tmp_path / "a"))
    patched = mods["nodes.patching"].apply_para(cmodel, state, 1.0)
    theirs, ours = diffusers_out(peft_model), comfy_out(patched)
    base_c, base_d = comfy_out(cmodel), diffusers_out(dunet)
    diff = float((theirs - ours).abs().max())
    floor = float((base_c - base_d).abs().max())  # the two UNet implementations without any adapter
    effect = float((theirs - base_d).abs().max())
    print(f"\n{method}: max |ComfyUI+PaRa - diffusers+PEFT| = {diff:.3g}; base models differ by {floor:.3g}; "
          f"adapter effect {effect:.3g}")
    assert diff <= max(10 * floor, 1e-4) and effect > 100 * diff


def test_export_from_comfyui_loads_in_peft_and_round_trips_exactly(mods, dunet, cmodel, comfy_base_dir):
    core, patching, pn = mods["para_core"], mods["nodes.patching"], mods["nodes.para_nodes"]
    shapes = patching.layer_shapes(cmodel)
    layers = core.select_layers(shapes, "full")
    g = torch.Generator().manual_seed(9)
    B = {l: torch.randn(shapes[l][0], 4, generator=g) for l in layers}
    state = core.ParaState(B=B, metadata=core.build_metadata("subject", rank=4, layers="full", base_arch="SD15"))
    out = pn.PaRaExportLoRA.execute(cmodel, state, "peft_rt", 1.0, "fp32", format="peft-deft")
    rel = out.result[0]
    assert rel.endswith("adapter_model.safetensors")
    text = json.dumps(out.ui.as_dict())
    assert "left out 12 conv layer(s)" in text and "decomposition_method=qr" in text
    folder = comfy_base_dir / "models" / "para" / rel.rsplit("/", 1)[0]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    linear = {l for l in layers if len(shapes[l]) == 2}
    assert len(cfg["target_modules"]) == len(linear) and cfg["decomposition_method"] == "qr"
    # PEFT loads it on the diffusers model of the same base and computes what ComfyUI computes
    loaded = PeftModel.from_pretrained(copy.deepcopy(dunet), str(folder)).eval()
    assert len([n for n, _ in loaded.named_parameters() if "deft_P" in n]) == len(linear)
    linear_state = core.ParaState(B={l: B[l] for l in linear}, metadata={})
    diff = float((diffusers_out(loaded) - comfy_out(patching.apply_para(cmodel, linear_state, 1.0))).abs().max())
    print(f"\nexport: max |diffusers+PEFT(export) - ComfyUI+PaRa| = {diff:.3g}")
    assert diff < 1e-3
    # and back through PaRa Load: bit-identical B on every exported layer
    (back,) = pn.PaRaLoad.execute(rel).result
    back = patching.fit_to_model(back, cmodel)
    assert set(back.layers) == linear
    assert all(torch.equal(back.B[l], B[l]) for l in linear)


def test_para_false_is_refused_in_comfyui(mods, dunet, cmodel, tmp_path):
    model = get_peft_model(copy.deepcopy(dunet), DeftConfig(r=2, para=False, target_modules=["to_q"]))
    model.save_pretrained(str(tmp_path / "d"))
    core = mods["para_core"]
    with pytest.raises(core.ParaError, match="para=false"):
        core.load_para(str(tmp_path / "d" / "adapter_model.safetensors"))


@pytest.mark.server
def test_server_peft_adapter_samples_like_its_import(mods, dunet, comfy_server, sd15_checkpoint):
    """PaRa Loader with the PEFT folder in models/para gives the latents of PaRa Loader with the
    import saved as a PaRa file."""
    core, core_peft = mods["para_core"], mods["para_core.peft"]
    para_dir = comfy_server.models_dir / "para"
    deft_adapter(dunet, para_dir / "dog_peft", "qr")
    from safetensors import safe_open
    with safe_open(str(sd15_checkpoint), "pt") as f:
        layers = ["diffusion_model." + k[len("model.diffusion_model."):-len(".weight")] for k in f.keys()
                  if k.startswith("model.diffusion_model.") and k.endswith(".weight") and len(f.get_slice(k).get_shape()) >= 2]
    imported = core_peft.to_model_names(core.load_para(str(para_dir / "dog_peft")), core_peft.diffusers_unet_names(layers))
    core.save_para(imported, str(para_dir / "dog_imported.safetensors"))

    def latent(name, strength=1.0):
        g = models.txt2img_graph(save="latent", seed=5, prefix=name.replace("/", "_"))
        g["para"] = {"class_type": "PaRaLoader", "inputs": {"model": ["ckpt", 0], "para_name": name, "strength": strength}}
        g["sampler"]["inputs"]["model"] = ["para", 0]
        entry = comfy_server.run(g, timeout=180)
        (path,) = comfy_server.output_files(entry, "latents")
        return load_latent(path)

    a, b = latent("dog_peft/adapter_model.safetensors"), latent("dog_imported.safetensors")
    base = latent("dog_imported.safetensors", 0.0)
    assert torch.equal(a, b)
    assert float((a - base).abs().max()) > 1e-3  # the adapter does something
    assert "no base fingerprint" in comfy_server.log_text()
