"""Reading SD-style checkpoints lazily, and baking adapters into them (docs/spec.md section 4)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core_helpers import CKPT_LAYERS, PARA_LAYERS, make_checkpoint, make_subject, save_subject
from para_core import ParaError, merge_states
from para_core.functional.projection import reduce_weight
from para_core.base_model import Checkpoint, bake

LAYERS = {"diffusion_model." + k: v for k, v in CKPT_LAYERS.items()}


@pytest.fixture
def ckpt_path(tmp_path):
    path = tmp_path / "tiny.safetensors"
    make_checkpoint(path)
    return path


@pytest.mark.parametrize("layout, prefix", [("checkpoint", "model.diffusion_model."),
                                            ("diffusion_model", "diffusion_model."), ("bare", "")])
def test_layouts_give_the_same_layer_names(tmp_path, layout, prefix):
    path = tmp_path / f"{layout}.safetensors"
    tensors = make_checkpoint(path, layout=layout)
    with Checkpoint(path) as ckpt:
        assert ckpt.layout == layout
        assert ckpt.layer_shapes() == LAYERS
        layer = "diffusion_model.middle_block.2.out_layers.3"
        assert ckpt.key(layer) == prefix + "middle_block.2.out_layers.3.weight"
        assert torch.equal(ckpt.weight(layer), tensors[ckpt.key(layer)])
        assert ckpt.weight(layer).dtype == torch.float16


def test_other_models_and_one_dimensional_weights_are_not_layers(ckpt_path):
    names = set(Checkpoint(ckpt_path).layer_shapes())
    assert not any("cond_stage_model" in n or "first_stage_model" in n or "in_layers.0" in n for n in names)


def test_shapes_come_from_the_header_without_opening_the_data(ckpt_path):
    ckpt = Checkpoint(ckpt_path)
    ckpt.layer_shapes(), ckpt.family()
    assert ckpt._file is None


def test_family_and_metadata(ckpt_path):
    ckpt = Checkpoint(ckpt_path)
    assert ckpt.family() == "SD15"
    assert ckpt.metadata == {"modelspec.title": "tiny test checkpoint"}


@pytest.mark.parametrize("keys, family", [
    ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 2048)}, "SDXL"),
    ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1280), "label_emb.0.0.weight": (8, 4)},
     "SDXLRefiner"),
    ({"middle_block.0.in_layers.2.weight": (8, 8, 3, 3), "label_emb.0.0.weight": (8, 4)}, "SDXL"),
    ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (8, 1024)}, "SD20"),
    ({"double_blocks.0.img_attn.qkv.weight": (12, 4)}, "Flux"),
    ({"blocks.0.attn.qkv.weight": (12, 4)}, "unknown"),
])
def test_family_guess(tmp_path, keys, family):
    path = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model." + k: torch.zeros(s) for k, s in keys.items()}, str(path))
    assert Checkpoint(path).family() == family


# ------------------------------------------------------------------------- errors

def test_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(ParaError, match="no such checkpoint"):
        Checkpoint(tmp_path / "nope.safetensors")


def test_not_safetensors_names_the_file_and_asks_for_a_checkpoint(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04 a pickled zip, not safetensors" * 10)
    with pytest.raises(ParaError, match="not a safetensors file.*checkpoint") as e:
        Checkpoint(path)
    assert str(path) in str(e.value)


def test_truncated_checkpoint_is_an_error(ckpt_path):
    data = ckpt_path.read_bytes()
    ckpt_path.write_bytes(data[:-100])
    with pytest.raises(ParaError, match="truncated"):
        Checkpoint(ckpt_path)


def test_text_encoder_only_file_has_no_diffusion_model_weights(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({"cond_stage_model.transformer.x.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ParaError, match="no diffusion-model weights"):
        Checkpoint(path)


def test_para_or_lora_file_given_as_checkpoint_is_an_error(tmp_path):
    para = tmp_path / "para.safetensors"
    save_subject(para)
    with pytest.raises(ParaError, match="PaRa file, not a checkpoint"):
        Checkpoint(para)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.lora_down.weight": torch.zeros(2, 4)},
              str(lora))
    with pytest.raises(ParaError, match="LoRA file, not a checkpoint"):
        Checkpoint(lora)


# ------------------------------------------------------------------------- bake

def test_bake_reduces_adapted_weights_and_copies_everything_else(ckpt_path, tmp_path):
    before = load_file(str(ckpt_path))
    state = make_subject()
    out = tmp_path / "baked.safetensors"
    report = bake(ckpt_path, [(state, 1.0)], "sum", str(out))
    after = load_file(str(out))
    assert report["layers"] == len(PARA_LAYERS)
    assert set(after) == set(before)
    adapted = {"model.diffusion_model." + l + ".weight": "diffusion_model." + l for l in PARA_LAYERS}
    factors = state.factors()
    for key, t in before.items():
        assert after[key].dtype == t.dtype and after[key].shape == t.shape
        if key in adapted:
            U, V = factors[adapted[key]]
            assert torch.equal(after[key], reduce_weight(t, U, V))
            assert not torch.equal(after[key], t)
        else:
            assert torch.equal(after[key].view(torch.uint8), t.view(torch.uint8)), key


def test_bake_keeps_metadata_and_records_what_was_baked(ckpt_path, tmp_path):
    out = tmp_path / "baked.safetensors"
    bake(ckpt_path, [(make_subject(seed=1), 0.5), (make_subject(seed=2), 1.0)], "union", str(out))
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["modelspec.title"] == "tiny test checkpoint"
    info = json.loads(md["para.baked"])
    assert info["mode"] == "union" and [s for _, s in info["inputs"]] == [0.5, 1.0]
    assert info["layers"] == len(PARA_LAYERS) and len(info["base_fingerprint"]) == 16


def test_bake_of_one_file_scales_its_factors_by_the_strength(ckpt_path, tmp_path):
    state = make_subject()
    out = tmp_path / "baked.safetensors"
    bake(ckpt_path, [(state, 0.3)], "sum", str(out))
    layer = "diffusion_model." + PARA_LAYERS[1]
    U, V = state.factors()[layer]
    W0 = Checkpoint(ckpt_path).weight(layer)
    torch.testing.assert_close(Checkpoint(out).weight(layer), reduce_weight(W0, U, V, 0.3), atol=1e-6, rtol=0)


def test_bake_of_several_files_uses_the_merge(ckpt_path, tmp_path):
    a, b = make_subject(seed=1), make_subject(seed=2)
    out = tmp_path / "baked.safetensors"
    bake(ckpt_path, [(a, 1.0), (b, 0.5)], "sequential", str(out))
    merged = merge_states([a, b], [1.0, 0.5], "sequential")
    layer = "diffusion_model." + PARA_LAYERS[0]
    U, V = merged.factors()[layer]
    W0 = Checkpoint(ckpt_path).weight(layer)
    torch.testing.assert_close(Checkpoint(out).weight(layer), reduce_weight(W0, U, V), atol=1e-6, rtol=0)


def test_bake_of_a_misfitting_adapter_names_the_layer_and_writes_nothing(ckpt_path, tmp_path):
    state = make_subject(layers=["middle_block.0.emb_layers.1"], shapes={"middle_block.0.emb_layers.1": (40, 64)})
    out = tmp_path / "baked.safetensors"
    with pytest.raises(ParaError, match="middle_block.0.emb_layers.1 has 40 output channels"):
        bake(ckpt_path, [(state, 1.0)], "sum", str(out))
    assert not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-") or p.endswith(".para-tmp")]


def test_bake_reports_a_fingerprint_mismatch(ckpt_path, tmp_path):
    state = make_subject(base_fingerprint="0000000000000000")
    with pytest.warns(UserWarning, match="0000000000000000"):
        report = bake(ckpt_path, [(state, 1.0)], "sum", str(tmp_path / "b.safetensors"))
    assert len(report["warnings"]) == 1


def test_fingerprint_of_the_checkpoint_matches_the_core_fingerprint(ckpt_path):
    from para_core import fingerprint
    ckpt = Checkpoint(ckpt_path)
    layers = ["diffusion_model." + l for l in PARA_LAYERS]
    assert ckpt.fingerprint(layers) == fingerprint({l: ckpt.weight(l) for l in layers})
