"""The reference code's parametrization (docs/spec.md section 1b): W' = W0 - U D with U, D trained freely.

Dense references are written out here in float64 (U0 = the first r unit vectors, D0 = U0^T W0,
y = W0 x + b - U (D x)) and compared with para_core's factored formulas, on Linear and Conv.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from core_helpers import CKPT_LAYERS, PARA_LAYERS, dense_reduce, make_checkpoint, make_subject, randn
from para_core import (ParaError, ParaState, RankCap, effective_rank, export_lora, load_para, lora_keys,
                       merge_states, reference_state, save_para)
from para_core.base_model import Checkpoint
from para_core.cli import main
from para_core.functional import reference
from para_core.functional.base import layer_op
from para_core.functional.projection import init_B

PREFIX = "diffusion_model."


def _reference_state(seed=1, rank=2, layers=PARA_LAYERS, base=None, fingerprint=""):
    """A trained-looking reference adapter: U, D random (not orthonormal, D not U^T W0)."""
    g = torch.Generator().manual_seed(seed)
    U, D = {}, {}
    for l in layers:
        shape = CKPT_LAYERS[l]
        U[PREFIX + l] = torch.randn(shape[0], rank, generator=g)
        D[PREFIX + l] = torch.randn(rank, math.prod(shape[1:]), generator=g) * 0.1
    return reference_state(U, D, rank=rank, layers="noxattn", base_arch="SD15", base_fingerprint=fingerprint,
                           title=f"reference {seed}", train={"parametrization": "reference", "steps": 1})


def _dense_weight(W0, U, D, s=1.0):
    return (W0.double().reshape(W0.shape[0], -1) - s * U.double() @ D.double()).reshape(W0.shape)


# ----------------------------------------------------------------------------- init

@pytest.mark.parametrize("shape", [(12, 20), (8, 3, 3, 3)], ids=["linear", "conv"])
def test_reference_init_is_the_first_unit_vectors_and_D0_the_first_rows(shape):
    W0 = randn(*shape, seed=3)
    U0, D0 = reference.init(W0, 3, "reference")
    assert torch.equal(U0, torch.eye(shape[0], 3))
    assert torch.equal(D0, W0.reshape(shape[0], -1)[:3])
    # the authors' code: QR of lora_up = 0 (torch gives the same columns, with signed zeros)
    Q, _ = torch.linalg.qr(torch.zeros(shape[0], 3))
    assert torch.equal(Q.abs(), U0)


@pytest.mark.parametrize("method", ["kaiming", "orthogonal", "top-singular", "bottom-singular"])
def test_other_inits_take_U0_from_the_QR_of_B0_and_D0_as_U0_transpose_W0(method):
    W0 = randn(16, 24, seed=4)
    U0, D0 = reference.init(W0, 4, method, torch.Generator().manual_seed(5))
    B0 = init_B(W0, 4, method, torch.Generator().manual_seed(5))
    Q, _ = torch.linalg.qr(B0.double())
    torch.testing.assert_close(U0.double(), Q, atol=1e-6, rtol=0)
    torch.testing.assert_close(D0.double(), Q.t() @ W0.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["reference", "orthogonal"])
def test_at_step_zero_the_reference_model_is_the_papers(method):
    W0 = randn(10, 3, 3, 3, seed=6)
    U0, D0 = reference.init(W0, 2, method, torch.Generator().manual_seed(0))
    torch.testing.assert_close(reference.reduce_weight(W0, U0, D0).double(), dense_reduce(W0, U0), atol=1e-6, rtol=0)


def test_paper_init_reference_gives_the_same_subspace():
    B0 = init_B(randn(9, 5), 3, "reference")
    assert torch.equal(B0, torch.eye(9, 3))


# ----------------------------------------------------------------------------- the forward and the weight form

@pytest.mark.parametrize("strength", [1.0, 0.5, -1.0])
def test_weight_form_is_W0_minus_s_U_D(strength):
    W0, U, D = randn(12, 4, 3, 3, seed=1), randn(12, 3, seed=2), randn(3, 36, seed=3)
    torch.testing.assert_close(reference.reduce_weight(W0, U, D, strength).double(), _dense_weight(W0, U, D, strength),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.delta(W0.shape, U, D, strength).double(),
                               _dense_weight(W0, U, D, strength) - W0.double(), atol=1e-5, rtol=0)


def test_weight_form_keeps_the_storage_dtype():
    W0 = randn(8, 8, seed=1).half()
    assert reference.reduce_weight(W0, randn(8, 2), randn(2, 8)).dtype == torch.float16


@pytest.mark.parametrize("module", [
    lambda: torch.nn.Linear(20, 12),
    lambda: torch.nn.Conv2d(4, 12, 3, padding=1),
    lambda: torch.nn.Conv2d(4, 12, 3, stride=2, padding=1, dilation=1),
    lambda: torch.nn.Conv2d(6, 12, 1),
], ids=["linear", "conv3x3", "conv-stride2", "conv1x1"])
def test_activation_and_weight_side_equal_the_dense_forward(module):
    torch.manual_seed(0)
    m = module()
    W0, b = m.weight.detach(), m.bias.detach()
    U, D = randn(12, 3, seed=1), randn(3, W0[0].numel(), seed=2)
    x = randn(2, 20, seed=3) if isinstance(m, torch.nn.Linear) else randn(2, W0.shape[1], 8, 8, seed=3)
    channel_dim = -1 if isinstance(m, torch.nn.Linear) else 1
    op = layer_op(m)
    W = _dense_weight(W0, U, D).float()
    expected = F.linear(x, W, b) if channel_dim == -1 else m._conv_forward(x, W, b)
    for fwd in (reference.forward_activation_side, reference.forward_weight_side):
        torch.testing.assert_close(fwd(op, x, W0, b, U, D, channel_dim), expected, atol=1e-4, rtol=1e-4)


def test_gradients_reach_U_and_D_on_both_sides():
    m = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = randn(1, 4, 6, 6)
    grads = []
    for fwd in (reference.forward_activation_side, reference.forward_weight_side):
        U = randn(8, 2, seed=1).requires_grad_()
        D = randn(2, 36, seed=2).requires_grad_()
        fwd(layer_op(m), x, m.weight.detach(), None, U, D, 1).square().sum().backward()
        grads.append((U.grad, D.grad))
    for a, b in zip(*grads):
        assert a is not None and a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


def test_parameter_count_is_rank_times_out_plus_inner():
    st = _reference_state(rank=2)
    assert st.num_params() == sum(2 * (CKPT_LAYERS[l][0] + math.prod(CKPT_LAYERS[l][1:])) for l in PARA_LAYERS)
    assert st.ranks() == {PREFIX + l: 2 for l in PARA_LAYERS}


# ----------------------------------------------------------------------------- the file

def test_file_round_trip_keeps_U_D_kind_and_metadata(tmp_path):
    st = _reference_state()
    path = save_para(st, str(tmp_path / "ref.safetensors"))
    back = load_para(path)
    assert back.kind == "reference" and back.metadata["para.kind"] == "reference"
    assert set(back.layers) == set(st.layers)
    for l in st.layers:
        assert torch.equal(back.U[l], st.U[l]) and torch.equal(back.D[l], st.D[l])
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    conv = PREFIX + "middle_block.2.out_layers.3"
    assert {f"{conv}.para_U", f"{conv}.para_D"} <= keys and not any(k.endswith((".para_B", ".para_V")) for k in keys)
    assert json.loads(back.metadata["para.train"])["parametrization"] == "reference"


def test_reference_state_has_no_general_form():
    with pytest.raises(ParaError, match="no general"):
        _reference_state().factors()


def _write(tmp_path, tensors, kind="reference"):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={"para.kind": kind, "para.format": "1"})
    return str(path)


@pytest.mark.parametrize("tensors, match", [
    ({"diffusion_model.a.para_U": torch.zeros(4, 2)}, "para_U but no para_D"),
    ({"diffusion_model.a.para_D": torch.zeros(2, 4)}, "para_D but no para_U"),
    ({"diffusion_model.a.para_U": torch.zeros(4, 2), "diffusion_model.a.para_D": torch.zeros(3, 4)}, "disagree on the rank"),
    ({"diffusion_model.a.para_U": torch.zeros(4, 2), "diffusion_model.a.para_D": torch.zeros(2, 4, 1)}, r"expected \(rank, in\*kh\*kw\)"),
    ({"diffusion_model.a.para_U": torch.full((4, 2), float("nan")), "diffusion_model.a.para_D": torch.zeros(2, 4)}, "NaN or Inf"),
    ({"diffusion_model.a.para_U": torch.zeros(4, 2), "diffusion_model.a.para_D": torch.zeros(2, 4),
      "diffusion_model.a.para_V": torch.zeros(4, 2)}, "mixes para_D with para_V"),
    ({"diffusion_model.a.para_B": torch.zeros(4, 2), "diffusion_model.a.para_D": torch.zeros(2, 4)}, "mixes para_B"),
], ids=["no-D", "no-U", "rank", "D-3d", "nan", "with-V", "with-B"])
def test_invalid_reference_files_are_errors_naming_file_and_layer(tmp_path, tensors, match):
    path = _write(tmp_path, tensors)
    with pytest.raises(ParaError, match=match) as e:
        load_para(path)
    assert "bad.safetensors" in str(e.value)


def test_a_file_for_other_input_widths_does_not_fit(tmp_path):
    from para_core import check_fits
    st = _reference_state()
    shapes = {PREFIX + l: s for l, s in CKPT_LAYERS.items()}
    shapes[PREFIX + "middle_block.0.emb_layers.1"] = (32, 128)
    with pytest.raises(ParaError, match="middle_block.0.emb_layers.1: para_D has 64 input columns"):
        check_fits(st, shapes)


# ----------------------------------------------------------------------------- export, merge

@pytest.mark.parametrize("strength", [1.0, 0.7, -0.5])
def test_lora_export_is_exact(strength):
    st = _reference_state()
    base = {PREFIX + l: randn(*s, seed=i) for i, (l, s) in enumerate(CKPT_LAYERS.items())}
    lora = export_lora(st, base.__getitem__, strength)
    for l in st.layers:
        ku, kd, ka = lora_keys(l)
        up, down, alpha = lora[ku], lora[kd], lora[ka]
        k = up.shape[1]
        W = base[l].float() + ((up.reshape(up.shape[0], k) @ down.reshape(k, -1)) * (alpha / k)).reshape(base[l].shape)
        torch.testing.assert_close(W.double(), _dense_weight(base[l], st.U[l], st.D[l], strength), atol=1e-5, rtol=0)
        assert torch.equal(down.reshape(k, -1), st.D[l])  # lora_down = D, no W0 in it
    conv = PREFIX + "middle_block.2.out_layers.3"
    assert lora[lora_keys(conv)[0]].shape == (32, 2, 1, 1) and lora[lora_keys(conv)[1]].shape == (2, 32, 3, 3)


def test_sum_merge_concatenates_the_terms():
    a, b = _reference_state(seed=1, rank=2), _reference_state(seed=2, rank=3)
    m = merge_states([a, b], [0.5, -1.0], "sum")
    assert m.kind == "reference" and m.metadata["para.merge_mode"] == "sum"
    W0 = randn(*CKPT_LAYERS[PARA_LAYERS[0]], seed=9)
    l = PREFIX + PARA_LAYERS[0]
    assert m.rank(l) == 5
    expected = W0.double() - 0.5 * a.U[l].double() @ a.D[l].double() + b.U[l].double() @ b.D[l].double()
    torch.testing.assert_close(reference.reduce_weight(W0, m.U[l], m.D[l]).double(), expected, atol=1e-5, rtol=0)


def test_sum_of_a_merged_reference_file_round_trips(tmp_path):
    m = merge_states([_reference_state(seed=1), _reference_state(seed=2)], [1.0, 1.0], "sum")
    back = load_para(save_para(m, str(tmp_path / "m.safetensors")))
    assert back.kind == "reference" and back.rank(PREFIX + PARA_LAYERS[0]) == 4


@pytest.mark.parametrize("mode", ["union", "sequential"])
def test_union_and_sequential_of_reference_adapters_are_errors_saying_use_sum(mode):
    with pytest.raises(ParaError, match="Use mode 'sum'"):
        merge_states([_reference_state(seed=1), _reference_state(seed=2)], [1.0, 1.0], mode)


def test_mixing_paper_and_reference_adapters_is_an_error_saying_what_to_do():
    with pytest.raises(ParaError, match="Export each to a LoRA"):
        merge_states([make_subject(), _reference_state()], [1.0, 1.0], "sum")


def test_merge_reference_sum_of_one_item_scales_U():
    U, D = reference.merge_sum([(randn(4, 2), randn(2, 3), 2.0)])
    torch.testing.assert_close(U, 2 * randn(4, 2))


# ----------------------------------------------------------------------------- rank cap

@pytest.mark.parametrize("shape, rank, ratio, expected", [
    ((320, 320), 16, 40, 16),         # Linear: never capped by the code
    ((320, 768), 64, 40, 64),
    ((320, 320, 3, 3), 4, 40, 4),     # conv, out >= ratio * r
    ((320, 320, 3, 3), 16, 40, 8),    # conv, out < ratio * r: out // ratio
    ((640, 320, 1, 1), 64, 5, 64),    # conv: min(r, in, out) with in = input channels
    ((640, 32, 1, 1), 64, 5, 32),
    ((32, 16, 3, 3), 4, 40, 1),       # the code would give 0 here; floored at 1
], ids=["linear", "linear-wide", "conv-uncapped", "conv-capped", "conv-in", "conv-in-small", "conv-floor"])
def test_reference_code_rank_cap(shape, rank, ratio, expected):
    assert effective_rank(rank, shape, RankCap.REFERENCE_CODE, ratio) == expected


def test_reference_rank_cap_uses_the_ratio_for_every_layer():
    assert effective_rank(16, (320, 320), RankCap.REFERENCE) == 8
    assert effective_rank(16, (320, 320), RankCap.REFERENCE, ratio=10) == 16
    assert effective_rank(16, (320, 320), RankCap.NONE) == 16


# ----------------------------------------------------------------------------- CLI

@pytest.fixture
def ckpt_and_ref(tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    make_checkpoint(ckpt)
    fp = Checkpoint(ckpt).fingerprint([PREFIX + l for l in PARA_LAYERS])
    ref = tmp_path / "ref.safetensors"
    save_para(_reference_state(fingerprint=fp), str(ref))
    return ckpt, ref


def test_cli_inspect_reports_kind_parameters_and_energy(ckpt_and_ref, capsys):
    ckpt, ref = ckpt_and_ref
    assert main(["inspect", str(ref), "--base", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "reference" and data["base"]["fingerprint_matches"] is True
    assert data["parameters"] == load_para(ref).num_params()
    for entry in data["layers"]:
        assert entry["rank"] == 2 and 0 < entry["energy_removed"]
    assert main(["inspect", str(ref)]) == 0
    assert "kind:       reference" in capsys.readouterr().out


def test_cli_export_lora_and_bake_reproduce_W0_minus_U_D(ckpt_and_ref, tmp_path, capsys):
    ckpt, ref = ckpt_and_ref
    st = load_para(ref)
    lora_path, baked = tmp_path / "lora.safetensors", tmp_path / "baked.safetensors"
    assert main(["export-lora", "--base", str(ckpt), "--para", str(ref), "--strength", "0.5", "-o", str(lora_path)]) == 0
    assert main(["bake", "--base", str(ckpt), "--para", f"{ref}:0.5", "-o", str(baked)]) == 0
    from safetensors.torch import load_file
    lora = load_file(str(lora_path))
    c = Checkpoint(ckpt)
    for l in st.layers:
        W0 = c.weight(l)
        expected = _dense_weight(W0.float(), st.U[l], st.D[l], 0.5)
        ku, kd, _ = lora_keys(l)
        k = lora[ku].shape[1]
        W = W0.float() + (lora[ku].reshape(-1, k) @ lora[kd].reshape(k, -1)).reshape(W0.shape)
        torch.testing.assert_close(W.double(), expected, atol=1e-5, rtol=0)
        eps = torch.finfo(W0.dtype).eps
        torch.testing.assert_close(Checkpoint(baked).weight(l).double(), expected.to(W0.dtype).double(),
                                   atol=eps * expected.abs().max().item() + 1e-6, rtol=0)


def test_cli_merge_sum_of_reference_files_and_union_error(ckpt_and_ref, tmp_path, capsys):
    _, ref = ckpt_and_ref
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--mode", "sum", f"{ref}:0.5", str(ref), "-o", str(out)]) == 0
    assert load_para(out).kind == "reference"
    bad = tmp_path / "u.safetensors"
    assert main(["merge", "--mode", "union", str(ref), str(ref), "-o", str(bad)]) == 1
    assert "Use mode 'sum'" in capsys.readouterr().err and not bad.exists()


def test_kohya_named_reference_files_resolve_to_the_model_layers(tmp_path):
    from para_core import check_fits, kohya_name
    st = _reference_state()
    renamed = reference_state({kohya_name(l): u for l, u in st.U.items()}, {kohya_name(l): d for l, d in st.D.items()},
                              metadata=st.metadata)
    back = load_para(save_para(renamed, str(tmp_path / "kohya.safetensors")))
    fitted = check_fits(back, {PREFIX + l: s for l, s in CKPT_LAYERS.items()})
    assert set(fitted.layers) == set(st.layers)
    for l in st.layers:
        assert torch.equal(fitted.D[l], st.D[l]) and torch.equal(fitted.U[l], st.U[l])


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool], ids=["int32", "bool"])
def test_integer_or_bool_reference_factors_are_refused_like_the_others(tmp_path, dtype):
    """PaRa Load/Loader, Export and resume read files through load_para: the one validator refuses
    what stock Load LoRA refuses (they used to pass it)."""
    l = PREFIX + PARA_LAYERS[0]
    shape = CKPT_LAYERS[PARA_LAYERS[0]]
    path = tmp_path / "ints.safetensors"
    save_file({f"{l}.para_U": torch.ones(shape[0], 2).to(dtype), f"{l}.para_D": torch.ones(2, math.prod(shape[1:])).to(dtype)},
              str(path), metadata={"para.kind": "reference"})
    with pytest.raises(ParaError, match=f"ints.safetensors: {l}.para_U has dtype {dtype}; PaRa tensors are floating point"):
        load_para(path)


def test_a_rank_zero_reference_layer_is_the_base_layer_on_both_sides():
    m = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = randn(1, 4, 6, 6)
    U, D = torch.zeros(8, 0), torch.zeros(0, 36)
    for fwd in (reference.forward_activation_side, reference.forward_weight_side):
        torch.testing.assert_close(fwd(layer_op(m), x, m.weight.detach(), m.bias.detach(), U, D, 1), m(x).detach())
