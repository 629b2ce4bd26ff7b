"""The training forward of the (U, V) form: weight side == activation side == F(x; W0 - Q Q^T W0) + b,
gradients on B only (functional/projection.py's forwards, which the PaRa Trainer's layers run)."""
import pytest
import torch
import torch.nn.functional as F

from core_helpers import dense_projector, dense_reduce, generator, randn
from para_core import RankCap, basis, effective_rank
from para_core.functional.base import layer_op
from para_core.functional.projection import (INIT_METHODS, cheaper_side, forward_activation_side, forward_weight_side,
                                             init_B)

SIDES = {"weight": forward_weight_side, "activation": forward_activation_side}


def _linear(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(40, 48, bias=True)


def _conv(seed=0, groups=1):
    torch.manual_seed(seed)
    return torch.nn.Conv2d(8, 48, 3, stride=2, padding=1, bias=True, groups=groups)


def _frozen(module):
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _run(module, x, B, side, strength=1.0):
    """A frozen layer's output with a trainable B, as the PaRa Trainer computes it."""
    Q = basis(B)
    cd = -1 if isinstance(module, torch.nn.Linear) else 1
    return SIDES[side](layer_op(module), x, module.weight, module.bias, Q, Q, cd, strength)


def _dense_forward(module, x, B):
    """F(x; (I - P) W0) + b in float64, with P formed explicitly."""
    W = dense_reduce(module.weight.detach(), B.detach())
    if isinstance(module, torch.nn.Linear):
        return F.linear(x.double(), W, module.bias.double())
    return F.conv2d(x.double(), W, module.bias.double(), module.stride, module.padding)


CASES = {"linear": (_linear, (2, 5, 40)), "conv": (_conv, (2, 8, 9, 9))}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("side", list(SIDES))
def test_both_sides_equal_the_dense_reference(kind, side):
    make, xshape = CASES[kind]
    module = _frozen(make())
    B = init_B(module.weight, 4, "orthogonal", generator(1))
    x = randn(*xshape, seed=2)
    torch.testing.assert_close(_run(module, x, B, side).double(), _dense_forward(module, x, B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
def test_weight_side_equals_activation_side(kind):
    make, xshape = CASES[kind]
    module = make()
    x = randn(*xshape, seed=3)
    B = randn(48, 4, seed=4)
    a, b = _run(module, x, B, "weight", 0.7), _run(module, x, B, "activation", 0.7)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("side", list(SIDES))
def test_gradient_reaches_only_B(kind, side):
    make, xshape = CASES[kind]
    module = _frozen(make())
    B = torch.nn.Parameter(init_B(module.weight, 4, "orthogonal", generator(5)))
    _run(module, randn(*xshape, seed=6), B, side).square().sum().backward()
    assert module.weight.grad is None and module.bias.grad is None
    assert B.grad is not None and B.grad.abs().sum() > 0


@pytest.mark.parametrize("side", list(SIDES))
def test_bias_is_untouched(side):
    module = _frozen(_linear())
    bias = module.bias.detach().clone()
    x = torch.zeros(3, 40)
    torch.testing.assert_close(_run(module, x, randn(48, 4, seed=7), side), bias.expand(3, 48))  # W' 0 + b = b
    assert torch.equal(module.bias, bias)


def test_base_weight_is_not_modified():
    module = _frozen(_conv())
    W0 = module.weight.detach().clone()
    B = torch.nn.Parameter(randn(48, 4, seed=8))
    _run(module, randn(2, 8, 9, 9), B, "weight").sum().backward()
    assert torch.equal(module.weight, W0)


def test_rank_follows_the_reference_cap_by_default():
    assert effective_rank(4, _linear().weight.shape) == 1  # 48 < 40*4: 48 // 40
    assert effective_rank(4, _linear().weight.shape, RankCap.NONE) == 4


def test_cheaper_side_for_inference_and_for_training():
    assert cheaper_side(5, 40) == "activation" and cheaper_side(200, 40) == "weight"
    assert cheaper_side(10, 100) == "activation" and cheaper_side(100, 10) == "weight"
    # training B: the weight side also forms the full weight gradient, so outputs win once inner > 6 r
    assert cheaper_side(10_000, 40, rank=4, backward=True) == "activation"
    assert cheaper_side(10_000, 20, rank=4, backward=True) == "weight"


def test_grouped_conv_reduces_the_outputs_on_the_activation_side():
    module = _frozen(_conv(groups=2))
    B = randn(48, 3, seed=9)
    x = randn(2, 8, 9, 9, seed=10)
    y = _run(module, x, B, "activation")
    h = F.conv2d(x.double(), module.weight.double(), None, 2, 1, 1, 2)
    P = dense_projector(B)
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
