"""The training forward: weight side == activation side == F(x; W0 - Q Q^T W0) + b, gradients on B only."""
import pytest
import torch
import torch.nn.functional as F

from core_helpers import dense_projector, dense_reduce, generator, randn
from para_core import RankCap, basis
from para_core.train import (INIT_METHODS, ParaLayer, cheaper_side, forward_activation_side, forward_weight_side,
                             init_B, layer_op)


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(40, 48, bias=True)


def _conv(seed=0, groups=1):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(8, 48, 3, stride=2, padding=1, bias=True, groups=groups)


def _dense_forward(module, x, B):
    """F(x; (I - P) W0) + b in float64, with P formed explicitly."""
    W = dense_reduce(module.weight.detach(), B.detach())
    if isinstance(module, torch.nn.Linear):
        return F.linear(x.double(), W, module.bias.double())
    return F.conv2d(x.double(), W, module.bias.double(), module.stride, module.padding)


CASES = {"linear": (_linear, (2, 5, 40)), "conv": (_conv, (2, 8, 9, 9))}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("side", ["weight", "activation"])
def test_both_sides_equal_the_dense_reference(kind, side):
    make, xshape = CASES[kind]
    layer = ParaLayer(make(), rank=4, cap=RankCap.NONE, side=side, generator=generator(1))
    x = randn(*xshape, seed=2)
    y = layer(x)
    assert layer.last_side == side
    torch.testing.assert_close(y.double(), _dense_forward(layer.base, x, layer.B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_weight_side_equals_activation_side(kind):
    make, xshape = CASES[kind]
    module = make()
    x = randn(*xshape, seed=3)
    Q = basis(randn(48, 4, seed=4))
    op, cd = layer_op(module), (-1 if kind == "linear" else 1)
    a = forward_weight_side(op, x, module.weight, module.bias, Q, cd, strength=0.7)
    b = forward_activation_side(op, x, module.weight, module.bias, Q, cd, strength=0.7)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("side", ["weight", "activation"])
def test_gradient_reaches_only_B(kind, side):
    make, xshape = CASES[kind]
    layer = ParaLayer(make(), rank=4, cap=RankCap.NONE, side=side, generator=generator(5))
    layer(randn(*xshape, seed=6)).square().sum().backward()
    assert layer.base.weight.grad is None and layer.base.bias.grad is None
    assert layer.B.grad is not None and layer.B.grad.abs().sum() > 0
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["B"]


def test_bias_is_untouched():
    module = _linear()
    bias = module.bias.detach().clone()
    layer = ParaLayer(module, rank=4, cap=RankCap.NONE, generator=generator(7))
    x = torch.zeros(3, 40)
    torch.testing.assert_close(layer(x), bias.expand(3, 48))  # W' 0 + b = b
    assert torch.equal(module.bias, bias)


def test_base_weight_is_not_modified():
    module = _conv()
    W0 = module.weight.detach().clone()
    layer = ParaLayer(module, rank=4, cap=RankCap.NONE, side="weight", generator=generator(8))
    layer(randn(2, 8, 9, 9)).sum().backward()
    assert torch.equal(module.weight, W0)


def test_rank_follows_the_reference_cap_by_default():
    assert ParaLayer(_linear(), rank=4).rank == 1  # 48 < 40*4: 48 // 40
    assert ParaLayer(_linear(), rank=4, cap=RankCap.NONE).rank == 4


def test_auto_side_picks_the_cheaper_one_for_inference():
    layer = ParaLayer(_linear(), rank=2, cap=RankCap.NONE, side="auto")
    with torch.no_grad():
        layer(randn(1, 5, 40))  # 5 tokens < 40 inputs
        assert layer.last_side == "activation"
        layer(randn(4, 50, 40))
        assert layer.last_side == "weight"
    assert cheaper_side(10, 100) == "activation" and cheaper_side(100, 10) == "weight"


def test_grouped_conv_uses_the_activation_side_and_reduces_the_outputs():
    module = _conv(groups=2)
    layer = ParaLayer(module, rank=3, cap=RankCap.NONE, side="weight", generator=generator(9))
    x = randn(2, 8, 9, 9, seed=10)
    y = layer(x)
    assert layer.last_side == "activation"
    h = F.conv2d(x.double(), module.weight.double(), None, 2, 1, 1, 2)
    P = dense_projector(layer.B.detach())
    ref = torch.einsum("oc,bchw->bohw", torch.eye(48, dtype=torch.float64) - P, h) + module.bias.double()[:, None, None]
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", INIT_METHODS)
def test_init_B_shapes_and_dtype(method):
    B = init_B(_conv().weight, 4, method, generator(11))
    assert B.shape == (48, 4) and B.dtype == torch.float32 and torch.isfinite(B).all()


def test_top_singular_init_removes_the_top_singular_directions():
    W0 = _linear().weight.detach()
    B = init_B(W0, 3, "top-singular")
    S0 = torch.linalg.svdvals(W0)
    S1 = torch.linalg.svdvals(dense_reduce(W0, B).float())
    # (48, 40): 40 singular values; the top 3 go to zero, the others stay.
    torch.testing.assert_close(S1[:37], S0[3:], atol=1e-5, rtol=0)
    assert S1[37:].max() < 1e-5


def test_unknown_init_is_an_error():
    with pytest.raises(ValueError, match="unknown B initialisation"):
        init_B(_linear().weight, 2, "zeros")


def test_layer_op_rejects_other_modules():
    with pytest.raises(TypeError, match="Linear and Conv"):
        layer_op(torch.nn.LayerNorm(4))
