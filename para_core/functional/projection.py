"""The PaRa reduction (paper eq. 3): W' = W0 - s * Q (Q^T W0), Q = QR(B).

Everything here works on plain tensors. A weight of any shape with >= 2 dims is treated as the
matrix (out, in*k*k); the out x out projector Q Q^T is never formed.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

__all__ = [
    "RankCap",
    "effective_rank",
    "basis",
    "basis_batched",
    "reduce_weight",
    "reduce_weight_general",
    "reduction_delta",
    "reduce_activation",
    "add_bias",
]


class RankCap:
    """How the requested rank is capped per layer.

    ``reference`` (default; the pack's reading of the paper's code): every layer (Linear and
    conv) whose output width is below ratio*r gets r = out // ratio, floored at 1 so narrow layers
    stay adapted. ``reference-code``: exactly what the authors' code does
    (``LoRA_Left_Column_learn_Q_Module``, ``--loraRatio``): Linear layers (2-D weights) are never
    capped; convs get min(r, out // ratio, in, out) when out < ratio*r, else min(r, in, out)
    (``in`` = the conv's input channels), also floored at 1 where the code would build a
    rank-0 conv. ``none`` only caps at what the matrix allows, min(out, in*k*k); every rule
    stays within that. ratio defaults to 40 (the code's default).
    """

    REFERENCE = "reference"
    REFERENCE_CODE = "reference-code"
    NONE = "none"
    MODES = (REFERENCE, REFERENCE_CODE, NONE)
    DEFAULT_RATIO = 40


def effective_rank(rank: int, weight_shape: Tuple[int, ...] | torch.Size, cap: str = RankCap.REFERENCE,
                   ratio: int = RankCap.DEFAULT_RATIO) -> int:
    """The rank a layer of ``weight_shape`` actually gets for a requested ``rank``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if cap not in RankCap.MODES:
        raise ValueError(f"unknown rank cap {cap!r}; use one of {', '.join(RankCap.MODES)}")
    if ratio < 1:
        raise ValueError(f"rank ratio must be >= 1, got {ratio}")
    out = int(weight_shape[0])
    inner = int(math.prod(weight_shape[1:]))
    r = min(rank, out, inner)
    if cap == RankCap.REFERENCE and out < ratio * rank:
        r = min(r, max(1, out // ratio))
    elif cap == RankCap.REFERENCE_CODE and len(weight_shape) > 2:
        code = rank if out >= ratio * rank else out // ratio
        r = min(r, max(1, min(code, int(weight_shape[1]), out)))
    return r


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(f"PaRa adapts weights with >= 2 dims, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def basis(B: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis Q (out, r) of the columns of B, by reduced QR in float32.

    Works on a batch (..., out, r) too. Differentiable (torch.linalg.qr has a backward for
    full-column-rank inputs with out >= r).
    """
    if B.dim() < 2:
        raise ValueError(f"B must have shape (out, r), got {tuple(B.shape)}")
    Q, _ = torch.linalg.qr(B.float(), mode="reduced")
    return Q


def basis_batched(Bs: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Q for many layers: layers whose B has the same shape share one batched QR call."""
    groups: Dict[Tuple[Tuple[int, ...], torch.device], list] = {}
    for name, B in Bs.items():
        groups.setdefault((tuple(B.shape), B.device), []).append(name)
    out: Dict[str, torch.Tensor] = {}
    for _, names in groups.items():
        Q = basis(torch.stack([Bs[n] for n in names]))
        for i, n in enumerate(names):
            out[n] = Q[i]
    return out


def reduction_delta(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """-U (V^T W0) in float32, shaped like ``weight`` (the low-rank change of the weight)."""
    W = _as_matrix(weight).float()
    return (-(U.float() @ (V.float().t() @ W))).reshape(weight.shape)


def reduce_weight_general(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W0 - s * U (V^T W0), computed in float32 and returned in ``weight``'s dtype.

    This is the general form every PaRa file reduces to (spec section 1): a subject has
    U = V = Q; merged files store U and V.
    """
    if U.shape != V.shape or U.shape[0] != weight.shape[0]:
        raise ValueError(
            f"factors of shape {tuple(U.shape)}/{tuple(V.shape)} do not fit a weight of shape {tuple(weight.shape)}"
        )
    W = _as_matrix(weight).float()
    out = W - strength * (U.float() @ (V.float().t() @ W))
    return out.reshape(weight.shape).to(weight.dtype)


def reduce_weight(weight: torch.Tensor, B: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W0 - s * Q (Q^T W0) with Q = QR(B) (the paper's update)."""
    Q = basis(B).to(weight.device)
    return reduce_weight_general(weight, Q, Q, strength)


def reduce_activation(h: torch.Tensor, Q: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """h - Q (Q^T h) along ``channel_dim``: the activation-side form of the reduction.

    For y = W0 x (bias excluded) this equals (W0 - Q Q^T W0) x, because the projector acts on
    the output channels only. Costs O(tokens * out * r) instead of O(out * in*k*k * r).
    """
    Qd = Q.to(h.dtype)
    hm = h.movedim(channel_dim, -1)
    hm = hm - (hm @ Qd) @ Qd.t()
    return hm.movedim(-1, channel_dim)


def add_bias(y: torch.Tensor, bias: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    """y + b along ``channel_dim`` (the layer's bias, added after the reduced op: spec section 1)."""
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.to(y.dtype).reshape(shape)
