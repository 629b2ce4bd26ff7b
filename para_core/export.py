"""Exact export of a PaRa adapter to a standard LoRA (spec section 2).

W' - W0 = -s U (V^T W0) has rank k, so it *is* a LoRA:
    lora_up = -s U (out, k),   lora_down = V^T W0 (k, in*kh*kw),   alpha = k (scale alpha/k = 1).
Conv layers get lora_up (out, k, 1, 1) and lora_down (k, in, kh, kw), as LoCon does.
A ``reference`` adapter (W' = W0 - s U D) exports as lora_up = -s U, lora_down = D.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch

from .fileformat import ParaState, check_finite_result, kohya_name
from .functional.reference import reference_lora

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
    ``base_weight(layer)`` returns (the original, unpatched W0)."""
    out: Dict[str, torch.Tensor] = {}
    if state.kind == "reference":
        # W' - W0 = -s U D needs no W0 (only its shape, for convs): lora_up = -s U, lora_down = D.
        for layer in state.layers:
            U, D = state.U[layer], state.D[layer]
            k = U.shape[1]
            if k == 0:
                continue
            up, down = reference_lora(U, D, tuple(base_weight(layer).shape), strength)
            ku, kd, ka = lora_keys(layer)
            out[ku] = up.to(dtype).cpu()
            out[kd] = down.to(dtype).cpu()
            out[ka] = torch.tensor(float(k), dtype=dtype)
        return _checked(out, state)
    for layer, (U, V) in state.factors().items():
        k = U.shape[1]
        if k == 0:
            continue
        W0 = base_weight(layer)
        Wm = W0.reshape(W0.shape[0], -1).float()
        up = -float(strength) * U.float().to(Wm.device)
        down = V.float().to(Wm.device).t() @ Wm
        if W0.dim() > 2:
            up = up.reshape(up.shape[0], k, *([1] * (W0.dim() - 2)))
            down = down.reshape(k, *W0.shape[1:])
        ku, kd, ka = lora_keys(layer)
        out[ku] = up.to(dtype).cpu()
        out[kd] = down.to(dtype).cpu()
        out[ka] = torch.tensor(float(k), dtype=dtype)
    return _checked(out, state)


def _checked(out: Dict[str, torch.Tensor], state: ParaState) -> Dict[str, torch.Tensor]:
    """No LoRA with a non-finite entry is ever written (huge factors overflow in V^T W0 or the cast)."""
    for key, t in out.items():
        check_finite_result(t, state.source or state.name, f"the exported LoRA tensor {key} ({str(t.dtype).replace('torch.', '')})")
    return out
