"""The output side of PaRa: what a layer computes when the adapter is applied to its output
instead of to its weight (ComfyUI's "bypass" loading, which leaves quantized or offloaded
weights untouched).

For y = W0 x + b and W' = W0 - s U (V^T W0) (every PaRa kind but ``reference``; a subject has
U = V = Q), the bias stays as it is (spec section 1), so

    y' = W' x + b = y - s U (V^T (y - b))

needs the layer's bias b. For the ``reference`` kind, W' = W0 - s U D is a LoRA and needs
the input instead: y' = y - s U (D x), with D applied like the layer (conv: D reshaped to
(r, in, kh, kw), same stride/padding/dilation; U a 1x1 conv).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["reduce_output", "reference_output_delta"]


def reduce_output(y: torch.Tensor, bias: Optional[torch.Tensor], U: torch.Tensor, V: torch.Tensor,
                  channel_dim: int, strength: float = 1.0) -> torch.Tensor:
    """y - s U (V^T (y - b)) along ``channel_dim`` (-1 for Linear outputs, 1 for convs).

    Computed in ``y``'s dtype (the layer's compute dtype), like the rest of the forward."""
    h = y
    if bias is not None:
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        h = y - bias.to(y.dtype).reshape(shape)
    Ud, Vd = U.to(y.device, y.dtype), V.to(y.device, y.dtype)
    hm = h.movedim(channel_dim, -1)
    delta = (hm @ Vd) @ Ud.t()
    return y - float(strength) * delta.movedim(-1, channel_dim)


def reference_output_delta(x: torch.Tensor, U: torch.Tensor, D: torch.Tensor, conv_dim: int = 0,
                           kernel_size=(), in_channels: Optional[int] = None, conv_args: Optional[dict] = None,
                           strength: float = 1.0) -> torch.Tensor:
    """-s U (D x): the output change of a ``reference`` adapter (a LoRA with up = -U, down = D).

    ``conv_dim`` 0 is a Linear layer; 1/2/3 a Conv1d/2d/3d with ``kernel_size``,
    ``in_channels`` and the layer's stride/padding/dilation/groups in ``conv_args``."""
    Ud, Dd = U.to(x.device, x.dtype), D.to(x.device, x.dtype)
    if conv_dim == 0:
        out = F.linear(F.linear(x, Dd), Ud)
    else:
        conv = (F.conv1d, F.conv2d, F.conv3d)[conv_dim - 1]
        args = dict(conv_args or {})
        if args.get("groups", 1) != 1:
            raise ValueError("the reference kind's bypass needs an ungrouped conv (groups=1)")
        args.pop("groups", None)
        channels = in_channels if in_channels is not None else Dd.shape[1] // max(1, _prod(kernel_size))
        down = Dd.reshape(Dd.shape[0], channels, *kernel_size)
        up = Ud.reshape(*Ud.shape, *([1] * conv_dim))
        out = conv(conv(x, down, **args), up)
    return -float(strength) * out


def _prod(xs) -> int:
    n = 1
    for v in xs:
        n *= int(v)
    return n
