"""Layer presets on ComfyUI's SD1.5 LDM module names (docs/spec.md section 1, "Layer presets")."""
import pytest

from para_core import PRESET_NAMES, PresetError, select_layers

ATTN = "input_blocks.1.1.transformer_blocks.0"
MID_ATTN = "middle_block.1.transformer_blocks.0"
# A realistic slice of an SD1.5 UNet: {module path: weight shape}, norms and biases included.
SD15 = {
    "time_embed.0": (1280, 320), "time_embed.2": (1280, 1280),
    "input_blocks.0.0": (320, 4, 3, 3),
    "input_blocks.1.0.in_layers.0": (320,),
    "input_blocks.1.0.in_layers.2": (320, 320, 3, 3),
    "input_blocks.1.0.emb_layers.1": (320, 1280),
    "input_blocks.1.0.out_layers.0": (320,),
    "input_blocks.1.0.out_layers.3": (320, 320, 3, 3),
    "input_blocks.1.1.norm": (320,),
    "input_blocks.1.1.proj_in": (320, 320, 1, 1),
    f"{ATTN}.norm1": (320,),
    f"{ATTN}.attn1.to_q": (320, 320), f"{ATTN}.attn1.to_k": (320, 320), f"{ATTN}.attn1.to_v": (320, 320),
    f"{ATTN}.attn1.to_out.0": (320, 320),
    f"{ATTN}.attn2.to_q": (320, 320), f"{ATTN}.attn2.to_k": (320, 768), f"{ATTN}.attn2.to_v": (320, 768),
    f"{ATTN}.attn2.to_out.0": (320, 320),
    f"{ATTN}.ff.net.0.proj": (2560, 320), f"{ATTN}.ff.net.2": (320, 1280),
    "input_blocks.1.1.proj_out": (320, 320, 1, 1),
    "input_blocks.3.0.op": (320, 320, 3, 3),
    "input_blocks.4.0.in_layers.2": (640, 320, 3, 3),
    "input_blocks.4.0.skip_connection": (640, 320, 1, 1),
    "middle_block.0.in_layers.2": (1280, 1280, 3, 3), "middle_block.0.emb_layers.1": (1280, 1280),
    "middle_block.0.out_layers.3": (1280, 1280, 3, 3),
    "middle_block.1.proj_in": (1280, 1280, 1, 1),
    f"{MID_ATTN}.attn1.to_q": (1280, 1280), f"{MID_ATTN}.attn2.to_k": (1280, 768),
    f"{MID_ATTN}.ff.net.2": (1280, 5120),
    "middle_block.2.in_layers.2": (1280, 1280, 3, 3), "middle_block.2.emb_layers.1": (1280, 1280),
    "middle_block.2.out_layers.3": (1280, 1280, 3, 3),
    "output_blocks.2.1.conv": (1280, 1280, 3, 3),
    "output_blocks.3.0.skip_connection": (1280, 2560, 1, 1),
    "out.0": (320,), "out.2": (4, 320, 3, 3),
}
SELF = [f"{ATTN}.attn1.to_q", f"{ATTN}.attn1.to_k", f"{ATTN}.attn1.to_v", f"{ATTN}.attn1.to_out.0",
        f"{MID_ATTN}.attn1.to_q"]
CROSS = [f"{ATTN}.attn2.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.attn2.to_v", f"{ATTN}.attn2.to_out.0",
         f"{MID_ATTN}.attn2.to_k"]
RESNET = ["input_blocks.1.0.in_layers.2", "input_blocks.1.0.emb_layers.1", "input_blocks.1.0.out_layers.3",
          "input_blocks.4.0.in_layers.2", "input_blocks.4.0.skip_connection",
          "middle_block.0.in_layers.2", "middle_block.0.emb_layers.1", "middle_block.0.out_layers.3",
          "middle_block.2.in_layers.2", "middle_block.2.emb_layers.1", "middle_block.2.out_layers.3",
          "output_blocks.3.0.skip_connection"]
RESAMPLE = ["input_blocks.3.0.op", "output_blocks.2.1.conv"]
TWO_D = [n for n, s in SD15.items() if len(s) == 2]

EXPECTED = {
    "noxattn": SELF + RESNET + RESAMPLE,
    # the reference code filters out attn2 only (its comment says otherwise): as noxattn
    "innoxattn": SELF + RESNET + RESAMPLE,
    "selfattn": SELF,
    "xattn": CROSS,
    # the reference code drops the children named "out": q, k and v stay
    "xattn-strict": [f"{ATTN}.attn2.to_q", f"{ATTN}.attn2.to_k", f"{ATTN}.attn2.to_v", f"{MID_ATTN}.attn2.to_k"],
    "full": SELF + CROSS + RESNET + RESAMPLE,
    "noxattn-hspace": [n for n in SELF + RESNET if n.startswith("middle_block.")],
    "noxattn-hspace-last": ["middle_block.2.out_layers.3"],
    "all-linear": TWO_D,
    "attention-only": SELF + CROSS,
}


@pytest.mark.parametrize("preset", sorted(set(EXPECTED) | set(PRESET_NAMES)))
def test_preset_selects_exactly_the_documented_layers(preset):
    assert preset in EXPECTED, f"preset {preset!r} has no expected layer list here"
    assert sorted(select_layers(SD15, preset, "SD15")) == sorted(EXPECTED[preset])


@pytest.mark.parametrize("preset", ["noxattn", "full", "all-linear"])
def test_no_preset_selects_time_embedding_projections_ff_norms_or_conv_in_out(preset):
    chosen = set(select_layers(SD15, preset))
    never = {"input_blocks.0.0", "out.2", "input_blocks.1.1.proj_in", "out.0", "input_blocks.1.0.in_layers.0"}
    if preset != "all-linear":
        never |= {"time_embed.0", "time_embed.2", f"{ATTN}.ff.net.2"}
    assert not chosen & never


def test_names_with_the_diffusion_model_prefix_are_returned_as_given():
    prefixed = {"diffusion_model." + k: v for k, v in SD15.items()}
    assert select_layers(prefixed, "noxattn-hspace-last") == ["diffusion_model.middle_block.2.out_layers.3"]


@pytest.mark.parametrize("spec", ["", None])
def test_an_empty_layer_spec_selects_the_noxattn_layers(spec):
    assert sorted(select_layers(SD15, spec)) == sorted(EXPECTED["noxattn"])


def test_preset_selecting_nothing_names_preset_and_family():
    flux = {"double_blocks.0.img_attn.qkv": (9216, 3072), "double_blocks.0.img_mlp.0": (12288, 3072)}
    with pytest.raises(PresetError, match=r"'xattn'.*Flux"):
        select_layers(flux, "xattn", "Flux")


def test_custom_glob_matches_across_dots():
    assert sorted(select_layers(SD15, "*attn1.to_q")) == [f"{ATTN}.attn1.to_q", f"{MID_ATTN}.attn1.to_q"]


def test_custom_regex():
    assert sorted(select_layers(SD15, r"re:.*attn2\.to_[qkv]")) == sorted(EXPECTED["xattn-strict"])


def test_custom_exclusion_and_prefixed_glob():
    chosen = select_layers(SD15, "diffusion_model.input_blocks.1.1.*attn1*, !*to_out*")
    assert sorted(chosen) == sorted(SELF[:3])


def test_custom_patterns_never_select_one_dimensional_weights():
    assert all(len(SD15[n]) >= 2 for n in select_layers(SD15, "*"))


def test_custom_patterns_with_only_exclusions_are_an_error():
    with pytest.raises(PresetError, match="include nothing"):
        select_layers(SD15, "!*attn2*")


def test_invalid_regex_is_an_error():
    with pytest.raises(PresetError, match="not a valid regular expression"):
        select_layers(SD15, "re:attn(")
