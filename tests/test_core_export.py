"""Exact export to a standard LoRA (docs/spec.md section 2, "Export to a standard LoRA")."""
import pytest
import torch

from core_helpers import make_subject, randn
from para_core import ParaState, export_lora, lora_keys, merge_states
from para_core.functional.projection import reduce_weight

SHAPES = {"input_blocks.1.1.transformer_blocks.0.attn1.to_q": (24, 24),
          "middle_block.0.emb_layers.1": (32, 64),
          "middle_block.2.out_layers.3": (32, 16, 3, 3),
          "middle_block.2.skip_connection": (32, 16, 1, 1)}
BASE = {"diffusion_model." + k: randn(*v, seed=i) * 0.1 for i, (k, v) in enumerate(SHAPES.items())}


def _state(seed=1, rank=3):
    return make_subject(layers=list(SHAPES), shapes=SHAPES, rank=rank, seed=seed)


def lora_weight(W0, lora, layer):
    """What a stock loader computes: W0 + (up @ down) * alpha / k, in float32."""
    ku, kd, ka = lora_keys(layer)
    up, down, alpha = lora[ku].float(), lora[kd].float(), lora[ka].float()
    k = up.shape[1]
    delta = (up.reshape(up.shape[0], k) @ down.reshape(k, -1)) * (alpha / k)
    return W0.float() + delta.reshape(W0.shape)


@pytest.mark.parametrize("strength", [1.0, 0.6, -0.5])
def test_lora_reproduces_the_reduction_in_fp32(strength):
    state = _state()
    lora = export_lora(state, BASE.__getitem__, strength)
    for layer, (U, V) in state.factors().items():
        expected = reduce_weight(BASE[layer], U, V, strength)
        torch.testing.assert_close(lora_weight(BASE[layer], lora, layer), expected, atol=1e-5, rtol=0)


def test_lora_keys_shapes_and_alpha():
    state = _state(rank=3)
    lora = export_lora(state, BASE.__getitem__)
    assert len(lora) == 3 * len(SHAPES)
    conv = "diffusion_model.middle_block.2.out_layers.3"
    ku, kd, ka = lora_keys(conv)
    assert ku == "lora_unet_middle_block_2_out_layers_3.lora_up.weight"
    assert lora[ku].shape == (32, 3, 1, 1) and lora[kd].shape == (3, 16, 3, 3)
    assert lora[ka].item() == 3.0
    lin = "diffusion_model.middle_block.0.emb_layers.1"
    assert lora[lora_keys(lin)[0]].shape == (32, 3) and lora[lora_keys(lin)[1]].shape == (3, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_storage_reproduces_up_to_its_rounding(dtype):
    state = _state()
    lora32 = export_lora(state, BASE.__getitem__, 1.0)
    lora = export_lora(state, BASE.__getitem__, 1.0, dtype=dtype)
    eps = torch.finfo(dtype).eps  # rounding of each stored factor is at most eps/2 relative
    for layer, (U, V) in state.factors().items():
        ku, kd, _ = lora_keys(layer)
        assert lora[ku].dtype == dtype and lora[kd].dtype == dtype
        up, down = lora32[ku].reshape(lora32[ku].shape[0], -1), lora32[kd].reshape(lora32[kd].shape[0], -1)
        bound = (eps * (up.abs() @ down.abs()) * 1.01 + 1e-7).reshape(BASE[layer].shape)
        expected = reduce_weight(BASE[layer], U, V)
        err = (lora_weight(BASE[layer], lora, layer) - expected).abs()
        assert (err <= bound).all()


def test_merged_state_exports_its_general_form():
    merged = merge_states([_state(seed=1), _state(seed=2)], [1.0, 0.5], "sequential")
    lora = export_lora(merged, BASE.__getitem__, 0.8)
    for layer, (U, V) in merged.factors().items():
        assert lora[lora_keys(layer)[2]].item() == U.shape[1]
        torch.testing.assert_close(lora_weight(BASE[layer], lora, layer),
                                   reduce_weight(BASE[layer], U, V, 0.8), atol=1e-5, rtol=0)


def test_layers_of_rank_zero_are_left_out():
    layer = "diffusion_model.middle_block.0.emb_layers.1"
    state = ParaState(kind="merged", U={layer: torch.zeros(32, 0)}, V={layer: torch.zeros(32, 0)})
    assert export_lora(state, BASE.__getitem__) == {}


def test_export_reads_the_base_weight_of_each_layer_once():
    seen = []
    export_lora(_state(), lambda l: seen.append(l) or BASE[l])
    assert sorted(seen) == sorted(BASE)
