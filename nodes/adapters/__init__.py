"""PaRa's weight adapters for ComfyUI, one file per parametrization, as comfy/weight_adapter/ keeps
one per algorithm: para.py (W0 - s U (V^T W0): subject and merged files), reference.py
(W0 - s U D). ``register`` adds them to the list ComfyUI's LoRA loaders try, and "PaRa" to the
algorithms of its own trainer (TrainLoraNode)."""
from __future__ import annotations

import logging

import comfy.weight_adapter as wa

from .para import ParaAdapter
from .reference import ReferenceAdapter

log = logging.getLogger("ComfyUI-PaRa")
ADAPTERS = (ParaAdapter, ReferenceAdapter)
# The name TrainLoraNode's 'algorithm' input shows (the map's other keys: LoRA, LoHa, LoKr, OFT).
TRAIN_ALGORITHM = "PaRa"


def register() -> bool:
    """Add the adapters to ComfyUI's adapter list (what the stock LoRA loaders iterate)."""
    adapters = getattr(wa, "adapters", None)
    if not isinstance(adapters, list):
        log.warning("PaRa: this ComfyUI has no comfy.weight_adapter.adapters list; the stock 'Load LoRA' node "
                    "will not read PaRa files. The PaRa nodes keep working. Update ComfyUI to get both.")
        return False
    for adapter in ADAPTERS:
        if not any(getattr(a, "name", None) == adapter.name for a in adapters):
            adapters.append(adapter)
    maps = getattr(wa, "adapter_maps", None)
    if isinstance(maps, dict) and TRAIN_ALGORITHM not in maps:
        maps[TRAIN_ALGORITHM] = ParaAdapter
    return True
