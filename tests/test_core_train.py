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


def _dense_projected(y, B, channel_dim, strength, bias):
    """y - s P (y - b) along channel_dim, P = Q Q^T formed explicitly (float64)."""
    P = dense_projector(B)
    h = y.double().movedim(channel_dim, -1)
    b = 0 if bias is None else bias.double()
    return (h - strength * (h - b) @ P.t()).movedim(-1, channel_dim)


@pytest.mark.parametrize("shape,channel_dim", [((2, 12, 5, 3), 1), ((1, 12, 7), 1), ((3, 4, 12), -1), ((6, 12), -1)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_training_projection_gradients_equal_the_dense_reference(shape, channel_dim, with_bias, strength):
    """The trainer's y - s Q (Q^T (y - b)) has its backward written out (projection._SubjectProjection):
    its output and the gradients for y and for B (through the QR) equal autograd through the dense
    projector, for conv and Linear layouts, batches, a bias and a strength."""
    from para_core.functional.projection import project_outputs
    C = shape[channel_dim]
    y = randn(*shape, seed=40, dtype=torch.float64).requires_grad_(True)
    B = randn(C, 3, seed=41, dtype=torch.float64).requires_grad_(True)
    bias = randn(C, seed=42, dtype=torch.float64) if with_bias else None
    g = randn(*shape, seed=43, dtype=torch.float64)
    Q = torch.linalg.qr(B)[0]  # float64 (basis() works in float32)
    got = project_outputs(y, Q, Q, channel_dim, strength, bias)
    assert type(got.grad_fn).__name__ == "_SubjectProjectionBackward"  # the written-out path, not autograd's
    gy, gB = torch.autograd.grad(got, (y, B), g)
    want = _dense_projected(y, B, channel_dim, strength, bias)
    wy, wB = torch.autograd.grad(want, (y, B), g)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(gy, wy, atol=1e-12, rtol=0)
    torch.testing.assert_close(gB, wB, atol=1e-10, rtol=0)
    torch.autograd.gradcheck(lambda y, Q: project_outputs(y, Q, Q, channel_dim, strength, bias),
                             (y.detach().requires_grad_(True), Q.detach().requires_grad_(True)))


def test_training_projection_in_float32_matches_autograd_and_keeps_dtypes():
    """In the training dtype (float32 here; bf16/fp16 under autocast on a GPU) the written-out
    backward gives autograd's numbers to rounding, and Q's gradient comes back in Q's dtype."""
    from para_core.functional.projection import project_outputs
    module = _frozen(_conv())
    B = torch.nn.Parameter(init_B(module.weight, 4, "orthogonal", generator(44)))
    x = randn(2, 8, 9, 9, seed=45)
    g = randn(2, 48, 5, 5, seed=46)
    y = F.conv2d(x, module.weight, module.bias, 2, 1)
    Q, Q2 = basis(B), basis(B)
    fused = project_outputs(y, Q, Q, 1, 1.0, module.bias)
    plain = project_outputs(y, Q2, Q2.view_as(Q2), 1, 1.0, module.bias)  # U is not V: autograd's products
    assert type(plain.grad_fn).__name__ != "_SubjectProjectionBackward"
    (a,) = torch.autograd.grad(fused, B, g)
    (b,) = torch.autograd.grad(plain, B, g)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert a.dtype == torch.float32
    with torch.no_grad():  # sampling: no autograd Function, the plain products
        assert project_outputs(y, Q, Q, 1, 1.0, module.bias).grad_fn is None
