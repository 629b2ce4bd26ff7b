"""Layer presets: which weights PaRa adapts (the reference code's ``train_method``).

Patterns are regular expressions matched (``fullmatch``) against the module path inside the
diffusion model, in ComfyUI's LDM names, without the ``diffusion_model.`` prefix, e.g.
``input_blocks.1.1.transformer_blocks.0.attn1.to_q``. Only weights with >= 2 dims are ever
selected (norms and biases are never adapted).
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

from .patterns import Budget, LIST_BUDGET_S, PatternError, check_pattern_list, compile_glob, compile_regex

__all__ = ["PRESETS", "PRESET_NAMES", "DEFAULT_PRESET", "select_layers", "strip_prefix", "PresetError"]

_BLOCK = r"(?:input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)"
# Attention projections of the SD-style SpatialTransformer (diffusers "Attention" modules).
SELF_ATTN = _BLOCK + r"\.transformer_blocks\.\d+\.attn1\.(?:to_q|to_k|to_v|to_out\.0)"
CROSS_ATTN = _BLOCK + r"\.transformer_blocks\.\d+\.attn2\.(?:to_q|to_k|to_v|to_out\.0)"
# xattn-strict: the reference code drops only children whose name contains "out" (to_out.0),
# so to_v stays in (its comment says "q and k values").
CROSS_ATTN_QKV = _BLOCK + r"\.transformer_blocks\.\d+\.attn2\.(?:to_q|to_k|to_v)"
# ResBlock convs and the time-embedding projection inside each ResBlock (diffusers
# ResnetBlock2D conv1/conv2/time_emb_proj/conv_shortcut). The global ``time_embed`` MLP is not
# part of any block, so no preset selects it (the paper excludes it).
RESNET = _BLOCK + r"\.(?:in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection)"
# Downsample2D / Upsample2D convs.
RESAMPLE = r"(?:input_blocks\.\d+\.0\.op|output_blocks\.\d+\.\d+\.conv)"
MIDDLE = r"middle_block\.\d+\..*"

# Transformer families: the same intents on DiT / MMDiT block names.
# Image path: attention and MLP weights that the image tokens go through, including the joint
# blocks that mix image and text tokens (Flux single blocks, Lumina 2 main layers); not the
# text/context stream (Flux txt_*, SD3 context_block, Lumina 2 context_refiner), the embedders,
# the final layer, or the modulation (its vector carries the pooled text / guidance).
DIT_IMAGE = (r"(?:double_blocks\.\d+\.img_(?:attn\.(?:qkv|proj)|mlp\.[02])"      # Flux, Chroma
             r"|single_blocks\.\d+\.linear[12]"
             r"|joint_blocks\.\d+\.x_block\.(?:attn2?\.(?:qkv|proj)|mlp\.fc[12])"   # SD3 / SD3.5
             r"|(?:noise_refiner|layers)\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123]))")  # Lumina 2, Z-Image
DIT_TEXT = (r"(?:double_blocks\.\d+\.txt_(?:attn\.(?:qkv|proj)|mlp\.[02])"
            r"|joint_blocks\.\d+\.context_block\.(?:attn\.(?:qkv|proj)|mlp\.fc[12])"
            r"|context_refiner\.\d+\.(?:attention\.(?:qkv|out)|feed_forward\.w[123]))")
# The "h-space" of a transformer: its middle block, counted over the block stacks in the order the
# tokens go through them. Resolved per model by select_layers (the index depends on the depth).
MIDDLE_DIT_BLOCK = "<middle transformer block>"
MIDDLE_DIT_OUTPUT = "<output projection of the middle transformer block>"
DIT_STACKS = (("double_blocks", "single_blocks"), ("joint_blocks",), ("layers",))
DIT_BLOCK_OUTPUT = {"double_blocks": r"img_mlp\.2", "single_blocks": r"linear2", "joint_blocks": r"x_block\.mlp\.fc2",
                    "layers": r"feed_forward\.w2"}

PRESETS: Dict[str, Dict[str, Sequence[str]]] = {
    # every Linear/Conv in attention, resnet and down/upsample blocks except cross-attention
    "noxattn": {"include": [SELF_ATTN, RESNET, RESAMPLE, DIT_IMAGE]},
    # the reference code's comment says "all but self-attention", its filter drops only attn2:
    # the same layers as noxattn (tests/test_nodes_families_presets.py checks this on SDXL)
    "innoxattn": {"include": [SELF_ATTN, RESNET, RESAMPLE, DIT_IMAGE]},
    "selfattn": {"include": [SELF_ATTN]},
    "xattn": {"include": [CROSS_ATTN]},
    "xattn-strict": {"include": [CROSS_ATTN_QKV]},
    "full": {"include": [SELF_ATTN, CROSS_ATTN, RESNET, RESAMPLE, DIT_IMAGE, DIT_TEXT]},
    # noxattn restricted to the middle block (the "h-space")
    "noxattn-hspace": {"include": [SELF_ATTN, RESNET, RESAMPLE, DIT_IMAGE], "within": [MIDDLE, MIDDLE_DIT_BLOCK]},
    # only the last conv of the middle block: single-image editing (transformers: the middle
    # block's output projection)
    "noxattn-hspace-last": {"include": [r"middle_block\.2\.out_layers\.3", MIDDLE_DIT_OUTPUT]},
    # for transformer models (DiT / MMDiT): every 2-D weight
    "all-linear": {"include": [r".*"], "ndim": [2]},
    # attention projections of transformer models, whatever the naming scheme
    "attention-only": {
        "include": [
            r".*(?:attn\d*|attention|self_attn|cross_attn)[^.]*\.(?:to_q|to_k|to_v|to_out\.0|q|k|v|qkv|proj|o|out|q_proj|k_proj|v_proj|o_proj|out_proj)",
        ],
        "ndim": [2],
    },
}
PRESET_NAMES: List[str] = list(PRESETS)
DEFAULT_PRESET = "noxattn"
PREFIX = "diffusion_model."


class PresetError(ValueError):
    pass


def strip_prefix(path: str) -> str:
    return path[len(PREFIX):] if path.startswith(PREFIX) else path


def _compile_custom(spec: str) -> Tuple[list, list]:
    """Custom patterns: comma/newline separated; ``re:`` marks a regex, anything else is a glob
    (``*`` matches across dots); a leading ``!`` excludes. Matched with bounded work
    (patterns.py): a user's pattern must never stall the server."""
    include, exclude = [], []
    budget = Budget(LIST_BUDGET_S)
    try:
        items = check_pattern_list(spec, [x.strip() for x in re.split(r"[,\n]", spec) if x.strip()])
        for item in items:
            target = exclude if item.startswith("!") else include
            item = item.lstrip("!").strip()
            if item.startswith("re:"):
                target.append(compile_regex(item[3:], budget))
            else:
                target.append(compile_glob(strip_prefix(item), budget))
    except PatternError as e:
        raise PresetError(str(e)) from None
    if not include:
        raise PresetError(f"layer patterns {spec!r} include nothing; give a preset name ({', '.join(PRESET_NAMES)}) or patterns")
    return include, exclude


def _middle_dit_block(paths: Iterable[str]):
    """(stack, index) of the middle block of a transformer's block stacks, or None (no DiT stack).
    Flux: double blocks then single blocks (19 + 38: single_blocks.9); SD3: joint_blocks; Lumina 2 /
    Z-Image: layers (their refiners come before and are not counted)."""
    depth: Dict[str, int] = {}
    for path in paths:
        head, _, rest = path.partition(".")
        index = rest.partition(".")[0]
        if index.isdigit():
            depth[head] = max(depth.get(head, 0), int(index) + 1)
    for stacks in DIT_STACKS:
        sequence = [(stack, i) for stack in stacks for i in range(depth.get(stack, 0))]
        if sequence:
            return sequence[len(sequence) // 2]
    return None


def _resolve(patterns: Sequence[str], middle) -> List[str]:
    out = []
    for x in patterns:
        if x in (MIDDLE_DIT_BLOCK, MIDDLE_DIT_OUTPUT):
            if middle is None:
                continue
            stack, i = middle
            x = rf"{stack}\.{i}\." + (".*" if x == MIDDLE_DIT_BLOCK else DIT_BLOCK_OUTPUT[stack])
        out.append(x)
    return out


def describe(spec: str) -> str:
    """Human-readable patterns of a preset (for README/--help)."""
    p = PRESETS[spec]
    text = " | ".join(p["include"])
    if "within" in p:
        text += "  (within " + " | ".join(p["within"]) + ")"
    return text


def select_layers(shapes: Mapping[str, Sequence[int]], spec: str = DEFAULT_PRESET, family: str = "this model") -> List[str]:
    """Names (as given) of the adapted layers among ``shapes`` ({module path: weight shape}).

    ``spec`` is a preset name or custom patterns. Raises PresetError when nothing is selected.
    """
    spec = (spec or DEFAULT_PRESET).strip()
    if spec in PRESETS:
        p = PRESETS[spec]
        middle = _middle_dit_block(strip_prefix(n) for n in shapes)
        include = [re.compile(x) for x in _resolve(p["include"], middle)]
        within = [re.compile(x) for x in _resolve(p.get("within", []), middle)]
        ndims = set(p.get("ndim", []))
        exclude: List[re.Pattern] = []
    else:
        include, exclude = _compile_custom(spec)
        within, ndims = [], set()
    chosen = []
    try:
        for name, shape in shapes.items():
            if len(shape) < 2 or (ndims and len(shape) not in ndims):
                continue
            path = strip_prefix(name)
            if not any(r.fullmatch(path) for r in include):
                continue
            if within and not any(r.fullmatch(path) for r in within):
                continue
            if any(r.fullmatch(path) for r in exclude):
                continue
            chosen.append(name)
    except PatternError as e:  # a custom pattern that spent its matching budget
        raise PresetError(str(e)) from None
    if not chosen:
        hint = " (for transformer models try 'all-linear' or 'attention-only')" if spec in PRESETS and spec not in ("all-linear", "attention-only") else ""
        raise PresetError(f"layer preset {spec!r} selects no layer of {family}{hint}")
    return chosen
