"""Small models of the families PaRa users train (SDXL, SD2.x v-prediction, Flux, Lumina 2),
built at test time with random weights and detected by ComfyUI's own model detection.

Each builder writes a diffusion-model-only safetensors file (fp16, bare keys, what ComfyUI's
"Load Diffusion Model" node reads from models/diffusion_models) into the test cache
(harness.models.cache_dir()/families/<signature>, never into the repo; ComfyUI versions whose
modules agree share one file). The shapes are the smallest that ComfyUI
still detects as that family (detection reads sizes from the weights):

| family | ComfyUI class | what is cut |
|---|---|---|
| sdxl | SDXL | channel_mult [1, 1, 1] (real: [1, 2, 4]); middle and decoder transformers 1 block deep (real: up to 10; detection reads them but matches only the encoder's); the exact encoder depths, 2048 context, ADM 2816 |
| sd2v | SD20 (V_PREDICTION) | channel_mult [1, 1, 1, 1], attention only at the top level (output_blocks.11 must exist: ComfyUI tells v from eps by it) |
| sd3 | SD3 | MMDiT depth 2 (hidden 128, 2 joint blocks; sizes are read from the weights) |
| flux | Flux | 1 double + 1 single block; hidden 3072 (ComfyUI 0.3.64 does not read it from the weights) |
| lumina2 | Lumina2 | 1 main layer (the 2 refiners per stream are fixed); dim 2304 is fixed by detection |

The text encoders of these families (CLIP-G, OpenCLIP-H, T5-XXL, Gemma 2) are far too big to
build here, so conditioning is made in-process with the shape and extra keys each family's
model expects (``conditioning()``). The same module is also a tiny ComfyUI custom node file
(``PaRaTestFamilyInputs``, V1 API) that the server tests link into custom_nodes/: it outputs
that conditioning and random latents, so every other node of a graph is the real one.

Only the standard library is imported at module level: ComfyUI imports this file on its own, as
a single-file node outside any package, so the builders import the rest of the harness inside
the functions that only the test process calls.
"""
from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BUILDER_VERSION = "1"


@dataclass(frozen=True)
class Family:
    name: str
    config_class: str          # type(model.model.model_config).__name__ after ComfyUI's detection
    model_type: str            # ModelType name: EPS, V_PREDICTION, FLOW
    latent_channels: int
    context_dim: int
    tokens: int                # conditioning tokens used in tests
    latent_size: int           # latent height = width used in tests
    versions: tuple = ("0.3.64", "0.33.0")  # ComfyUI versions that have the family
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "sdxl": Family("sdxl", "SDXL", "EPS", 4, 2048, 77, 8, extra={"pooled_output": 1280}),
    "sd2v": Family("sd2v", "SD20", "V_PREDICTION", 4, 1024, 77, 8),
    "sd3": Family("sd3", "SD3", "FLOW", 16, 4096, 8, 8, extra={"pooled_output": 2048}),
    "flux": Family("flux", "Flux", "FLUX", 16, 4096, 8, 8, extra={"pooled_output": 768, "guidance": 3.5}),
    "lumina2": Family("lumina2", "Lumina2", "FLOW", 16, 2304, 8, 8, extra={"attention_mask": True}),
}
FAMILY_NAMES = list(FAMILIES)

# ComfyUI UNetModel kwargs (what supported_models builds from the detected unet_config).
SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1], transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_middle=1, transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    context_dim=2048, adm_in_channels=2816, num_classes="sequential", use_spatial_transformer=True,
    use_linear_in_transformer=True, legacy=False, use_temporal_resblock=False, use_temporal_attention=False,
    num_heads=-1, num_head_channels=64,
)
SD2_UNET = dict(
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1], transformer_depth=[1, 1, 0, 0, 0, 0, 0, 0],
    transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    context_dim=1024, adm_in_channels=None, use_spatial_transformer=True, use_linear_in_transformer=True,
    legacy=False, use_temporal_resblock=False, use_temporal_attention=False, num_heads=-1, num_head_channels=64,
)
# What ComfyUI builds for an SD3 checkpoint (model_detection's mmdit branch), at depth 2.
SD3_DIT = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, input_size=None, adm_in_channels=2048,
               context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
               num_patches=1024, pos_embed_max_size=32, pos_embed_scaling_factor=None, x_block_self_attn_layers=[])
FLUX_DIT = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                patch_size=2, qkv_bias=True, guidance_embed=True)
LUMINA2_DIT = dict(patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=1, n_heads=24, n_kv_heads=8,
                   qk_norm=True, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512])
# The released models' shapes (for layer and parameter counts; built on the meta device only).
REAL_CONFIGS = {
    "sdxl": dict(SDXL_UNET, channel_mult=[1, 2, 4], transformer_depth_middle=10,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10]),
    "sd2v": dict(SD2_UNET, channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]),
    "sd3": dict(SD3_DIT, depth=24, num_patches=36864, pos_embed_max_size=192,
                context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}}),
    "flux": dict(FLUX_DIT, depth=19, depth_single_blocks=38),
    "lumina2": dict(LUMINA2_DIT, n_layers=26),
}
# Families only checked for detection and presets (no end-to-end run: too big to build here).
# Z-Image (ComfyUI >= 0.33): Lumina 2's NextDiT at dim 3840, what its detection sets.
DETECTION_ONLY = {
    "zimage": ("ZImage", ("0.33.0",), dict(LUMINA2_DIT, dim=3840, cap_feat_dim=2560, n_layers=30, n_heads=30,
                                            n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                                            rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True,
                                            time_scale=1000.0, pad_tokens_multiple=32)),
}
REAL_NAMES = {"zimage": "Z-Image", "sdxl": "SDXL 1.0", "sd2v": "SD 2.1-v", "sd3": "SD3 Medium", "flux": "Flux.1-dev", "lumina2": "Lumina Image 2.0"}
# ComfyUI tells SD2-v from SD2-eps by the spread of this bias (SD20.model_type); real v models have it.
SD2_V_MARKER = "output_blocks.11.1.transformer_blocks.0.norm1.bias"


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILY_NAMES)}") from None


def comfyui_version() -> str:
    """The version of the ComfyUI on sys.path (comfyui_version.py), e.g. '0.3.64'."""
    try:
        import comfyui_version
        return comfyui_version.__version__
    except Exception:
        return "unknown"


def has_family(name: str) -> bool:
    return comfyui_version() in family(name).versions or comfyui_version() == "unknown"


# ------------------------------------------------------------------------------ building

def _config(name: str) -> dict:
    return {"sdxl": SDXL_UNET, "sd2v": SD2_UNET, "sd3": SD3_DIT, "flux": FLUX_DIT, "lumina2": LUMINA2_DIT}[name]


def _config_tag(name: str) -> str:
    """Changes whenever a builder's shapes change, so stale cached files are rebuilt."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(_config(name), sort_keys=True).encode()).hexdigest()[:12]


def _module(name: str, real: bool = False, meta: bool = False):
    """ComfyUI's own module for the family, uninitialised: the test size on the CPU in float32
    (meta=True: on the meta device, shapes only), or (real=True) the released model's size on the
    meta device (no memory)."""
    import torch
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    if name in DETECTION_ONLY:
        cfg, real = DETECTION_ONLY[name][2], True
    else:
        cfg = REAL_CONFIGS[name] if real else _config(name)
    kw = dict(dtype=torch.float16 if real else torch.float32, device="meta" if real or meta else "cpu", operations=ops)
    with torch.device(kw["device"]):
        if name in ("sdxl", "sd2v"):
            from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
            return UNetModel(**cfg, **kw)
        if name == "sd3":
            from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
            return MMDiT(**cfg, **kw)
        if name == "flux":
            import dataclasses
            from comfy.ldm.flux.model import Flux, FluxParams
            if "txt_ids_dims" in {f.name for f in dataclasses.fields(FluxParams)}:
                cfg = dict(cfg, txt_ids_dims=[])  # newer ComfyUI (0.33): what its detection sets for Flux.1
            return Flux(**cfg, **kw)
        if name in ("lumina2", "zimage"):
            from comfy.ldm.lumina.model import NextDiT
            return NextDiT(**cfg, **kw)
    raise ValueError(name)


def weight_shapes(name: str, real: bool = False) -> dict:
    """{module path: weight shape} of every weight ('.weight' tensors) of the family's diffusion
    model: the test model's (read from its file header, nothing loaded) or the released model's."""
    if real:
        return {k[: -len(".weight")]: tuple(v.shape) for k, v in _module(name, real=True).state_dict().items()
                if k.endswith(".weight")}
    from safetensors import safe_open
    with safe_open(str(cached(name)), framework="pt") as f:
        return {k[: -len(".weight")]: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight")}


def build(name: str, path, seed: int = 0) -> Path:
    """Write the family's small diffusion model (fp16, bare keys) to path, atomically.
    Needs ComfyUI importable (harness.comfyui.setup_comfy())."""
    import torch
    from harness import models
    family(name)
    t0 = time.perf_counter()
    with torch.no_grad():
        module = models.init_weights_(_module(name), seed)
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        del module
        if name == "sd2v":
            g = torch.Generator().manual_seed(seed + 7)
            tensors[SD2_V_MARKER] = (0.2 * torch.randn(tensors[SD2_V_MARKER].shape, generator=g)).half()
    meta = {"modelspec.title": f"PaRa test {name} (random weights, not a real model)",
            "para_test.family": name, "para_test.builder_version": BUILDER_VERSION, "para_test.seed": str(seed),
            "para_test.config": _config_tag(name), "para_test.signature": signature(name, seed)}
    models.atomic_save(tensors, Path(path), meta)
    n = sum(v.numel() for v in tensors.values())
    print(f"[harness.families] built {name}: {n / 1e6:.1f}M params, {Path(path).stat().st_size / 2**20:.0f} MiB "
          f"in {time.perf_counter() - t0:.1f}s -> {path}", file=sys.stderr)
    return Path(path)


def file_name(name: str) -> str:
    return f"test_{name}.safetensors"


@functools.lru_cache(maxsize=None)
def signature(name: str, seed: int = 0) -> str:
    """What the family's test file holds, as 16 hex digits: the builder version, the seed, the
    config and every tensor's name and shape in the running ComfyUI's module (built on the meta
    device, no memory). Two ComfyUI versions whose modules agree share one file; where a module
    differs (Lumina 2 gained norm_final), each gets its own."""
    import hashlib
    import json
    tensors = sorted((k, list(v.shape)) for k, v in _module(name, meta=True).state_dict().items())
    payload = {"family": name, "builder_version": BUILDER_VERSION, "seed": seed, "config": _config_tag(name),
               "tensors": tensors}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _is_current(path: Path, name: str, seed: int, sig: str) -> bool:
    """path holds today's build of the family for this signature, or links to today's build of
    another signature (a file another ComfyUI built that this one loads completely)."""
    from harness import models
    meta = models.cached_metadata(path)
    if meta is None:
        return False
    if path.is_symlink():
        sig = path.resolve().parent.name
    return _built_today(meta, name, seed) and meta.get("para_test.signature") == sig


def _built_today(meta: dict, name: str, seed: int) -> bool:
    """The metadata names this family and seed, built by today's builder and config."""
    return (meta.get("para_test.family") == name and meta.get("para_test.seed") == str(seed)
            and meta.get("para_test.builder_version") == BUILDER_VERSION
            and meta.get("para_test.config") == _config_tag(name))


def _loads_completely(path: Path, name: str) -> bool:
    """Whether the running ComfyUI loads the file as the family with every weight of its module
    present ("unet missing" is the warning ComfyUI's load_model_weights gives otherwise); extra
    tensors are fine (ComfyUI ignores them, as it does for the released files)."""
    import logging
    import comfy.sd

    class Missing(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.seen = False

        def emit(self, record):
            self.seen = self.seen or record.getMessage().startswith("unet missing")

    handler, root = Missing(), logging.getLogger()
    root.addHandler(handler)
    try:
        mp = comfy.sd.load_diffusion_model(str(path))
        detected = type(mp.model.model_config).__name__
        del mp
    except Exception:
        return False
    finally:
        root.removeHandler(handler)
    return not handler.seen and detected == family(name).config_class


def _shared_file(root: Path, name: str, seed: int, sig: str, file: str) -> Path | None:
    """Today's build of the family under another signature that the running ComfyUI can use:
    module layouts differ between versions in ways their loaders bridge (0.33 renamed Flux's
    norm scales and reads the old names; it dropped Lumina 2's norm_final and ignores it)."""
    from harness import models
    if not root.is_dir():
        return None
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and _is_signature(p.name) and p.name != sig):
        f = folder / file
        if f.is_symlink() or not f.is_file():
            continue
        meta = models.cached_metadata(f) or {}
        if (_built_today(meta, name, seed) and meta.get("para_test.signature") == folder.name
                and _loads_completely(f, name)):
            return f
    return None


def _link(path: Path, target: Path):
    """path -> target as a relative symlink, replacing path atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.link")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(target, path.parent))
    os.replace(tmp, path)


def _is_signature(folder_name: str) -> bool:
    return len(folder_name) == 16 and all(c in "0123456789abcdef" for c in folder_name)


def remove_stale(root: Path, name: str, seed: int, keep: Path) -> list[Path]:
    """Delete the family's test files that no ComfyUI can use any more: those of the old
    one-folder-per-ComfyUI-version layout (families/0.3.64/...), and those built by an older
    builder or config. Files of another signature built by today's builder stay (another
    ComfyUI version's layout). Only files that carry this family's para_test metadata are
    touched; a folder is removed once empty. Returns what was deleted."""
    from harness import models
    removed = []
    if not root.is_dir():
        return removed
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("test_*.safetensors")):
            if f == keep:
                continue
            meta = models.cached_metadata(f) or {}
            if meta.get("para_test.family") != name or meta.get("para_test.seed") != str(seed):
                continue  # not this family's file (or not ours at all)
            if not _is_signature(folder.name) or not _built_today(meta, name, seed):
                try:
                    f.unlink()
                    removed.append(f)
                except OSError:
                    pass
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass
    return removed


def cached(name: str, seed: int = 0) -> Path:
    """The family's test model in the cache (families/<signature>/), built when missing or stale.
    ComfyUI versions whose module for the family has the same tensors share the file; where they
    differ, a file another version built is linked to when this one loads it completely."""
    from harness import models
    sig = signature(name, seed)
    root = models.cache_dir() / "families"
    file = file_name(name) if seed == 0 else f"test_{name}_s{seed}.safetensors"
    path = root / sig / file
    if not _is_current(path, name, seed, sig):
        shared = _shared_file(root, name, seed, sig, file)
        if shared is not None:
            _link(path, shared)
        else:
            build(name, path, seed)
        remove_stale(root, name, seed, keep=path)  # whoever makes a file cleans up, once
    return path


def load(name: str, seed: int = 0, dtype=None):
    """ComfyUI's ModelPatcher for the family's cached model, through comfy.sd.load_diffusion_model
    (what the "Load Diffusion Model" node calls): ComfyUI detects the family from the weights."""
    import comfy.sd
    opts = {} if dtype is None else {"dtype": dtype}
    return comfy.sd.load_diffusion_model(str(cached(name, seed)), model_options=opts)


def detected(model) -> tuple:
    """(model_config class name, model type name) as ComfyUI detected them."""
    m = model.model
    return type(m.model_config).__name__, m.model_type.name


# ------------------------------------------------------------------------------ inputs

def conditioning(name: str, seed: int = 0, batch: int = 1):
    """CONDITIONING with the family's context width and the extra keys its model reads
    (SDXL: pooled_output for the ADM vector; Flux: pooled_output and guidance; Lumina 2: the
    attention mask its text path needs). Random, seeded."""
    import torch
    f = family(name)
    g = torch.Generator().manual_seed(seed)
    extra = {}
    for k, v in f.extra.items():
        if k == "pooled_output":
            extra[k] = torch.randn(batch, v, generator=g)
        elif k == "attention_mask":
            extra[k] = torch.ones(batch, f.tokens, dtype=torch.long)
        else:
            extra[k] = v
    return [[torch.randn(batch, f.tokens, f.context_dim, generator=g), extra]]


def latents(name: str, n: int = 1, seed: int = 0):
    import torch
    f = family(name)
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(n, f.latent_channels, f.latent_size, f.latent_size, generator=g)}


def empty_latent(name: str):
    import torch
    f = family(name)
    return {"samples": torch.zeros(1, f.latent_channels, f.latent_size, f.latent_size)}


# ------------------------------------------------------------------------------ the test node

class PaRaTestFamilyInputs:
    """Test-only node: the conditioning and latents a family's text encoder / VAE would give
    (random, seeded), for server tests of families whose encoders are too big to build here."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (FAMILY_NAMES,), "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
                             "images": ("INT", {"default": 1, "min": 1, "max": 16})}}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latents", "empty_latent")
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, family, seed, images):
        return (conditioning(family, seed), conditioning(family, seed + 1000), latents(family, images, seed),
                empty_latent(family))


NODE_CLASS_MAPPINGS = {"PaRaTestFamilyInputs": PaRaTestFamilyInputs}
