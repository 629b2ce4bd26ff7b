"""The (U, V) form of PaRa: W' = W0 - s U (V^T W0) (docs/spec.md sections 1 and 2).

A trained subject has U = V = Q = QR(B) (the paper's equation 3, W0 - Q Q^T W0); a merged file
stores U and V. The out x out projector is never formed. The verbs, as in reference.py:
``init_B``, ``delta``, ``reduce_weight``, ``forward_weight_side``, ``project_outputs`` /
``forward_activation_side`` (also ComfyUI's bypass mode), ``cheaper_side``, ``to_lora``,
``check_tensors``.
"""
from __future__ import annotations

import math
import weakref
from typing import Dict, Mapping, Optional, Tuple

import torch

from ..errors import ParaError
from .base import add_bias, as_matrix, check_factor, require_pair

__all__ = ["KINDS", "basis", "basis_cached", "basis_batched", "INIT_METHODS", "DEFAULT_INIT", "init_B", "delta_factors", "delta", "reduce_weight",
           "forward_weight_side", "project_outputs", "forward_activation_side", "cheaper_side", "to_lora",
           "check_tensors"]

KINDS = ("subject", "merged")
INIT_METHODS = ("kaiming", "orthogonal", "top-singular", "bottom-singular", "reference")
# orthogonal: the best of the inits that start from a random subspace, like the paper's, on the
# pack's measurements; its unit-norm columns also make Adam's step the same relative size in every
# layer width (kaiming columns are ~sqrt(out/3r) long, so they turn slower).
DEFAULT_INIT = "orthogonal"


def basis(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q (out, r) of the columns of B, by reduced QR in float32.

    Works on a batch (..., out, r) too. Differentiable (torch.linalg.qr has a backward for
    full-column-rank inputs with out >= r).
    """
    if B.dim() < 2:
        raise ValueError(f"B must have shape (out, r), got {tuple(B.shape)}")
    Q, _ = torch.linalg.qr(B.float(), mode="reduced")
    return Q


_BASES: Dict[tuple, tuple] = {}


def basis_cached(B: torch.Tensor, device) -> torch.Tensor:
    """basis(B) on ``device``, remembered for this tensor while it lives and is not changed in
    place: ComfyUI re-patches a model with the same loaded tensors whenever a strength, a model or
    a sampler's memory plan changes, and each patch would redo every layer's QR. The result is
    shared: read it, never write it. A B that needs grad is never cached (training)."""
    device = torch.device(device)
    try:
        version = B._version  # bumped by every in-place change
    except RuntimeError:  # inference-mode tensors have no version counter
        return basis(B.to(device))
    if B.requires_grad and torch.is_grad_enabled():
        return basis(B.to(device))
    key = (id(B), str(device))
    hit = _BASES.get(key)
    if hit is not None and hit[0]() is B and hit[1] == version:
        return hit[2]
    Q = basis(B.to(device))
    _BASES[key] = (weakref.ref(B, lambda _ref, k=key: _BASES.pop(k, None)), version, Q)
    return Q


def basis_batched(Bs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Q for many layers: layers whose B has the same shape share one batched QR call."""
    groups: Dict[Tuple[Tuple[int, ...], torch.device], list] = {}
    for name, B in Bs.items():
        groups.setdefault((tuple(B.shape), B.device), []).append(name)
    out: Dict[str, torch.Tensor] = {}
    for names in groups.values():
        # unbind: the backward stacks the layers' gradients once (indexing Q[i] would scatter
        # each one into a zero tensor of the whole group)
        out.update(zip(names, basis(torch.stack([Bs[n] for n in names])).unbind(0)))
    return out


def init_B(weight: torch.Tensor, rank: int, method: str = DEFAULT_INIT, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Initial B (out, rank) in float32 on ``weight``'s device.

    - ``kaiming``: kaiming-uniform random columns (kohya/LoRA's init for a down factor; not
      what the reference code starts from, see ``reference``); a random r-dim subspace is removed
      at step 0.
    - ``orthogonal``: random orthonormal columns (same subspace law, better conditioned QR).
    - ``top-singular``: the top-r left singular vectors of W0 (removes the most energy at once;
      aggressive).
    - ``bottom-singular``: the r weakest output directions of W0 (starts closest to the base
      model; the reduction then grows where the data asks).
    - ``reference``: what the authors' code starts from: B0 = 0, whose QR is the first r columns
      of the identity; here B0 = those columns (QR of 0 has no gradient), so Q0 is the same:
      the layer's first r output channels are removed at step 0.
    """
    out = weight.shape[0]
    if method == "kaiming":
        B = torch.empty(out, rank)
        bound = math.sqrt(6.0 / ((1 + 5) * rank))  # kaiming_uniform_(a=sqrt(5)) with fan_in = rank
        B.uniform_(-bound, bound, generator=generator)
    elif method == "orthogonal":
        G = torch.randn(out, rank, generator=generator)
        B = torch.linalg.qr(G, mode="reduced")[0]
    elif method == "reference":
        B = torch.eye(out, rank)
    elif method in ("top-singular", "bottom-singular"):
        W = weight.detach().reshape(out, -1).float().cpu()
        Uw, _, _ = torch.linalg.svd(W, full_matrices=False)
        B = Uw[:, :rank].clone() if method == "top-singular" else Uw[:, -rank:].clone()
        if B.shape[1] < rank:  # fewer singular directions than rank: pad with random ones
            B = torch.cat([B, torch.randn(out, rank - B.shape[1], generator=generator)], 1)
    else:
        raise ValueError(f"unknown B initialisation {method!r}; use one of {', '.join(INIT_METHODS)}")
    return B.to(weight.device)


# ---------------------------------------------------------------- weight side

def delta_factors(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, strength: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (-s U, V^T W0), (out, k) and (k, in*kh*kw) in ``dtype``: the change of the
    weight as a product of two thin factors (the strength scales the small one)."""
    W = as_matrix(weight).to(dtype)
    return U.to(W.device, dtype) * -float(strength), V.to(W.device, dtype).t() @ W


def delta(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, strength: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-s U (V^T W0), shaped like ``weight``: the exact change of the weight, computed in ``dtype``
    (float32 where a weight is patched or written; the training dtype in the trainer's forward)."""
    up, down = delta_factors(weight, U, V, strength, dtype)
    return (up @ down).reshape(weight.shape)


def reduce_weight(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W0 - s U (V^T W0), computed in float32 and returned in ``weight``'s dtype."""
    if U.shape != V.shape or U.shape[0] != weight.shape[0]:
        raise ValueError(
            f"factors of shape {tuple(U.shape)}/{tuple(V.shape)} do not fit a weight of shape {tuple(weight.shape)}")
    return (weight.float() + delta(weight, U, V, strength)).to(weight.dtype)


def forward_weight_side(op, x, W0, bias, U, V, channel_dim: int, strength: float = 1.0):
    """op(x, W0 - s U (V^T W0), b), in W0's dtype (``op``: the layer's op f(x, w, b=None), as layer_op gives)."""
    W = W0 + delta(W0, U, V, strength, W0.dtype)
    return op(x, W) if bias is None else op(x, W, bias.to(W.dtype))


# ---------------------------------------------------------------- activation side

def project_outputs(y: torch.Tensor, U: torch.Tensor, V: torch.Tensor, channel_dim: int, strength: float = 1.0,
                    bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y - s U (V^T (y - b)) along ``channel_dim`` (-1 for Linear outputs, 1 for convs), in ``y``'s dtype.

    For y = W0 x + b this is W' x + b: the projector acts on the output channels only, the bias
    stays (ComfyUI's bypass mode and the trainer's activation side both hand y with its bias).
    Two thin products and one fused multiply-add (addmm / baddbmm) on y's own layout: no
    transposed copy of the activations and no separate pass for the strength or the bias."""
    if U is V and torch.is_grad_enabled() and (U.requires_grad or y.requires_grad) \
            and not (bias is not None and bias.requires_grad) and channel_dim % y.dim() in (1, y.dim() - 1):
        return _SubjectProjection.apply(y, U, bias, channel_dim % y.dim() == 1, float(strength))
    Ud = U.to(y.device, y.dtype) * -float(strength)
    Vd = V.to(y.device, y.dtype)
    vb = None if bias is None else bias.to(y.device, y.dtype) @ Vd  # V^T b, (r,)
    cd = channel_dim % y.dim()
    if cd == y.dim() - 1:  # Linear: (..., C)
        y2 = y.reshape(-1, y.shape[-1])
        t = y2 @ Vd
        return torch.addmm(y2, t if vb is None else t - vb, Ud.t()).reshape(y.shape)
    if cd == 1:  # ConvNd: (N, C, *spatial)
        y3 = y.reshape(y.shape[0], y.shape[1], -1)
        t = Vd.t() @ y3  # (N, r, positions)
        if vb is not None:
            t = t - vb[:, None]
        return torch.baddbmm(y3, Ud.expand(y.shape[0], -1, -1), t).reshape(y.shape)
    h = y if bias is None else add_bias(y, -bias, channel_dim)
    return y + ((h.movedim(channel_dim, -1) @ Vd) @ Ud.t()).movedim(-1, channel_dim)


class _SubjectProjection(torch.autograd.Function):
    """y - s Q (Q^T (y - b)) with its gradients written out, for training (U = V = Q): the same
    numbers as autograd through project_outputs' products, in fewer kernels (it runs once per
    adapted layer and step; at small sizes the launches are the cost) and without autograd's
    h^T @ (.) products (MKL is several times slower with a transposed operand contracted over its
    long dimension). Forward: t = Q^T (y - b) and one fused multiply-add; backward: Q^T g, one
    fused multiply-add for y's gradient, two (r, C) products for Q's. Keeps y and the small t."""

    @staticmethod
    def forward(ctx, y, Q, bias, conv, strength):
        Qd = Q.to(y.device, y.dtype)
        nvb = None if bias is None else -(bias.to(y.device, y.dtype) @ Qd)  # -Q^T b, (r,)
        if conv:  # (N, C, *spatial): channels on dim 1
            h = y.reshape(y.shape[0], y.shape[1], -1)
            Qt = Qd.t().expand(h.shape[0], -1, -1)
            t = torch.bmm(Qt, h) if nvb is None else torch.baddbmm(nvb[:, None], Qt, h)  # (N, r, positions)
            z = torch.baddbmm(h, Qd.expand(h.shape[0], -1, -1), t, alpha=-strength)
        else:  # (..., C)
            h = y.reshape(-1, y.shape[-1])
            t = h @ Qd if nvb is None else torch.addmm(nvb, h, Qd)  # (positions, r)
            z = torch.addmm(h, t, Qd.t(), alpha=-strength)
        ctx.conv, ctx.strength, ctx.q_dtype, ctx.shape = conv, strength, Q.dtype, y.shape
        ctx.save_for_backward(h, t, Qd, bias)
        return z.reshape(y.shape)

    @staticmethod
    def backward(ctx, grad):
        h, t, Qd, bias = ctx.saved_tensors
        s = ctx.strength
        need_y, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g = grad.to(h.dtype).reshape(h.shape)
        gy = gq = None
        # Q's gradient: d/dQ <g, s Q Q^T (y - b)> = s [sum (y - b) (Q^T g)^T + g (Q^T (y - b))^T]
        if ctx.conv:
            N = g.shape[0]
            sg = torch.bmm(Qd.t().expand(N, -1, -1), g)  # Q^T g, (N, r, positions)
            if need_y:
                gy = torch.baddbmm(g, Qd.expand(N, -1, -1), sg, alpha=-s).reshape(ctx.shape)
            if need_q:
                if N == 1:
                    gq = torch.addmm(torch.mm(h[0], sg[0].t()), g[0], t[0].t(), beta=-s, alpha=-s)
                else:
                    gq = torch.baddbmm(torch.bmm(h, sg.transpose(1, 2)), g, t.transpose(1, 2)).sum(0).mul_(-s)
                if bias is not None:
                    gq.addr_(bias.to(gq.dtype), sg.sum((0, 2)), alpha=s)
        else:
            sg = g @ Qd  # (positions, r)
            if need_y:
                gy = torch.addmm(g, sg, Qd.t(), alpha=-s).reshape(ctx.shape)
            if need_q:
                gqt = torch.addmm(sg.t() @ h, t.t(), g, beta=-s, alpha=-s)  # (r, C): see the class doc
                if bias is not None:
                    gqt.addr_(sg.sum(0), bias.to(gqt.dtype), alpha=s)
                gq = gqt.t()
        return gy, None if gq is None else gq.to(ctx.q_dtype), None, None, None


def forward_activation_side(op, x, W0, bias, U, V, channel_dim: int, strength: float = 1.0):
    """op(x, W0) + b - s U (V^T op(x, W0)): the same output as forward_weight_side, from the
    layer's own op (its kernel, its dtype, the bias fused in when ``op`` takes it as
    f(x, w, b), as layer_op's ops do). Grouped convs work only on this side."""
    if bias is None:
        return project_outputs(op(x, W0), U, V, channel_dim, strength)
    return project_outputs(op(x, W0, bias.to(x.dtype)), U, V, channel_dim, strength, bias)


def cheaper_side(tokens: int, inner: int, *, rank: int = 1, backward: bool = False) -> str:
    """'activation' when projecting the outputs costs less than projecting the weight.

    Forward only: the weight side costs ~4 * out * inner * r flops (independent of the tokens),
    the activation side ~4 * tokens * out * r, so it wins when the layer sees fewer output
    positions (tokens, batch included) than its fan-in ``inner`` = in * kh * kw. With a backward
    pass (training B) the weight side also forms the full weight gradient g^T x (~2 * tokens *
    out * inner, as much as the layer's own forward) and both sides triple their projection cost;
    then the activation side wins whenever inner > 6 r, i.e. for every real layer.
    """
    if not backward:
        return "activation" if tokens < inner else "weight"
    activation = 12 * tokens * rank
    weight = 2 * tokens * inner + 12 * inner * rank
    return "activation" if activation <= weight else "weight"


# ---------------------------------------------------------------- LoRA, checks

def to_lora(W0: torch.Tensor, U: torch.Tensor, V: torch.Tensor, strength: float = 1.0
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_up, lora_down) in float32 with lora_up @ lora_down = -s U (V^T W0) exactly (alpha = rank,
    scale 1): up = -s U (out, k), down = V^T W0 (k, in*kh*kw); convs up (out, k, 1, 1), down
    (k, in, kh, kw), as LoCon stores them."""
    k = U.shape[1]
    up, down = delta_factors(W0, U, V, strength)
    if W0.dim() > 2:
        up = up.reshape(up.shape[0], k, *([1] * (W0.dim() - 2)))
        down = down.reshape(k, *W0.shape[1:])
    return up, down


def check_tensors(where: str, layer: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A subject layer ({"para_B": B}, B of shape (out, r)) or a merged one ({"para_U": U,
    "para_V": V}, both (out, k)) as stored in ``where``: complete, 2-D, floating point, finite.
    Returns the tensors to use (float8 ones upcast)."""
    if "para_B" in tensors:
        return {"para_B": check_factor(where, layer, "para_B", tensors["para_B"], "(out, rank)")}
    require_pair(where, layer, ("para_U", tensors.get("para_U")), ("para_V", tensors.get("para_V")), "merged")
    U = check_factor(where, layer, "para_U", tensors["para_U"], "(out, rank)")
    V = check_factor(where, layer, "para_V", tensors["para_V"], "(out, rank)")
    if U.shape != V.shape:
        raise ParaError(f"{where}: layer {layer}: para_U {tuple(U.shape)} and para_V {tuple(V.shape)} differ in shape.")
    return {"para_U": U, "para_V": V}
