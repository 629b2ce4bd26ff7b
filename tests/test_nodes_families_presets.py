"""Layer presets on every family.

SD-style UNets: the presets must select exactly what the reference code (CCRobert1997/PaRa,
trainscripts/lora_controller.py, ``create_modules``) selects on SDXL. That code walks the diffusers
UNet, keeps modules of the target classes, filters them by ``train_method`` on the diffusers
module name, and adapts every Linear/Conv2d child. Below: the diffusers -> LDM table for SDXL
(read from the diffusers and ComfyUI UNet code, checked against ComfyUI's own
``comfy.utils.unet_to_diffusers``), the reference filters transcribed line by line, and the
comparison on the released SDXL shapes (built on the meta device) and on the small detected SDXL.

Transformers: the presets mean the same things (image path without the text/context path,
attention only, one layer in the middle of the network) on SD3, Flux and Lumina 2.
"""
import math
import re
import sys
from pathlib import Path

import pytest

if __name__ == "__main__":  # run as a script (see the end): the repo root makes harness/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import families as fm  # noqa: E402

pytestmark = pytest.mark.comfyui

# ----------------------------------------------------------------------------- the reference code

# lora_controller.py: UNET_TARGET_REPLACE_MODULE_TRANSFORMER and UNET_TARGET_REPLACE_MODULE_CONV.
# The configs train with network.type "c3lier" (trainscripts/data/config-*-xl.yaml), which in the
# code PaRa builds on means both lists; its demos load adapters with `modules +=
# UNET_TARGET_REPLACE_MODULE_CONV` for c3lier. (The controller network classes pass only
# DEFAULT_TARGET_REPLACE = ["Attention"]; then noxattn-hspace-last, the paper's single-image
# editing setting, would select nothing: see test_attention_only_targets_cannot_be_the_papers.)
ATTENTION = ("Attention",)
C3LIER = ("Attention", "ResnetBlock2D", "Downsample2D", "Upsample2D")
METHODS = ["noxattn", "innoxattn", "selfattn", "xattn", "full", "xattn-strict", "noxattn-hspace",
           "noxattn-hspace-last"]


def reference_keeps(method: str, name: str, child_name: str) -> bool:
    """create_modules' filters, in its order: first on the module name, then on the child name."""
    if method in ("noxattn", "noxattn-hspace", "noxattn-hspace-last"):
        if "attn2" in name or "time_embed" in name:
            return False
    elif method == "innoxattn":
        if "attn2" in name:
            return False
    elif method == "selfattn":
        if "attn1" not in name:
            return False
    elif method in ("xattn", "xattn-strict"):
        if "attn2" not in name:
            return False
    elif method == "full":
        pass
    else:
        raise NotImplementedError(method)
    if method == "xattn-strict" and "out" in child_name:
        return False
    if method == "noxattn-hspace" and "mid_block" not in name:
        return False
    if method == "noxattn-hspace-last" and ("mid_block" not in name or ".1" not in name or "conv2" not in child_name):
        return False
    return True


def diffusers_class(module_name: str):
    """The diffusers class of a module of UNet2DConditionModel, from its name."""
    last = module_name.split(".")[-2:]
    if last[-1] in ("attn1", "attn2"):
        return "Attention"
    if last[0] == "resnets":
        return "ResnetBlock2D"
    if last[0] == "downsamplers":
        return "Downsample2D"
    if last[0] == "upsamplers":
        return "Upsample2D"
    return None


# ----------------------------------------------------------------------------- diffusers -> LDM (SDXL)

# ResnetBlock2D children -> ComfyUI ResBlock children.
RESNET_CHILD = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "norm1": "in_layers.0", "norm2": "out_layers.0",
                "conv_shortcut": "skip_connection"}
LEVELS = 3               # SDXL: block_out_channels (320, 640, 1280)
PER_LEVEL = 2            # layers_per_block
UP_WITH_ATTENTION = {0, 1}  # up_blocks 0 and 1 are CrossAttnUpBlock2D, up_block 2 an UpBlock2D


def sdxl_diffusers_to_ldm(path: str) -> str:
    """Diffusers weight module path of SDXL's UNet -> ComfyUI LDM module path."""
    rules = [
        (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)",
         lambda L, i, c: f"input_blocks.{(PER_LEVEL + 1) * L + i + 1}.0.{RESNET_CHILD[c]}"),
        (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda L, i, rest: f"input_blocks.{(PER_LEVEL + 1) * L + i + 1}.1.{rest}"),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.conv", lambda L: f"input_blocks.{(PER_LEVEL + 1) * (L + 1)}.0.op"),
        (r"mid_block\.resnets\.(\d+)\.(\w+)", lambda i, c: f"middle_block.{2 * i}.{RESNET_CHILD[c]}"),
        (r"mid_block\.attentions\.0\.(.+)", lambda rest: f"middle_block.1.{rest}"),
        (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", lambda L, i, c: f"output_blocks.{(PER_LEVEL + 1) * L + i}.0.{RESNET_CHILD[c]}"),
        (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda L, i, rest: f"output_blocks.{(PER_LEVEL + 1) * L + i}.1.{rest}"),
        (r"up_blocks\.(\d+)\.upsamplers\.0\.conv",
         lambda L: f"output_blocks.{(PER_LEVEL + 1) * L + PER_LEVEL}.{2 if L in UP_WITH_ATTENTION else 1}.conv"),
    ]
    for pattern, to_ldm in rules:
        m = re.fullmatch(pattern, path)
        if m:
            args = [int(g) if g.isdigit() else g for g in m.groups()]
            return to_ldm(*args)
    raise KeyError(path)


@pytest.fixture(scope="module")
def comfy(comfy_in_process):
    import comfy.utils  # noqa: F401
    return comfy_in_process


@pytest.fixture(scope="module")
def sdxl_real(comfy):
    return fm.weight_shapes("sdxl", real=True)


@pytest.fixture(scope="module")
def sdxl_diffusers(comfy):
    """{diffusers weight module path: LDM module path} for the released SDXL UNet, from ComfyUI's map."""
    import comfy.utils
    cfg = dict(fm.REAL_CONFIGS["sdxl"])
    out = {}
    for dk, lk in comfy.utils.unet_to_diffusers(cfg).items():
        if dk.endswith(".weight"):
            out[dk[: -len(".weight")]] = lk[: -len(".weight")]
    return out


def split_target(path: str):
    """(target module name, child name, class) of a weight module path, the way named_modules()
    nests them (e.g. '...attn1', 'to_out.0', 'Attention'), or None outside every target class."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name, child = ".".join(parts[:cut]), ".".join(parts[cut:])
        cls = diffusers_class(name)
        if cls is not None:
            return name, child, cls
    return None


def reference_selection(diffusers_modules, shapes, method, targets=C3LIER):
    """The LDM names of the layers the reference code adapts on this UNet."""
    chosen = set()
    for path, ldm in diffusers_modules.items():
        target = split_target(path)
        if target is None or ldm not in shapes:
            continue
        name, child, cls = target
        if cls in targets and reference_keeps(method, name, child) and len(shapes[ldm]) >= 2:
            chosen.add(ldm)
    return chosen


def test_the_table_agrees_with_comfyuis_own_diffusers_map(sdxl_diffusers, sdxl_real):
    """Every module the reference code can adapt maps, by the table above, to the LDM module
    ComfyUI's loader maps it to, and exists in ComfyUI's SDXL UNet."""
    checked = 0
    for dpath, lpath in sdxl_diffusers.items():
        if split_target(dpath) is None or lpath not in sdxl_real:  # the map lists absent conv_shortcuts too
            continue
        assert sdxl_diffusers_to_ldm(dpath) == lpath, dpath
        checked += 1
    # 140 attention modules x 4 projections, 22 ResBlocks x 3-4 weights and 2 norms, 4 resamplers
    assert checked >= 140 * 4 + 22 * 3 + 4


@pytest.mark.parametrize("method", METHODS)
def test_presets_select_exactly_what_the_reference_code_selects_on_sdxl(method, sdxl_diffusers, sdxl_real):
    from para_core import select_layers
    expected = reference_selection(sdxl_diffusers, sdxl_real, method)
    got = set(select_layers(sdxl_real, method, family="SDXL"))
    assert expected, method
    assert got == expected, (method, sorted(got - expected)[:5], sorted(expected - got)[:5])


@pytest.mark.parametrize("method", ["noxattn", "xattn-strict", "noxattn-hspace-last"])
def test_presets_select_the_reference_layers_on_the_small_detected_sdxl(method, sdxl_real):
    """The small SDXL of the tests differs from the released one in widths and in its shallower
    middle and decoder transformers, so each preset picks the released selection minus the skip
    connections its equal widths do not have and the transformer blocks it lacks."""
    from para_core import select_layers
    small = fm.weight_shapes("sdxl")
    got = set(select_layers(small, method, family="SDXL"))
    real = set(select_layers(sdxl_real, method, family="SDXL"))
    assert got == {n for n in real if n in small}
    assert got and all(n in real for n in got)


def test_attention_only_targets_cannot_be_the_papers(sdxl_diffusers, sdxl_real):
    """With the controller network's own target list (Attention only) the paper's single-image
    editing preset would adapt nothing, which is why the table above uses the c3lier targets."""
    assert reference_selection(sdxl_diffusers, sdxl_real, "noxattn-hspace-last", targets=ATTENTION) == set()
    assert reference_selection(sdxl_diffusers, sdxl_real, "noxattn-hspace-last") == {"middle_block.2.out_layers.3"}


def test_sdxl_counts(sdxl_diffusers, sdxl_real):
    from para_core import select_layers
    counts = {m: len(select_layers(sdxl_real, m)) for m in METHODS}
    # 70 transformer blocks x 4 projections per attention; 22 ResBlocks x 3-4 weights; 4 resamplers
    assert counts["selfattn"] == counts["xattn"] == 280
    assert counts["xattn-strict"] == 210
    assert counts["noxattn-hspace-last"] == 1
    assert counts["noxattn"] == counts["innoxattn"]
    print(counts)


# ----------------------------------------------------------------------------- transformers

TEXT_PATH = re.compile(r"(?:.*\.)?(?:txt_\w+|context_block|context_refiner|cap_embedder|context_embedder|"
                       r"y_embedder|vector_in|txt_in)(?:\..*)?")
EMBEDDERS = re.compile(r"(?:img_in|time_in|guidance_in|x_embedder|t_embedder|final_layer|pos_embed)(?:\..*)?")
MODULATION = re.compile(r".*(?:_mod\.lin|modulation\.lin|adaLN_modulation\.\d+)")
DITS = ["sd3", "flux", "lumina2"]
MIDDLE_OUTPUT = {"sd3": "joint_blocks.12.x_block.mlp.fc2", "flux": "single_blocks.9.linear2",
                 "lumina2": "layers.13.feed_forward.w2"}


@pytest.fixture(scope="module")
def dit_shapes(comfy):
    return {n: fm.weight_shapes(n, real=True) for n in DITS}


@pytest.mark.parametrize("name", DITS)
def test_transformer_noxattn_is_the_image_path_without_text_embedders_or_modulation(name, dit_shapes):
    from para_core import select_layers
    shapes = dit_shapes[name]
    chosen = select_layers(shapes, "noxattn", family=name)
    assert not [n for n in chosen if TEXT_PATH.fullmatch(n)], "noxattn must leave the text/context path alone"
    assert not [n for n in chosen if EMBEDDERS.fullmatch(n) or MODULATION.fullmatch(n)]
    assert all(len(shapes[n]) == 2 for n in chosen)
    # every attention and MLP weight of the image path is in
    full = set(select_layers(shapes, "full", family=name))
    assert set(chosen) < full
    assert set(full) - set(chosen) == {n for n in full if TEXT_PATH.fullmatch(n)}
    assert set(select_layers(shapes, "innoxattn", family=name)) == set(chosen)  # as in the reference code


@pytest.mark.parametrize("name", DITS)
def test_transformer_attention_only_selects_attention_projections(name, dit_shapes):
    from para_core import select_layers
    chosen = select_layers(dit_shapes[name], "attention-only", family=name)
    assert chosen and all(re.search(r"attn|attention", n) for n in chosen)
    assert not [n for n in chosen if re.search(r"mlp|feed_forward|linear[12]", n)]


@pytest.mark.parametrize("name", DITS)
def test_transformer_hspace_presets_sit_in_the_middle_block(name, dit_shapes):
    from para_core import select_layers
    shapes = dit_shapes[name]
    assert select_layers(shapes, "noxattn-hspace-last", family=name) == [MIDDLE_OUTPUT[name]]
    block = MIDDLE_OUTPUT[name].rsplit(".", 2)[0] if name != "sd3" else "joint_blocks.12"
    hspace = select_layers(shapes, "noxattn-hspace", family=name)
    assert hspace and all(n.startswith(block + ".") for n in hspace)
    assert MIDDLE_OUTPUT[name] in hspace
    assert set(hspace) <= set(select_layers(shapes, "noxattn", family=name))


@pytest.mark.parametrize("name", fm.FAMILY_NAMES)
def test_every_preset_selects_layers_on_the_small_test_models(name, comfy):
    from para_core import select_layers
    shapes = fm.weight_shapes(name)
    for preset in ("noxattn", "full", "noxattn-hspace", "noxattn-hspace-last", "attention-only", "all-linear"):
        assert select_layers(shapes, preset, family=name), preset


@pytest.mark.parametrize("name", list(fm.DETECTION_ONLY))
def test_families_too_big_to_build_are_detected_from_their_shapes_and_get_the_presets(name, comfy):
    """Z-Image (ComfyUI 0.33 only): its released shapes, on the meta device, are detected by
    ComfyUI as ZImage, and the transformer presets mean there what they mean on Lumina 2."""
    cls, versions, _ = fm.DETECTION_ONLY[name]
    if fm.comfyui_version() not in versions:
        pytest.skip(f"ComfyUI {fm.comfyui_version()} has no {cls} family (added in {', '.join(versions)})")
    import comfy.model_detection
    from para_core import select_layers
    sd = fm._module(name, real=True).state_dict()
    config = comfy.model_detection.model_config_from_unet(sd, "")
    assert type(config).__name__ == cls
    shapes = {k[: -len(".weight")]: tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")}
    chosen = select_layers(shapes, "noxattn", family=cls)
    assert chosen and not [n for n in chosen if TEXT_PATH.fullmatch(n) or EMBEDDERS.fullmatch(n) or MODULATION.fullmatch(n)]
    assert select_layers(shapes, "noxattn-hspace-last", family=cls) == ["layers.15.feed_forward.w2"]


def preset_table(real: bool = True):
    """Rows (family, preset, layers, parameters at rank 4 with the reference cap) for the README."""
    from para_core import select_layers
    from para_core.functional.base import effective_rank
    rows = []
    for name in fm.FAMILY_NAMES:
        shapes = fm.weight_shapes(name, real=real)
        for preset in ("noxattn", "full", "attention-only", "noxattn-hspace", "noxattn-hspace-last", "all-linear"):
            try:
                layers = select_layers(shapes, preset, family=name)
            except Exception:
                rows.append((name, preset, 0, 0))
                continue
            params = sum(shapes[l][0] * effective_rank(4, shapes[l]) for l in layers)
            rows.append((name, preset, len(layers), params))
    return rows


if __name__ == "__main__":  # python tests/test_nodes_families_presets.py: the README's per-family preset table
    import tempfile
    from harness import comfyui
    comfyui.setup_comfy(base_directory=tempfile.mkdtemp())
    for fam, preset, n, p in preset_table():
        print(f"| {fm.REAL_NAMES[fam]} | `{preset}` | {n} | {p:,} |")
