"""Test models built at test time, without downloads: a tiny in-process SD1.5-style model and a
small SD1.5-format checkpoint that ComfyUI's own loaders read; the txt2img graph that samples it;
deterministic initialisation (ComfyUI builds its modules uninitialised, biases included); the
cache they live in (outside the repo).

Only the standard library is imported at module level; torch, safetensors and ComfyUI are
imported by the functions that need them (after harness.comfyui.configure_comfy()).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from . import comfyui

# Bump when build_sd15_checkpoint changes what it writes: cached files with another version
# are rebuilt.
SD15_BUILDER_VERSION = "1"
SD15_CHECKPOINT_NAME = "test_sd15.safetensors"


# --------------------------------------------------------------------------------------------
# Deterministic initialisation (ComfyUI builds its modules uninitialised, biases included)
# --------------------------------------------------------------------------------------------

def init_weights_(module, seed: int = 0):
    """Fill every tensor of module's state_dict: >= 2-D randn/sqrt(fan_in), 1-D weights 1,
    biases 0, 0-D tensors untouched. Deterministic for a given module structure and seed."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if t.dim() == 0 or not t.is_floating_point():
                continue
            if name.endswith("bias"):
                t.zero_()
            elif t.dim() == 1:
                t.fill_(1.0)
            else:
                fan_in = t[0].numel()
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in ** 0.5)
    return module


# --------------------------------------------------------------------------------------------
# Tiny in-process SD1.5-style model
# --------------------------------------------------------------------------------------------

TINY_CONTEXT_DIM = 64

TINY_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [1, 1],
    "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": TINY_CONTEXT_DIM,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_resblock": False,
    "use_temporal_attention": False,
    "use_checkpoint": False,
    "image_size": 32,
}

# The real-loader checkpoint's UNet: the smallest that ComfyUI still detects as SD1.5
# (detection needs model_channels 320 and context_dim 768).
SD15_SMALL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    context_dim=768,
)


def sd15_config(unet_config: dict, dtype=None):
    """ComfyUI's SD15 model config for this UNet config (what get_model() builds from)."""
    import torch
    import comfy.supported_models

    class SD15ForTests(comfy.supported_models.SD15):
        pass

    SD15ForTests.unet_config = dict(unet_config)
    config = SD15ForTests(unet_config)  # adds SD15's unet_extra_config: num_heads 8, num_head_channels -1
    config.set_inference_dtype(dtype or torch.float32, None)
    return config


def make_tiny_model(seed: int = 0, dtype=None, unet_config: dict | None = None):
    """A tiny SD1.5-style ComfyUI model (EPS, SD15 latent format, context_dim 64) wrapped in a
    ModelPatcher on the CPU (or on ComfyUI's device when PARA_TEST_DEVICE is not cpu).
    Weights are initialised deterministically from seed. Needs harness.comfyui.setup_comfy() first."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    config = sd15_config(unet_config or TINY_UNET_CONFIG, dtype)
    model = config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    load_device = mm.get_torch_device() if comfyui.configured().get("device", "cpu") != "cpu" else torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))


def random_conditioning(seed: int = 0, batch: int = 1, tokens: int = 77, dim: int = TINY_CONTEXT_DIM):
    """ComfyUI CONDITIONING ([[tensor (batch, tokens, dim), {}]]) with random values."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, dim, generator=gen), {}]]


def sample_latent(model, positive, negative, seed: int = 0, steps: int = 2, cfg: float = 1.0,
                  width: int = 64, height: int = 64, sampler: str = "euler", scheduler: str = "normal",
                  latent=None):
    """Run ComfyUI's KSampler path (nodes.common_ksampler) and return the latent tensor."""
    import torch
    import nodes
    if latent is None:
        latent = torch.zeros(1, 4, height // 8, width // 8)
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative,
                                   {"samples": latent})
    return out["samples"]


# --------------------------------------------------------------------------------------------
# Small SD1.5-format checkpoint for the real loaders
# --------------------------------------------------------------------------------------------

def atomic_save(tensors: dict, path: Path, metadata: dict):
    """save_file() to a temporary name beside path, then rename: concurrent builders of one cached
    model never see a half-written file."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build_sd15_checkpoint(path, seed: int = 0, vae: str = "taesd") -> Path:
    """Write a small SD1.5-format checkpoint (fp16 safetensors) to path, atomically.

    UNet: ComfyUI's UNetModel, model_channels 320, one level, one res block, one transformer
    (25.8M params); text encoder: the full SD1 CLIP-L text model (comfy.sd1_clip.SDClipModel);
    VAE: TAESD-shaped ("taesd", default, 2.4M params) or the full SD AutoencoderKL ("kl").
    Every tensor is initialised from seed, so the same seed gives the same file contents.
    Keys: model.diffusion_model.*, cond_stage_model.*, first_stage_model.*; ComfyUI's
    CheckpointLoaderSimple loads it as SD15 (EPS). Imports ComfyUI (harness.comfyui.setup_comfy() if needed).
    """
    import torch
    if not comfyui.configured():
        comfyui.setup_comfy()
    import comfy.sd1_clip
    import comfy.ops

    tensors = {}

    def add(prefix, module, drop=()):
        for k, v in module.state_dict().items():
            if k not in drop:
                tensors[prefix + k] = v.detach().to(torch.float16).contiguous()

    with torch.no_grad():
        unet = sd15_config(SD15_SMALL_UNET_CONFIG).get_model({}, device=torch.device("cpu")).diffusion_model
        add("model.diffusion_model.", init_weights_(unet, seed))
        del unet

        clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        # Real SD1.5 checkpoints carry neither (ComfyUI drops both when it saves an SD15).
        add("cond_stage_model.", init_weights_(clip, seed + 1),
            drop=("logit_scale", "transformer.text_projection.weight"))
        del clip

        if vae == "taesd":
            import comfy.taesd.taesd
            ae = init_weights_(comfy.taesd.taesd.TAESD(), seed + 2)
            # What ComfyUI's VAELoader sets for SD1.x TAESD: decode((x - shift) * scale).
            ae.vae_scale.fill_(0.18215)
            ae.vae_shift.fill_(0.0)
        elif vae == "kl":
            from comfy.ldm.models.autoencoder import AutoencoderKL
            ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
                        "attn_resolutions": [], "dropout": 0.0}
            ae = init_weights_(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed + 2)
        else:
            raise ValueError(f"vae must be 'taesd' or 'kl', not {vae!r}")
        add("first_stage_model.", ae)
        del ae

    metadata = {
        "modelspec.title": "PaRa test SD1.5 (random weights, not a real model)",
        "para_test.builder_version": SD15_BUILDER_VERSION,
        "para_test.seed": str(seed),
        "para_test.vae": vae,
    }
    atomic_save(tensors, Path(path), metadata)
    return Path(path)


def cache_dir() -> Path:
    """Where built test models are cached, outside the repo: $PARA_TEST_CACHE or
    ~/.cache/comfyui-para."""
    return Path(os.environ.get("PARA_TEST_CACHE") or Path.home() / ".cache" / "comfyui-para").expanduser()


def cached_metadata(path: Path) -> dict | None:
    """The safetensors metadata of a cached test model, or None when it is missing or unreadable
    (then the caller rebuilds it)."""
    if not Path(path).is_file():
        return None
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:
        return None


def _checkpoint_is_current(path: Path, seed: int, vae: str) -> bool:
    meta = cached_metadata(path)
    if meta is None:
        return False
    return (meta.get("para_test.builder_version") == SD15_BUILDER_VERSION
            and meta.get("para_test.seed") == str(seed) and meta.get("para_test.vae") == vae)


def cached_sd15_checkpoint(seed: int = 0, vae: str = "taesd") -> Path:
    """The test checkpoint in cache_dir(), built if missing or made by another builder version."""
    name = SD15_CHECKPOINT_NAME if (seed, vae) == (0, "taesd") else f"test_sd15_{vae}_s{seed}.safetensors"
    path = cache_dir() / name
    if not _checkpoint_is_current(path, seed, vae):
        build_sd15_checkpoint(path, seed=seed, vae=vae)
    return path


# --------------------------------------------------------------------------------------------
# API-format graphs
# --------------------------------------------------------------------------------------------

def txt2img_graph(ckpt_name: str = SD15_CHECKPOINT_NAME, positive: str = "a photo of a cat",
                  negative: str = "", seed: int = 0, steps: int = 2, cfg: float = 2.0,
                  width: int = 64, height: int = 64, sampler: str = "euler",
                  scheduler: str = "normal", save: str = "image", prefix: str = "para_test") -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler, then
    VAEDecode -> SaveImage (save="image"), SaveLatent (save="latent") or both ("both").
    Node ids: "ckpt", "pos", "neg", "latent", "sampler", "decode", "save_image", "save_latent";
    the MODEL feeding the sampler is ["ckpt", 0], so a test can splice a node in between."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
    }
    if save in ("image", "both"):
        g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}}
        g["save_image"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    if save in ("latent", "both"):
        g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0],
                                                                    "filename_prefix": f"latents/{prefix}"}}
    if save not in ("image", "latent", "both"):
        raise ValueError(f"save must be 'image', 'latent' or 'both', not {save!r}")
    return g
