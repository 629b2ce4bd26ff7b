"""What both parametrizations share: weights as matrices, the layer's op and bias, the rank cap,
and the checks on a stored factor and on a computed result.

A weight of any shape with >= 2 dims is the matrix (out, in*kh*kw) (docs/spec.md section 1);
1-D weights (norms, biases) are never adapted.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import ParaError

__all__ = ["RankCap", "effective_rank", "as_matrix", "inner_size", "add_bias", "is_linear", "layer_op",
           "check_factor", "check_finite", "add_product_", "require_pair"]


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


def effective_rank(rank: int, weight_shape: Sequence[int], cap: str = RankCap.REFERENCE,
                   ratio: int = RankCap.DEFAULT_RATIO) -> int:
    """The rank a layer of ``weight_shape`` actually gets for a requested ``rank``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if cap not in RankCap.MODES:
        raise ValueError(f"unknown rank cap {cap!r}; use one of {', '.join(RankCap.MODES)}")
    if ratio < 1:
        raise ValueError(f"rank ratio must be >= 1, got {ratio}")
    out = int(weight_shape[0])
    r = min(rank, out, inner_size(weight_shape))
    if cap == RankCap.REFERENCE and out < ratio * rank:
        r = min(r, max(1, out // ratio))
    elif cap == RankCap.REFERENCE_CODE and len(weight_shape) > 2:
        code = rank if out >= ratio * rank else out // ratio
        r = min(r, max(1, min(code, int(weight_shape[1]), out)))
    return r


def inner_size(weight_shape: Sequence[int]) -> int:
    """in * kh * kw: the number of columns of a weight seen as a matrix."""
    return int(math.prod(int(d) for d in tuple(weight_shape)[1:]))


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() < 2:
        raise ValueError(f"PaRa adapts weights with >= 2 dims, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def add_bias(y: torch.Tensor, bias: Optional[torch.Tensor], channel_dim: int) -> torch.Tensor:
    """y + b along ``channel_dim``: the layer's bias, added after the reduced op (docs/spec.md section 1)."""
    if bias is None:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    return y + bias.to(y.dtype).reshape(shape)


def is_linear(module: torch.nn.Module) -> bool:
    """A Linear layer: an nn.Linear, or a module that computes like one without subclassing it
    (ComfyUI's mixed-precision Linear of quantized checkpoints: in/out_features, a 2-D weight)."""
    if isinstance(module, torch.nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return (hasattr(module, "in_features") and hasattr(module, "out_features") and w is not None
            and len(w.shape) == 2 and not isinstance(module, torch.nn.modules.conv._ConvNd))


def layer_op(module: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The Linear / ConvNd module's op as f(x, weight, bias=None) (bias-free unless given)."""
    if is_linear(module):
        return lambda x, w, b=None: F.linear(x, w, b)
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        return lambda x, w, b=None: module._conv_forward(x, w, b)
    raise TypeError(f"PaRa adapts Linear and Conv layers, not {type(module).__name__}")


# Dtypes a factor is used in as stored; other float formats (float8) are read exactly in float32.
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_factor(where: str, layer: str, name: str, t, want: str) -> torch.Tensor:
    """One stored factor (``name`` = para_B, para_U, para_V or para_D of ``layer`` in ``where``):
    a 2-D, finite, floating-point tensor. Float8 factors (F8_E4M3, F8_E5M2, ...) are upcast to
    float32, where every check and every later product runs; packed 4-bit ones are refused.
    Returns the tensor to use."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ParaError(f"{where}: {layer}.{name} has shape {shape}, expected {want}.")
    if not t.is_floating_point():
        raise ParaError(f"{where}: {layer}.{name} has dtype {t.dtype}; PaRa tensors are floating point. "
                        "The file is not a valid PaRa adapter.")
    if t.dtype not in _COMPUTE_DTYPES:
        try:
            t = t.float()
        except (RuntimeError, NotImplementedError, TypeError):
            raise ParaError(f"{where}: {layer}.{name} is stored as {str(t.dtype).replace('torch.', '')}, a packed format "
                            "PaRa cannot read; save the adapter in fp32, fp16 or bf16 (PaRa Save's dtype).") from None
    if not bool(torch.isfinite(t).all()):
        raise ParaError(f"{where}: {layer}.{name} contains NaN or Inf values; the adapter is broken (retrain, or use "
                        "an earlier checkpoint).")
    return t


def check_finite(t: torch.Tensor, where: str, what: str) -> torch.Tensor:
    """Finite inputs can still give a non-finite result (entries near 3e38 overflow in U V^T W0, a
    QR or an fp16 cast): every path that applies or writes a weight checks what it computed."""
    if not bool(torch.isfinite(t).all()):
        raise ParaError(f"{where}: {what} is not finite (NaN/Inf): the adapter's values are too large for this "
                        "computation (e.g. a merge or strength with huge entries, or an fp16 overflow). Nothing was "
                        "applied or written; use a sane adapter, a lower strength, or fp32.")
    return t


# A change d keeps a finite weight finite in every format ComfyUI casts a patched weight back to
# when every |d| entry is below this: fp16, the narrowest format with infinities, reaches inf only
# from 65520 = 65504 + 16 (half a step above its largest value; float32 and bf16 have steps of
# 2^104 and 2^120 there, fp8 saturates). 8 leaves room for float32 rounding of the sum.
SAFE_CHANGE = 8.0


def _is_identity(function) -> bool:
    """ComfyUI's default weight function ``lambda a: a`` (comfy.lora.calculate_weight)."""
    code = getattr(function, "__code__", None)
    return code is not None and code.co_code == _IDENTITY.co_code and code.co_argcount == 1 and not getattr(
        function, "__closure__", None) and not code.co_names


_IDENTITY = (lambda a: a).__code__


def add_product_(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, function: Optional[Callable] = None,
                 where: str = "", what: str = "the patched weight") -> torch.Tensor:
    """weight += function(up @ down) in place, up (out, k), down (k, in*kh*kw), and never a
    non-finite weight. The whole result is checked only where the thin factors cannot rule an
    overflow out: max|up @ down| <= max_i sum_k |up_ik| * max|down| (out*k + k*in work, not
    out*in) below SAFE_CHANGE, with ComfyUI's identity function, leaves a finite weight finite
    in its own format (what ComfyUI casts it back to). A NaN/Inf factor fails that bound too."""
    if up.numel() == 0 or down.numel() == 0:
        return weight
    bound = float(up.abs().sum(1).max() * down.abs().max())
    plain = function is None or _is_identity(function)
    d = (up @ down).reshape(weight.shape)
    weight += (d if plain else function(d)).to(weight.dtype)
    if not (plain and bound < SAFE_CHANGE):  # NaN fails the comparison too
        check_finite(weight, where, what)
    return weight


def require_pair(where: str, layer: str, a: Tuple[str, Optional[torch.Tensor]], b: Tuple[str, Optional[torch.Tensor]],
                 kind: str) -> None:
    """Both factors of a two-factor layer are there (``kind`` names the file kind in the message)."""
    (na, ta), (nb, tb) = a, b
    if ta is None or tb is None:
        have, missing = (na, nb) if tb is None else (nb, na)
        raise ParaError(f"{where}: layer {layer} has {have} but no {missing}; {kind} files need both.")
