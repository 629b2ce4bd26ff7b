"""The (U, D) form: the reference code's parametrization (docs/spec.md section 1b).

The authors' training code (CCRobert1997/PaRa, ``trainscripts/lora_controller.py``,
``LoRA_Left_Column_learn_Q_Module``) starts from B0 = 0, takes U0 = QR(B0) (the QR of a zero
matrix: the first r columns of the identity) and D0 = U0^T W0, then trains both:

    y = W0 x + b - U (D x)        W' = W0 - U D        r * (out + in*kh*kw) parameters

At step 0 that is the paper's W0 - Q Q^T W0; after it, a LoRA subtracted from W0 (no QR, no
orthonormality). U has shape (out, r), D (r, in*kh*kw). Strength s gives W0 - s U D, and the
exact LoRA is ``lora_up = -s U``, ``lora_down = D``. It needs no W0 once trained, and several of
them only combine by ``sum`` (concatenating the terms). The same verbs as projection.py.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import ParaError
from .base import add_bias, as_matrix, check_factor, inner_size, require_pair
from .projection import basis, init_B

__all__ = ["KIND", "PARAMETRIZATIONS", "DEFAULT_PARAMETRIZATION", "REFERENCE_INIT", "init", "delta_factors", "delta",
           "reduce_weight", "forward_weight_side", "output_delta", "forward_activation_side", "cheaper_side",
           "to_lora", "merge_sum", "check_tensors"]

KIND = "reference"
PARAMETRIZATIONS = ("paper", "reference")
DEFAULT_PARAMETRIZATION = "paper"
# The init value that reproduces the authors' code: B0 = 0, so U0 = the first r unit vectors.
REFERENCE_INIT = "reference"


def init(weight: torch.Tensor, rank: int, method: str = REFERENCE_INIT,
         generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U0, D0) in float32 on ``weight``'s device: U0 = QR(B0), D0 = U0^T W0.

    ``method == "reference"``: B0 = 0, U0 = the first r columns of the identity, exactly (torch's
    QR of a zero matrix gives the same, with signed zeros); any other value is an init of B
    (projection.init_B: kaiming, orthogonal, top-singular, bottom-singular).
    """
    W = as_matrix(weight).detach().float()
    out = W.shape[0]
    if rank < 1 or rank > min(out, W.shape[1]):
        raise ValueError(f"rank {rank} does not fit a weight of shape {tuple(weight.shape)}")
    if method == REFERENCE_INIT:
        U = torch.eye(out, rank, dtype=torch.float32, device=W.device)
    else:
        U = basis(init_B(weight, rank, method, generator)).to(W.device)
    D = U.t() @ W
    return U.contiguous(), D.contiguous()


# ---------------------------------------------------------------- weight side

def delta_factors(weight_shape, U: torch.Tensor, D: torch.Tensor, strength: float = 1.0,
                  dtype: torch.dtype = torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """(up, down) = (-s U, D) in ``dtype`` on U's device: the change of the weight as a product
    of two thin factors (the strength scales the small one)."""
    shape = tuple(weight_shape)
    inner = inner_size(shape)
    if U.dim() != 2 or D.dim() != 2 or U.shape[0] != shape[0] or tuple(D.shape) != (U.shape[1], inner):
        raise ValueError(f"reference factors U {tuple(U.shape)} / D {tuple(D.shape)} do not fit a weight of "
                         f"shape {shape} (U must be (out, r), D (r, {inner}))")
    Ud = U.to(dtype=dtype)
    return Ud * -float(strength), D.to(Ud.device, dtype)


def delta(weight_shape, U: torch.Tensor, D: torch.Tensor, strength: float = 1.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-s U D shaped like the weight: its exact change, computed in ``dtype``."""
    up, down = delta_factors(weight_shape, U, D, strength, dtype)
    return (up @ down).reshape(tuple(weight_shape))


def reduce_weight(weight: torch.Tensor, U: torch.Tensor, D: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """W0 - s U D, computed in float32 and returned in ``weight``'s dtype."""
    return (weight.float() + delta(weight.shape, U.to(weight.device), D.to(weight.device), strength)).to(weight.dtype)


def forward_weight_side(op, x, W0, bias, U, D, channel_dim: int, strength: float = 1.0):
    """op(x, W0 - s U D) + b in W0's dtype. Works for grouped convs too (U D has W0's shape)."""
    return add_bias(op(x, W0 + delta(W0.shape, U, D, strength, W0.dtype)), bias, channel_dim)


# ---------------------------------------------------------------- activation side

def output_delta(op, x: torch.Tensor, U: torch.Tensor, D: torch.Tensor, kernel_shape: Sequence[int],
                 channel_dim: int, strength: float = 1.0, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """-s U (D x): D x is the layer's own op with D as an r-channel weight of ``kernel_shape``
    (in, kh, kw) (a conv keeps its stride/padding/dilation), U mixes the r channels back along
    ``channel_dim``. In ``dtype`` (default: x's). Not for grouped convs. This is also the
    reference kind's whole bypass form: y' = y + output_delta(...). Rank 0 gives a 0-d zero,
    which broadcasts to the output."""
    dtype = dtype or x.dtype
    if D.shape[0] == 0:  # rank 0 is the zero map (and no conv has 0 output channels): a broadcast zero
        return torch.zeros((), dtype=dtype, device=x.device)
    z = op(x, D.to(x.device, dtype).reshape(D.shape[0], *kernel_shape))
    d = z.movedim(channel_dim, -1) @ U.to(z.device, dtype).t()
    return d.mul_(-float(strength)).movedim(-1, channel_dim)


def forward_activation_side(op, x, W0, bias, U, D, channel_dim: int, strength: float = 1.0):
    """op(x, W0) - s U (D x) + b: the same output as forward_weight_side without forming W'."""
    h = op(x, W0)
    d = output_delta(op, x, U, D, W0.shape[1:], channel_dim, strength, h.dtype)
    return add_bias(h + d, bias, channel_dim)


def cheaper_side(tokens: int, out: int, inner: int, *, rank: int = 1, backward: bool = False) -> str:
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


# ---------------------------------------------------------------- LoRA, merge, checks

def to_lora(U: torch.Tensor, D: torch.Tensor, weight_shape, strength: float = 1.0
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(lora_up, lora_down) with lora_up @ lora_down = -s U D exactly (alpha = rank, scale 1).
    Convs: up (out, r, 1, 1), down (r, in, kh, kw), as LoCon stores them."""
    shape = tuple(weight_shape)
    r = U.shape[1]
    up = -float(strength) * U.float()
    down = D.float()
    if tuple(down.shape) != (r, inner_size(shape)):
        raise ValueError(f"D {tuple(D.shape)} does not fit a weight of shape {shape}")
    if len(shape) > 2:
        up = up.reshape(shape[0], r, *([1] * (len(shape) - 2)))
        down = down.reshape(r, *shape[1:])
    return up, down


def merge_sum(items: Sequence[Tuple[torch.Tensor, torch.Tensor, float]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """sum_i s_i U_i D_i = [s_1 U_1 ... s_n U_n] [D_1; ...; D_n]: concatenate the terms."""
    U = torch.cat([float(s) * u.float() for u, _, s in items], dim=1)
    D = torch.cat([d.float().to(U.device) for _, d, _ in items], dim=0)
    return U, D


def check_tensors(where: str, layer: str, tensors: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A reference layer ({"para_U": U (out, r), "para_D": D (r, in*kh*kw)}) as stored in ``where``:
    both there, 2-D, floating point, finite, agreeing on the rank. Returns the tensors to use
    (float8 ones upcast)."""
    require_pair(where, layer, ("para_U", tensors.get("para_U")), ("para_D", tensors.get("para_D")), "reference")
    U = check_factor(where, layer, "para_U", tensors["para_U"], "(out, rank)")
    D = check_factor(where, layer, "para_D", tensors["para_D"], "(rank, in*kh*kw)")
    if U.shape[1] != D.shape[0]:
        raise ParaError(f"{where}: layer {layer}: para_U {tuple(U.shape)} and para_D {tuple(D.shape)} disagree on the "
                        "rank (U is (out, r), D is (r, in*kh*kw)).")
    return {"para_U": U, "para_D": D}
