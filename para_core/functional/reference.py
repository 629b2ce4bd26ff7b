"""The reference code's parametrization (spec section 1b): U and D trained as free parameters.

The authors' training code (CCRobert1997/PaRa, ``trainscripts/lora_controller.py``,
``LoRA_Left_Column_learn_Q_Module``) starts from B0 = 0, takes U0 = QR(B0) (the QR of a zero
matrix: the first r columns of the identity) and D0 = U0^T W0, then trains both:

    y = W0 x + b - U (D x)        W' = W0 - U D        r * (out + in*kh*kw) parameters

At step 0 that is the paper's W0 - Q Q^T W0; after it, a LoRA subtracted from W0 (no QR, no
orthonormality). A weight of any shape with >= 2 dims is the matrix (out, in*kh*kw), so D has
shape (r, in*kh*kw); U has shape (out, r). Strength s gives W0 - s U D, and the exact LoRA is
``lora_up = -s U``, ``lora_down = D``. This is a second kind of adapter beside the paper's
(reduction.py), not a flag on it: it needs no W0 once trained, and several of them only combine
by ``sum`` (concatenating the terms).
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .projection import add_bias, basis

__all__ = [
    "KIND",
    "PARAMETRIZATIONS",
    "DEFAULT_PARAMETRIZATION",
    "REFERENCE_INIT",
    "init_reference",
    "reference_delta",
    "reduce_weight_reference",
    "reference_lora",
    "merge_reference_sum",
    "reference_num_params",
    "reference_state",
    "cheaper_side_reference",
    "forward_reference_weight_side",
    "forward_reference_activation_side",
]

KIND = "reference"
PARAMETRIZATIONS = ("paper", "reference")
DEFAULT_PARAMETRIZATION = "paper"
# The init value that reproduces the authors' code: B0 = 0, so U0 = the first r unit vectors.
REFERENCE_INIT = "reference"


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(f"PaRa adapts weights with >= 2 dims, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def init_reference(weight: torch.Tensor, rank: int, method: str = REFERENCE_INIT,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U0, D0) in float32 on ``weight``'s device: U0 = QR(B0), D0 = U0^T W0.

    ``method == "reference"``: B0 = 0, U0 = the first r columns of the identity, exactly (torch's
    QR of a zero matrix gives the same, with signed zeros); any other value is an init of B
    (train.init_B: kaiming, orthogonal, top-singular, bottom-singular).
    """
    W = _as_matrix(weight).detach().float()
    out = W.shape[0]
    if rank < 1 or rank > min(out, W.shape[1]):
        raise ValueError(f"rank {rank} does not fit a weight of shape {tuple(weight.shape)}")
    if method == REFERENCE_INIT:
        U = torch.eye(out, rank, dtype=torch.float32, device=W.device)
    else:
        from ..train import init_B  # train imports this module's forwards; import here, not at the top
        U = basis(init_B(weight, rank, method, generator)).to(W.device)
    D = U.t() @ W
    return U.contiguous(), D.contiguous()


def reference_delta(weight_shape, U: torch.Tensor, D: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """-s U D in float32, shaped like the weight (its exact low-rank change)."""
    shape = tuple(weight_shape)
    inner = math.prod(shape[1:])
    if U.dim() != 2 or D.dim() != 2 or U.shape[0] != shape[0] or D.shape != (U.shape[1], inner):
        raise ValueError(f"reference factors U {tuple(U.shape)} / D {tuple(D.shape)} do not fit a weight of "
                         f"shape {shape} (U must be (out, r), D (r, {inner}))")
    Dd = D.to(U.device, torch.float32)
    return (U.float() @ Dd).mul_(-float(strength)).reshape(shape)


def reduce_weight_reference(weight: torch.Tensor, U: torch.Tensor, D: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W0 - s U D, computed in float32 and returned in ``weight``'s dtype."""
    delta = reference_delta(weight.shape, U.to(weight.device), D.to(weight.device), strength)
    return (weight.float() + delta).to(weight.dtype)


def reference_lora(U: torch.Tensor, D: torch.Tensor, weight_shape, strength: float = 1.0
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_up, lora_down) with lora_up @ lora_down = -s U D exactly (alpha = rank, scale 1).
    Convs: up (out, r, 1, 1), down (r, in, kh, kw), as LoCon stores them."""
    shape = tuple(weight_shape)
    r = U.shape[1]
    up = -float(strength) * U.float()
    down = D.float()
    if down.shape != (r, math.prod(shape[1:])):
        raise ValueError(f"D {tuple(D.shape)} does not fit a weight of shape {shape}")
    if len(shape) > 2:
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    return up, down


def merge_reference_sum(items: Sequence[Tuple[torch.Tensor, torch.Tensor, float]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """sum_i s_i U_i D_i = [s_1 U_1 ... s_n U_n] [D_1; ...; D_n]: concatenate the terms."""
    U = torch.cat([float(s) * u.float() for u, _, s in items], dim=1)
    D = torch.cat([d.float().to(U.device) for _, d, _ in items], dim=0)
    return U, D


def reference_num_params(U: Mapping[str, torch.Tensor], D: Mapping[str, torch.Tensor]) -> int:
    """r * (out + in*kh*kw) per layer."""
    return sum(t.numel() for t in U.values()) + sum(t.numel() for t in D.values())


def reference_state(U: Mapping[str, torch.Tensor], D: Mapping[str, torch.Tensor],
                    metadata: Optional[Mapping[str, str]] = None, **metadata_fields):
    """A ``reference`` ParaState from {layer: U} and {layer: D} (copied to float32 CPU tensors).

    ``metadata``: ready metadata; otherwise ``metadata_fields`` go to fileformat.build_metadata
    (layers=, base_arch=, base_fingerprint=, train=, title=, ...)."""
    from ..fileformat import ParaError, ParaState, build_metadata

    if set(U) != set(D):
        missing = sorted(set(U) ^ set(D))[0]
        raise ParaError(f"reference adapter: layer {missing} has only one of U and D; every layer needs both.")
    Uc = {l: u.detach().float().cpu().clone() for l, u in U.items()}
    Dc = {l: D[l].detach().float().cpu().clone() for l in U}
    for l in Uc:
        if Uc[l].dim() != 2 or Dc[l].dim() != 2 or Uc[l].shape[1] != Dc[l].shape[0]:
            raise ParaError(f"reference adapter: layer {l}: U {tuple(Uc[l].shape)} and D {tuple(Dc[l].shape)} "
                            "must be (out, r) and (r, in*kh*kw).")
    if metadata is None:
        metadata_fields.setdefault("ranks", {l: int(u.shape[1]) for l, u in Uc.items()})
        md = build_metadata(KIND, **metadata_fields)
    else:
        md = dict(metadata)
    md["para.kind"] = KIND
    return ParaState(kind=KIND, U=Uc, D=Dc, metadata=md)


# ---------------------------------------------------------------- the training-side forward

def cheaper_side_reference(tokens: int, out: int, inner: int, *, rank: int = 1, backward: bool = False) -> str:
    """'activation' when U (D x) costs less than forming W0 - U D.

    Forward only: 2*tokens*r*(inner + out) against 2*out*inner*r (+ the layer, same either way).
    With ``backward`` the weight side also forms the full weight gradient (2*tokens*out*inner)
    and both sides triple their own cost, so the activation side wins for every real layer.
    """
    activation = 2 * tokens * rank * (inner + out)
    weight = 2 * out * inner * rank
    if backward:
        activation, weight = 3 * activation, 3 * weight + 2 * tokens * out * inner
    return "activation" if activation <= weight else "weight"


def forward_reference_weight_side(op, x, W0, bias, U, D, channel_dim: int, strength: float = 1.0):
    """op(x, W0 - s U D) + b. Works for grouped convs too (U D has W0's shape)."""
    Ud, Dd = U.to(W0.dtype), D.to(W0.dtype)
    W = W0 - strength * (Ud @ Dd).reshape(W0.shape)
    return add_bias(op(x, W), bias, channel_dim)


def forward_reference_activation_side(op, x, W0, bias, U, D, channel_dim: int, strength: float = 1.0):
    """op(x, W0) + b - s U (D x): D x is the layer's own op with D as an r-channel weight (a conv
    keeps its stride/padding/dilation), U mixes the r channels back. Not for grouped convs."""
    h = op(x, W0)
    z = op(x, D.to(h.dtype).reshape(D.shape[0], *W0.shape[1:]))
    hm, zm = h.movedim(channel_dim, -1), z.movedim(channel_dim, -1)
    hm = hm - strength * (zm @ U.to(h.dtype).t())
    return add_bias(hm.movedim(-1, channel_dim), bias, channel_dim)
