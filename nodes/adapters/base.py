"""What the PaRa adapter kinds share on the ComfyUI side: the checks of what ComfyUI's loaders
hand them, the file name carried inside an adapter's ``weights``, and the layer geometry and bias
in bypass mode.

Bypass mode (0.33+: ``LoraLoaderBypass*``, ``load_bypass_lora_for_models``, TrainLoraNode's
bypass_mode) leaves the weight alone and wraps the layer's forward instead: ``BypassForwardHook``
calls ``adapter.bypass_forward(org_forward, x)`` when the adapter overrides it, else
``g(f(x) + h(x, f(x)))``, and sets the layer's geometry on the adapter (``is_conv``,
``conv_dim``, ``kernel_size``, ``in_channels``, ``kw_dict``).

The bias is taken the way the layer's forward sees it: the plain parameter when it is an
ordinary tensor on the output's device, else the forward's own answer for a zero input
(W0 * 0 + b: exact, and right for offloaded, dynamically loaded, quantized or
weight-function-patched layers, whose ``.bias`` is not what the forward adds).
"""
from __future__ import annotations

import math
from typing import Callable, Collection, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...para_core.fit import check_layer_fits, kohya_name
from ...para_core.read import check_layer_tensors, check_spellings, layer_kind as tensors_kind
from ...para_core.state import PREFIX, SUFFIXES

__all__ = ["STOCK_SOURCE", "split_weights", "stock_layer", "check_fits", "layer_kind",
           "layer_groups", "bypass_weight_shape", "bypass_op", "layer_bias", "module_of", "output_positions",
           "DeviceCache", "StoredAdapter"]

# Where a factor comes from when ComfyUI's own loaders read it: they hand an adapter the tensors
# only, and say themselves which node failed.
STOCK_SOURCE = "the PaRa file given to a ComfyUI LoRA node (Load LoRA, TrainLoraNode's existing_lora)"
NAMES = tuple(s[1:] for s in SUFFIXES)  # para_B, para_U, para_V, para_D


# ------------------------------------------------------------------ the adapter's tensors

def split_weights(weights: tuple, n_tensors: int) -> Tuple[tuple, str, Optional[str]]:
    """(tensors, source file, layer name) of an adapter's ``weights``: its tensors, then
    optionally the file and the layer they came from (for errors). ``weights`` is an adapter's
    whole state: ComfyUI rebuilds adapters as ``type(a)(a.loaded_keys, weights)``
    (comfy.lora.prefetch_prepared_value) with the tensors moved and everything else kept."""
    source, layer = (list(weights[n_tensors:n_tensors + 2]) + [None, None])[:2]
    return (tuple(weights[:n_tensors]), source if isinstance(source, str) and source else STOCK_SOURCE,
            layer if isinstance(layer, str) and layer else None)


def stock_layer(x: str, lora: dict, kinds: Collection[str]) -> Optional[Tuple[str, dict]]:
    """(kind, checked tensors) of layer ``x`` in a LoRA dict as ComfyUI's loaders read it, or None
    when ``x`` has no PaRa tensors of one of ``kinds``. The checks are PaRa Load's
    (para_core.read), plus one layer named twice (``diffusion_model.X`` and ``lora_unet_X``),
    which the loaders would apply twice."""
    present = {n: lora[f"{x}.{n}"] for n in NAMES if f"{x}.{n}" in lora}
    if not present:
        return None
    kind = tensors_kind(STOCK_SOURCE, x, present)
    if kind not in kinds:
        return None
    if x.startswith(PREFIX) and any(f"{kohya_name(x)}.{n}" in lora for n in NAMES):
        check_spellings(STOCK_SOURCE, [x, kohya_name(x)])
    return check_layer_tensors(STOCK_SOURCE, x, present, kind)


def check_fits(where: str, key: str, kind: str, names: Sequence[str], tensors: Sequence[torch.Tensor],
               weight_shape) -> None:
    """The adapter's tensors against the weight (or, in bypass mode, the layer) it patches."""
    layer = key[: -len(".weight")] if key.endswith(".weight") else key
    check_layer_fits(where, layer, kind, {n: tuple(t.shape) for n, t in zip(names, tensors)}, tuple(weight_shape),
                     "this model")


class StoredAdapter:
    """What the file-backed adapters share: ComfyUI's constructor (loaded_keys, weights), which
    must work alone (ComfyUI rebuilds adapters with it), and bypass factors computed once per
    (tensors, device). Subclasses give ``factors(device)``."""

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights
        self._bypass = DeviceCache()

    def bypass_factors(self, device) -> tuple:
        return self._bypass.get(self.weights, device, lambda: self.factors(device))


class DeviceCache:
    """One computed value per (adapter tensors, device): bypass runs every forward, the factors
    (a QR, a cast) are computed once. ComfyUI's bypass hook replaces ``weights`` with copies on
    the compute device, which starts a new entry."""

    def __init__(self):
        self._key = self._value = None

    def get(self, weights, device, compute: Callable):
        if self._key is None or self._key[0] is not weights or self._key[1] != device:
            self._key, self._value = (weights, device), compute()
        return self._value


# ------------------------------------------------------------------ bypass geometry

def module_of(org_forward) -> Optional[torch.nn.Module]:
    m = getattr(org_forward, "__self__", None)
    return m if isinstance(m, torch.nn.Module) else None


def layer_kind(adapter, org_forward) -> Tuple[int, int, tuple, tuple]:
    """(channel_dim, conv_dim, kernel_size, dilation) of the wrapped layer: from the module behind
    ``org_forward`` when there is one, else from the attributes ComfyUI's bypass hook sets on the
    adapter (``is_conv``, ``conv_dim``, ``kernel_size``, ``kw_dict``)."""
    m = module_of(org_forward)
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


def layer_groups(adapter, org_forward=None) -> int:
    m = module_of(org_forward) if org_forward is not None else None
    if m is not None:
        return int(getattr(m, "groups", 1))
    return int((getattr(adapter, "kw_dict", None) or {}).get("groups", 1))


def bypass_weight_shape(x: torch.Tensor, out: int, conv_dim: int, kernel_size=(), groups: int = 1) -> Tuple[int, ...]:
    """The shape of the weight the wrapped layer computes with, from its input and output: what
    a file's factors must fit (the stored weight may be quantized, offloaded or not there)."""
    if conv_dim == 0:
        return (out, int(x.shape[-1]))
    k = tuple(int(v) for v in kernel_size) or (1,) * conv_dim
    return (out, int(x.shape[1]) // max(1, groups), *k)


def bypass_op(conv_dim: int, kw_dict: Optional[dict] = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The bias-free op f(x, w) of the wrapped layer from the geometry ComfyUI's bypass hook sets
    (a conv keeps its stride, padding and dilation; ``groups`` is the caller's to handle)."""
    if conv_dim == 0:
        return lambda x, w: F.linear(x, w)
    kw = {k: v for k, v in (kw_dict or {}).items() if k in ("stride", "padding", "dilation")}
    conv = (F.conv1d, F.conv2d, F.conv3d)[conv_dim - 1]
    return lambda x, w: conv(x, w, None, **kw)


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
    m = module_of(org_forward)
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


def output_positions(module, x, channel_dim) -> int:
    """Output positions (tokens, batch included) of a layer for input ``x``, without running it."""
    if channel_dim == -1:
        return x.numel() // x.shape[-1]
    stride = math.prod(getattr(module, "stride", (1,)))
    return max(1, x.shape[0] * math.prod(x.shape[2:]) // stride)

