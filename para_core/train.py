"""The training-side forward: run a layer with a trainable B so that its output equals
F(x; W0 - Q Q^T W0) + b, Q = QR(B), with gradients reaching only B.

Two equivalent ways (spec section 1):
- weight side:     W' = W0 - Q (Q^T W0), then the layer's op with W'. Extra cost per call
                   ~ 4 * out * inner * r flops (inner = in * kh * kw), independent of the tokens.
- activation side: h = op(x, W0), h' = h - Q (Q^T h). Extra cost ~ 4 * tokens * out * r.
So, forward only, the activation side is cheaper exactly when the layer sees fewer output
positions (tokens, batch included) than its fan-in ``inner``; `cheaper_side` decides per call.
With a backward pass (training B) the weight side also pays the full weight gradient
dL/dW' = g^T x (~2 * tokens * out * inner flops, as much as the layer's own forward), which the
activation side never forms: its whole extra cost is ~12 * tokens * out * r. Then the activation
side wins whenever inner > 6 r, i.e. for every real layer (``cheaper_side(..., backward=True)``).
The activation side also keeps the base layer's own (possibly fused / low-precision) kernel.
Grouped convolutions only work on the activation side (mixing rows across groups is not a
grouped conv any more).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .functional.projection import RankCap, add_bias, basis, effective_rank, reduce_activation

__all__ = ["INIT_METHODS", "DEFAULT_INIT", "init_B", "cheaper_side", "forward_weight_side",
           "forward_activation_side", "ParaLayer", "layer_op", "is_linear"]

INIT_METHODS = ("kaiming", "orthogonal", "top-singular", "bottom-singular", "reference")
# Measured (tiny SD1.5-shaped UNet, 2 images, rank 4, AdamW, 60 steps, 3 seeds; loss on fixed
# noise/timesteps, base model 1.359): lr 1e-2 -> kaiming 0.941, orthogonal 0.890,
# bottom-singular 0.900, top-singular 0.861; lr 1e-3 -> 1.262, 1.225, 1.238, 1.204.
# top-singular learns fastest on those random weights but removes each layer's strongest output
# directions at step 0 (it already raised the loss there, 1.372); on a pretrained model those
# directions carry most of what the layer does. orthogonal is the best of the inits that start
# from a random subspace like the paper's; its unit-norm columns also make Adam's step the same
# relative size in every layer width (kaiming columns are ~sqrt(out/3r) long, so they turn slower).
DEFAULT_INIT = "orthogonal"


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


def cheaper_side(tokens: int, inner: int, *, rank: int = 1, backward: bool = False) -> str:
    """'activation' when the projection of the outputs costs less than that of the weight.

    Forward only: compare 4*tokens*out*r with 4*out*inner*r. With ``backward`` (training B), the
    weight side adds the weight gradient 2*tokens*out*inner and both sides triple their own
    projection cost (forward + two backward products); see the module docstring.
    """
    if not backward:
        return "activation" if tokens < inner else "weight"
    activation = 12 * tokens * rank
    weight = 2 * tokens * inner + 12 * inner * rank
    return "activation" if activation <= weight else "weight"


def is_linear(module: torch.nn.Module) -> bool:
    """A Linear layer: an nn.Linear, or a module that computes like one without subclassing it
    (ComfyUI's mixed-precision Linear of quantized checkpoints: in/out_features, a 2-D weight)."""
    if isinstance(module, torch.nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return (hasattr(module, "in_features") and hasattr(module, "out_features") and w is not None
            and len(w.shape) == 2 and not isinstance(module, torch.nn.modules.conv._ConvNd))


def layer_op(module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The bias-free op of a Linear / ConvNd module, as f(x, weight)."""
    if is_linear(module):
        return lambda x, w: F.linear(x, w)
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return lambda x, w: module._conv_forward(x, w, None)
    raise TypeError(f"PaRa adapts Linear and Conv layers, not {type(module).__name__}")


def forward_weight_side(op, x, W0, bias, Q, channel_dim: int, strength: float = 1.0):
    Wm = W0.reshape(W0.shape[0], -1)
    Qd = Q.to(Wm.dtype)
    W = (Wm - strength * (Qd @ (Qd.t() @ Wm))).reshape(W0.shape)
    return add_bias(op(x, W), bias, channel_dim)


def forward_activation_side(op, x, W0, bias, Q, channel_dim: int, strength: float = 1.0):
    h = op(x, W0)
    Qd = Q.to(h.dtype)
    hm = h.movedim(channel_dim, -1)
    hm = hm - strength * ((hm @ Qd) @ Qd.t())
    return add_bias(hm.movedim(-1, channel_dim), bias, channel_dim)


class ParaLayer(torch.nn.Module):
    """Wraps a frozen Linear/Conv module with a trainable B (pure torch; used by tests and the
    benchmark; the ComfyUI trainer uses the same two forward functions)."""

    def __init__(self, module: torch.nn.Module, rank: int, init: str = DEFAULT_INIT, cap: str = RankCap.REFERENCE,
                 side: str = "auto", generator: Optional[torch.Generator] = None):
        super().__init__()
        self.base = module
        for p in module.parameters():
            p.requires_grad_(False)
        self.rank = effective_rank(rank, module.weight.shape, cap)
        self.B = torch.nn.Parameter(init_B(module.weight, self.rank, init, generator))
        self.side = side
        self.op = layer_op(module)
        self.channel_dim = -1 if isinstance(module, torch.nn.Linear) else 1
        self.inner = module.weight[0].numel()
        self.last_side = None

    def forward(self, x):
        Q = basis(self.B)
        W0, b = self.base.weight, self.base.bias
        side = self.side
        if side == "auto":
            out_positions = x.numel() // x.shape[-1] if self.channel_dim == -1 else None
            if out_positions is None:  # conv: estimate output positions without running it
                out_positions = x.shape[0] * math.prod(x.shape[2:])
            side = cheaper_side(out_positions, self.inner, rank=self.rank,
                                backward=torch.is_grad_enabled() and self.B.requires_grad)
        if getattr(self.base, "groups", 1) != 1:
            side = "activation"
        self.last_side = side
        fwd = forward_activation_side if side == "activation" else forward_weight_side
        return fwd(self.op, x, W0, b, Q, self.channel_dim)
