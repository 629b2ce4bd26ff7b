"""The (U, V) form W' = W0 - s U (V^T W0), a subject's U = V = QR(B), against a dense reference
(docs/spec.md section 1)."""
import pytest
import torch
import torch.nn.functional as F

from core_helpers import dense_projector, dense_reduce, randn
from para_core import ParaError, RankCap, basis, basis_batched, effective_rank
from para_core.functional import projection


def reduce_weight(W0, B, strength=1.0):
    """The paper's W0 - s Q (Q^T W0), Q = QR(B)."""
    Q = basis(B)
    return projection.reduce_weight(W0, Q, Q, strength)

SHAPES = {"linear": (48, 40), "conv3x3": (48, 8, 3, 3), "conv1x1": (48, 24, 1, 1)}
# Tolerance of the result relative to max|W0|: float32 arithmetic, or one rounding to the dtype.
TOL = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}


def _matrix(t):
    return t.reshape(t.shape[0], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_reduce_weight_matches_dense_projector(kind, dtype, strength):
    W0 = randn(*SHAPES[kind], seed=0, dtype=dtype)
    B = randn(SHAPES[kind][0], 4, seed=1)
    out = reduce_weight(W0, B, strength)
    assert out.dtype == dtype and out.shape == W0.shape
    ref = dense_reduce(W0, B, strength)
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * W0.double().abs().max().item()


def test_basis_is_orthonormal_and_spans_B():
    B = randn(30, 5, seed=2)
    Q = basis(B)
    assert Q.dtype == torch.float32 and Q.shape == (30, 5)
    torch.testing.assert_close(Q.t() @ Q, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close((Q @ Q.t()).double(), dense_projector(B), atol=1e-5, rtol=0)


def test_basis_of_half_precision_B_runs_in_float32():
    assert basis(randn(30, 5, seed=2, dtype=torch.float16)).dtype == torch.float32


@pytest.mark.parametrize("shape", [(40, 64), (40, 8, 3, 3)], ids=["linear", "conv"])
def test_rank_drops_by_r_for_full_row_rank_weight(shape):
    W0 = randn(*shape, seed=3)
    r = 6
    W = reduce_weight(W0, randn(shape[0], r, seed=4))
    rank0 = torch.linalg.matrix_rank(_matrix(W0)).item()
    assert rank0 == shape[0]
    assert torch.linalg.matrix_rank(_matrix(W)).item() == rank0 - r


def test_rank_drops_by_r_for_low_rank_weight_when_B_lies_in_its_column_space():
    # rank(W0) = 10 < out: the r removed directions must lie in col(W0) to lower the rank by r.
    W0 = randn(40, 10, seed=5) @ randn(10, 64, seed=6)
    B = W0 @ randn(64, 3, seed=7)
    W = reduce_weight(W0, B)
    assert torch.linalg.matrix_rank(W).item() == 10 - 3


def test_rank_of_a_tall_weight_drops_only_below_out_minus_r():
    # out > in: col(W0) misses a random r-dim subspace, so rank(W') = min(rank W0, out - r).
    W0 = randn(40, 16, seed=26)
    assert torch.linalg.matrix_rank(reduce_weight(W0, randn(40, 6, seed=27))).item() == 16
    assert torch.linalg.matrix_rank(reduce_weight(W0, randn(40, 30, seed=28))).item() == 10


def test_projection_is_idempotent_at_strength_one():
    W0 = randn(48, 40, seed=8)
    B = randn(48, 5, seed=9)
    once = reduce_weight(W0, B)
    torch.testing.assert_close(reduce_weight(once, B), once, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_strength_zero_is_the_base_weight(dtype):
    W0 = randn(48, 8, 3, 3, seed=10, dtype=dtype)
    assert torch.equal(reduce_weight(W0, randn(48, 4, seed=11), 0.0), W0)


def test_strength_two_is_a_norm_preserving_reflection():
    W0 = randn(48, 40, seed=12)
    B = randn(48, 5, seed=13)
    W2 = reduce_weight(W0, B, 2.0)
    # I - 2 Q Q^T is orthogonal: every column keeps its norm, and reflecting twice gives W0 back.
    torch.testing.assert_close(W2.norm(dim=0), W0.norm(dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reduce_weight(W2, B, 2.0), W0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_is_the_change_of_the_weight(dtype):
    W0 = randn(48, 8, 3, 3, seed=14)
    Q = basis(randn(48, 4, seed=15))
    delta = projection.delta(W0, Q, Q, 0.6, dtype)
    assert delta.dtype == dtype and delta.shape == W0.shape
    torch.testing.assert_close((W0 + delta.float()).double(), dense_reduce(W0, Q, 0.6),
                               atol=1e-5 if dtype == torch.float32 else 5e-2, rtol=0)


def test_general_form_with_U_V_matches_dense_formula():
    W0 = randn(24, 30, seed=16)
    U, V = randn(24, 3, seed=17), randn(24, 3, seed=18)
    ref = W0.double() - 0.7 * U.double() @ (V.double().t() @ W0.double())
    torch.testing.assert_close(projection.reduce_weight(W0, U, V, 0.7).double(), ref, atol=1e-5, rtol=0)


def test_factors_that_do_not_fit_the_weight_are_rejected():
    with pytest.raises(ValueError, match="do not fit"):
        projection.reduce_weight(randn(24, 30), randn(20, 3), randn(20, 3))


def test_one_dimensional_weights_are_never_adapted():
    with pytest.raises(ValueError, match=">= 2 dims"):
        reduce_weight(torch.ones(32), randn(32, 2))


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_activation_side_equals_the_reduced_weight(strength):
    """h - s U (V^T h) with h = W0 x is (W0 - s U (V^T W0)) x: the projector acts on the outputs only."""
    W0 = randn(48, 40, seed=19)
    U, V = randn(48, 4, seed=20), randn(48, 4, seed=22)
    x = randn(7, 40, seed=21)
    got = projection.forward_activation_side(F.linear, x, W0, None, U, V, -1, strength)
    torch.testing.assert_close(got, F.linear(x, projection.reduce_weight(W0, U, V, strength)), atol=1e-4, rtol=0)
    b = randn(48, seed=23)
    with_bias = projection.forward_activation_side(F.linear, x, W0, b, U, V, -1, strength)
    torch.testing.assert_close(with_bias, F.linear(x, projection.reduce_weight(W0, U, V, strength), b), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_projected_conv_outputs_equal_the_reduced_conv(dim, bias):
    """The activation side of a ConvNd (the bias fused into the conv, V^T b taken back out) is
    the conv with W' = W0 - s U (V^T W0) plus its bias, for every spatial rank."""
    conv = [torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d][dim - 1](6, 10, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(randn(*conv.weight.shape, seed=30))
        if bias:
            conv.bias.copy_(randn(10, seed=31))
    U, V = randn(10, 3, seed=32), randn(10, 3, seed=33)
    x = randn(2, 6, *([5] * dim), seed=34)
    from para_core.functional.base import layer_op
    got = projection.forward_activation_side(layer_op(conv), x, conv.weight, conv.bias, U, V, 1, 0.7)
    want = conv._conv_forward(x, projection.reduce_weight(conv.weight.detach(), U, V, 0.7), conv.bias)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------- rank caps

def test_reference_cap_gives_a_320_wide_layer_at_most_8():
    assert effective_rank(16, (320, 320)) == 8
    assert effective_rank(16, (320, 320, 3, 3), RankCap.REFERENCE) == 8


def test_reference_cap_keeps_ranks_that_fit_and_floors_narrow_layers_at_one():
    assert effective_rank(4, (320, 320)) == 4
    assert effective_rank(16, (1280, 1280)) == 16
    assert effective_rank(4, (20, 20)) == 1


def test_no_cap_only_limits_to_the_matrix_size():
    assert effective_rank(16, (320, 320), RankCap.NONE) == 16
    assert effective_rank(16, (8, 4, 1, 1), RankCap.NONE) == 4
    assert effective_rank(16, (320, 2, 3, 3), RankCap.NONE) == 16


def test_bad_rank_or_cap_is_an_error():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        effective_rank(0, (320, 320))
    with pytest.raises(ValueError, match="unknown rank cap"):
        effective_rank(4, (320, 320), "paper")


def test_basis_batched_equals_per_layer_qr():
    Bs = {"a": randn(32, 4, seed=22), "b": randn(32, 4, seed=23), "c": randn(64, 2, seed=24), "d": randn(32, 4, seed=25)}
    Qs = basis_batched(Bs)
    assert set(Qs) == set(Bs)
    for name, B in Bs.items():
        torch.testing.assert_close(Qs[name], basis(B), atol=1e-6, rtol=0)


def test_basis_cached_reuses_the_qr_of_an_unchanged_tensor_only():
    B = randn(32, 4, seed=26)
    Q = projection.basis_cached(B, "cpu")
    torch.testing.assert_close(Q, basis(B), atol=0, rtol=0)
    assert projection.basis_cached(B, "cpu") is Q                      # a second patch: no new QR
    assert projection.basis_cached(B.clone(), "cpu") is not Q          # another tensor (another load)
    B.mul_(-1.0).add_(randn(32, 4, seed=27))                            # changed in place: recomputed
    Q2 = projection.basis_cached(B, "cpu")
    assert Q2 is not Q
    torch.testing.assert_close(Q2, basis(B), atol=0, rtol=0)
    P = torch.nn.Parameter(randn(32, 4, seed=28))                       # being trained: never cached
    assert projection.basis_cached(P, "cpu").requires_grad
    assert projection.basis_cached(P, "cpu") is not projection.basis_cached(P, "cpu")
    n = len(projection._BASES)
    del B, Q, Q2
    import gc
    gc.collect()
    assert len(projection._BASES) < n                                   # dropped with its tensor


# ---------------------------------------------------------------- patching: W += up @ down, never non-finite

def _thin(out=24, inner=18, k=3, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inner, generator=g), scale * torch.randn(out, k, generator=g), scale * torch.randn(k, inner, generator=g)


@pytest.mark.parametrize("strength", [1.0, -1.0, 0.35, 2.0])
def test_delta_factors_multiply_to_the_dense_change(strength):
    W, B, _ = _thin()
    Q = basis(B)
    up, down = projection.delta_factors(W.reshape(24, 2, 3, 3), Q, Q, strength)
    assert up.shape == (24, 3) and down.shape == (3, 18)
    dense = -strength * (Q @ Q.t() @ W)
    torch.testing.assert_close(up @ down, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(projection.delta(W, Q, Q, strength), dense, rtol=1e-5, atol=1e-6)


def test_add_product_is_the_plain_sum_when_the_change_is_small():
    from para_core.functional.base import add_product_
    W, up, down = _thin()
    want = W + up @ down
    got = add_product_(W.clone(), up, down, lambda a: a, "dog.safetensors", "the patched weight x")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    conv = W.reshape(24, 2, 3, 3)
    torch.testing.assert_close(add_product_(conv.clone(), up, down), want.reshape(conv.shape), rtol=0, atol=0)


def test_add_product_applies_a_custom_weight_function():
    from para_core.functional.base import add_product_
    W, up, down = _thin()
    got = add_product_(W.clone(), up, down, lambda a: 2 * a)
    torch.testing.assert_close(got, W + 2 * (up @ down), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["huge_up", "huge_down", "nan_up", "inf_down"])
def test_add_product_never_leaves_a_non_finite_weight(case):
    """Finite factors can overflow in the product (3e38 * 3e38); NaN/Inf factors poison it."""
    from para_core.functional.base import add_product_
    W, up, down = _thin()
    if case == "huge_up":
        up, down = torch.full_like(up, 3e38), torch.full_like(down, 10.0)
    elif case == "huge_down":
        up, down = torch.full_like(up, 1e20), torch.full_like(down, 1e20)
    elif case == "nan_up":
        up[1, 1] = float("nan")
    else:
        down[0, 2] = float("inf")
    with pytest.raises(ParaError, match="dog.safetensors: the patched weight x .*not finite|NaN or Inf"):
        add_product_(W.clone(), up, down, lambda a: a, "dog.safetensors", "the patched weight x")


def test_add_product_checks_the_whole_result_when_a_custom_function_could_overflow():
    """A small change is safe only with the identity function: anything else is checked in full."""
    from para_core.functional.base import add_product_
    W, up, down = _thin()
    with pytest.raises(ParaError, match="not finite|NaN or Inf"):
        add_product_(W.clone(), up, down, lambda a: a * float("inf"), "dog.safetensors", "the patched weight x")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_change_within_the_safe_bound_never_overflows_the_storage_format(dtype):
    """The fast path's promise: W0 finite in its format, every |change| < SAFE_CHANGE, ComfyUI's cast
    back to that format is finite (the largest finite values are the worst case)."""
    from para_core.functional.base import SAFE_CHANGE, add_product_
    big = torch.finfo(dtype).max
    W = torch.full((4, 4), big, dtype=dtype).float()
    W[1] = -big
    up = torch.zeros(4, 1)
    up[:, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0]) * (SAFE_CHANGE * 0.999)
    down = torch.ones(1, 4)
    out = add_product_(W, up, down, lambda a: a)
    assert torch.isfinite(out.to(dtype)).all()
    assert (out.to(dtype) != 0).all()
