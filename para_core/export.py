"""Exact export of a PaRa adapter to a standard LoRA (docs/spec.md section 2).

W' - W0 = -s U (V^T W0) has rank k, so it *is* a LoRA:
    lora_up = -s U (out, k),   lora_down = V^T W0 (k, in*kh*kw),   alpha = k (scale alpha/k = 1).
Conv layers get lora_up (out, k, 1, 1) and lora_down (k, in, kh, kw), as LoCon does.
A ``reference`` adapter (W' = W0 - s U D) exports as lora_up = -s U, lora_down = D.
The factorizations are each parametrization's ``to_lora`` (functional/).
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

from .fit import kohya_name
from .functional import projection, reference
from .functional.base import check_finite
from .state import ParaState

__all__ = ["export_lora", "lora_keys"]


def lora_keys(layer: str) -> Tuple[str, str, str]:
    """(up, down, alpha) keys in the kohya naming that ComfyUI, A1111-style and kohya loaders read."""
    p = kohya_name(layer)
    return f"{p}.lora_up.weight", f"{p}.lora_down.weight", f"{p}.alpha"


def export_lora(
    state: ParaState,
    base_weight: Callable[[str], torch.Tensor],
    strength: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Dict[str, torch.Tensor]:
    """The LoRA tensors reproducing ``state`` at ``strength`` on the base whose weights
    ``base_weight(layer)`` returns (the original, unpatched W0; a reference adapter only needs
    its shape)."""
    factors = state.factors() if state.kind != reference.KIND else None
    where = state.source or state.name
    out: Dict[str, torch.Tensor] = {}
    for layer in state.layers:
        k = state.rank(layer)
        if k == 0:
            continue
        if factors is None:
            up, down = reference.to_lora(state.U[layer], state.D[layer], tuple(base_weight(layer).shape), strength)
        else:
            up, down = projection.to_lora(base_weight(layer), *factors[layer], strength)
        ku, kd, ka = lora_keys(layer)
        out[ku] = up.to(dtype).cpu()
        out[kd] = down.to(dtype).cpu()
        out[ka] = torch.tensor(float(k), dtype=dtype)
        # No LoRA with a non-finite entry is ever written (huge factors overflow in V^T W0 or the cast).
        for key in (ku, kd, ka):
            check_finite(out[key], where, f"the exported LoRA tensor {key} ({str(dtype).replace('torch.', '')})")
    return out
