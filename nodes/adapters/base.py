"""PaRa in ComfyUI's bypass mode (0.33+: ``LoraLoaderBypass*``, ``load_bypass_lora_for_models``,
TrainLoraNode's bypass_mode).

Bypass loading leaves the weight alone and wraps the layer's forward instead:
``BypassForwardHook`` calls ``adapter.bypass_forward(org_forward, x)`` when the adapter overrides
it, else ``g(f(x) + h(x, f(x)))``. PaRa's output side (para_core/bypass.py) needs the layer's
bias, y' = y - s U (V^T (y - b)), which ``h(x, base_out)`` never receives, so PaRa adapters
override ``bypass_forward`` and make ``h`` an error: a caller that only knows ``h`` must fail
loudly, never get "no change" (the base class's default ``h`` returns zeros).

The bias is taken the way the layer's forward sees it: the plain parameter when it is an
ordinary tensor on the output's device, else the forward's own answer for a zero input
(W0 * 0 + b: exact, and right for offloaded, dynamically loaded, quantized or
weight-function-patched layers, whose ``.bias`` is not what the forward adds).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ...para_core.bypass import reduce_output, reference_output_delta


def _module_of(org_forward) -> Optional[torch.nn.Module]:
    m = getattr(org_forward, "__self__", None)
    return m if isinstance(m, torch.nn.Module) else None


def layer_kind(adapter, org_forward) -> Tuple[int, int, tuple, tuple]:
    """(channel_dim, conv_dim, kernel_size, dilation) of the wrapped layer: from the module behind
    ``org_forward`` when there is one, else from the attributes ComfyUI's bypass hook sets on the
    adapter (``is_conv``, ``conv_dim``, ``kernel_size``, ``kw_dict``)."""
    m = _module_of(org_forward)
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return 1, len(m.kernel_size), tuple(m.kernel_size), tuple(m.dilation)
    if isinstance(m, torch.nn.Linear):
        return -1, 0, (), ()
    if "is_conv" in getattr(adapter, "__dict__", {}):  # set by BypassForwardHook
        if not adapter.is_conv:
            return -1, 0, (), ()
        conv_dim = int(adapter.conv_dim)
        kw = getattr(adapter, "kw_dict", None) or {}
        return 1, conv_dim, tuple(getattr(adapter, "kernel_size", ())), tuple(kw.get("dilation", ()))
    raise NotImplementedError(
        f"PaRa bypass: cannot tell whether the wrapped layer ({type(m).__name__ if m is not None else 'unknown'}) is a "
        "Linear or a conv; apply the file with weight patching (PaRa Loader or Load LoRA) instead.")


def _plain_bias(module: torch.nn.Module, y: torch.Tensor):
    """The bias tensor itself when the forward adds exactly it; None when there is no bias;
    ``False`` when only the forward can tell (offload, dynamic VRAM, patches applied on the fly)."""
    bias = getattr(module, "bias", None)
    if bias is None:
        return None
    if (type(bias) in (torch.Tensor, torch.nn.Parameter) and not bias.is_meta and bias.device == y.device
            and not getattr(module, "bias_function", None) and getattr(module, "bias_lowvram_function", None) is None
            and not hasattr(module, "_v")):
        return bias
    return False


def layer_bias(org_forward: Callable, x: torch.Tensor, y: torch.Tensor, conv_dim: int, kernel_size=(),
               dilation=(), args=(), kwargs=None) -> Optional[torch.Tensor]:
    """The bias vector (out,) the layer's forward adds, or None."""
    m = _module_of(org_forward)
    if m is not None:
        b = _plain_bias(m, y)
        if b is not False:
            return b
    if conv_dim == 0:
        probe = x.new_zeros((1,) * (x.dim() - 1) + (x.shape[-1],))
        return org_forward(probe, *args, **(kwargs or {})).reshape(-1)
    k = tuple(kernel_size) or (1,) * conv_dim
    d = tuple(dilation) or (1,) * conv_dim
    # the smallest input every padding mode maps to at least one output position
    spatial = tuple(di * (ki - 1) + 1 for ki, di in zip(k, d))
    probe = x.new_zeros((1, x.shape[1]) + spatial)
    out = org_forward(probe, *args, **(kwargs or {}))
    return out.reshape(out.shape[0], out.shape[1], -1)[0, :, 0]


class OutputSideBypass:
    """Mixin for PaRa's weight adapters: ``bypass_forward`` = the output side of
    W0 - s U (V^T W0). Subclasses give ``bypass_factors(device) -> (U, V)`` (float32)."""

    def bypass_factors(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "PaRa's bypass form y - s U (V^T (y - b)) needs the layer's bias, which h(x, base_out) does not receive. "
            "Call bypass_forward(org_forward, x) (what ComfyUI's bypass loader does), or apply the file with "
            "weight patching: PaRa Loader, or the stock Load LoRA node.")

    def bypass_forward(self, org_forward: Callable, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = org_forward(x, *args, **kwargs)
        channel_dim, conv_dim, kernel_size, dilation = layer_kind(self, org_forward)
        b = layer_bias(org_forward, x, y, conv_dim, kernel_size, dilation, args, kwargs)
        U, V = self.bypass_factors(y.device)
        if U.shape[0] != y.shape[channel_dim]:
            raise ValueError(f"{getattr(self, 'source', None) or 'PaRa adapter'}: {U.shape[0]} output channels, but the "
                             f"layer it is loaded on ({type(_module_of(org_forward)).__name__}) has {y.shape[channel_dim]}; "
                             "the file was made for another model. Nothing is applied.")
        return reduce_output(y, b, U, V, channel_dim, float(getattr(self, "multiplier", 1.0)))


class ReferenceBypass:
    """Mixin for the ``reference`` kind's adapter (W' = W0 - s U D, a LoRA): its bypass form
    y - s U (D x) needs only the input, so the plain ``h`` serves it. Subclasses give
    ``factors(device) -> (U, D)``. Layer geometry comes from ComfyUI's bypass hook."""

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if "is_conv" not in getattr(self, "__dict__", {}):
            raise NotImplementedError(
                "PaRa reference bypass: h() was called without the layer geometry ComfyUI's bypass hook sets "
                "(is_conv, conv_dim, kernel_size, in_channels, kw_dict); apply the file with weight patching "
                "(PaRa Loader or Load LoRA) instead.")
        U, D = self.factors(x.device)
        conv_dim = int(self.conv_dim) if self.is_conv else 0
        return reference_output_delta(x, U, D, conv_dim, tuple(getattr(self, "kernel_size", ())),
                                      getattr(self, "in_channels", None), dict(getattr(self, "kw_dict", None) or {}),
                                      float(getattr(self, "multiplier", 1.0))).to(base_out.dtype)
