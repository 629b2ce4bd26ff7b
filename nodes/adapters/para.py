"""PaRa as a ComfyUI weight adapter, in the style of comfy/weight_adapter/lora.py.

ComfyUI calls ``calculate_weight`` with the weight it is patching, on the device it patches on
(the GPU when there is one), whenever the model is loaded; ``unpatch_model`` restores the
backup it took. Registering the class in ``comfy.weight_adapter.adapters`` makes the stock
"Load LoRA" node read PaRa files (``*.para_B``, ``*.para_U``/``*.para_V``) too.
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import torch

from comfy.weight_adapter.base import WeightAdapterBase

from ...para_core.fileformat import ParaError, check_finite_result, check_layer_fits, check_layer_tensors
from ...para_core.functional.projection import basis
from ...para_core.functional.reference import reference_delta
from .base import OutputSideBypass, ReferenceBypass

log = logging.getLogger("ComfyUI-PaRa")
# The name TrainLoraNode's 'algorithm' input shows (the map's other keys: LoRA, LoHa, LoKr, OFT).
TRAIN_ALGORITHM = "PaRa"


class ParaAdapter(OutputSideBypass, WeightAdapterBase):
    """A PaRa file's layer. Weight patching: ``calculate_weight``. Bypass loading (0.33+):
    ``bypass_forward`` (nodes/bypass.py). ComfyUI's trainer: ``create_train``/``to_train``."""
    name = "para"

    def __init__(self, loaded_keys, weights, source: Optional[str] = None):
        # weights: ("B", B) for a subject (Q is computed where the weight lives),
        # or ("UV", U, V) for the general form / precomputed Q. source: the file, for errors.
        self.loaded_keys = loaded_keys
        self.weights = weights
        self.source = source

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, source: Optional[str] = None) -> "ParaAdapter":
        return cls(set(), ("UV", U, V), source)

    @classmethod
    def load(cls, x: str, lora: dict, alpha: float = None, dora_scale: torch.Tensor = None,
             loaded_keys: set = None) -> Optional["ParaAdapter"]:
        if loaded_keys is None:
            loaded_keys = set()
        present = {n: lora[f"{x}.{n}"] for n in ("para_B", "para_U", "para_V", "para_D") if f"{x}.{n}" in lora}
        if not present:
            return None
        if set(present) == {"para_U", "para_D"}:
            return None  # a reference file's layer: ReferenceAdapter's
        # The same checks as PaRa Load (para_core), raised: a broken file stops the prompt.
        source = lora_file_name()
        if "para_B" in present and len(present) > 1:
            raise ParaError(f"{source}: layer {x} mixes para_B with {'/'.join(n for n in present if n != 'para_B')}; "
                            "a file is either a subject or a merged adapter.")
        check_layer_tensors(source, x, present)
        if "para_B" in present:
            loaded_keys.add(f"{x}.para_B")
            return cls(loaded_keys, ("B", present["para_B"]), source)
        loaded_keys.update((f"{x}.para_U", f"{x}.para_V"))
        return cls(loaded_keys, ("UV", present["para_U"], present["para_V"]), source)

    def check_weight(self, weight: torch.Tensor, key: str) -> None:
        """Output size and rank against the weight it patches (para_core.check_layer_fits)."""
        t = self.weights[1]
        kind = "subject" if self.weights[0] == "B" else "merged"
        layer = key[: -len(".weight")] if key.endswith(".weight") else key
        check_layer_fits(self.source or "PaRa adapter", layer, kind, int(t.shape[0]), int(t.shape[1]),
                         tuple(weight.shape), "this model")

    def factors(self, device) -> tuple:
        if self.weights[0] == "B":
            Q = basis(self.weights[1].to(device))  # QR in float32 on the patching device
            return Q, Q
        _, U, V = self.weights
        return U.to(device, torch.float32), V.to(device, torch.float32)

    def bypass_factors(self, device) -> tuple:
        # Bypass runs every forward: compute Q once per (tensors, device), not per call. ComfyUI's
        # bypass hook replaces self.weights with copies on the compute device, which resets this.
        cached = getattr(self, "_bypass_cache", None)
        if cached is not None and cached[0] is self.weights and cached[1] == device:
            return cached[2]
        factors = self.factors(device)
        self._bypass_cache = (self.weights, device, factors)
        return factors

    @classmethod
    def create_train(cls, weight, rank=1, alpha=1.0):
        """A new trainable PaRa layer for ComfyUI's TrainLoraNode (algorithm "PaRa")."""
        from ..train_adapter import ParaTrainDiff
        return ParaTrainDiff.create(weight, rank)

    def to_train(self):
        """Continue training this file's B in TrainLoraNode (its existing_lora input)."""
        from ..train_adapter import ParaTrainDiff
        if self.weights[0] != "B":
            raise ParaError("this PaRa file is a merged adapter (para_U/para_V): it has no B to train further. "
                            "Pick a trained subject file (para_B) as existing_lora, or none.")
        return ParaTrainDiff(self.weights[1].float())

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # A misfit stops the prompt (ComfyUI unloads the half-patched model, the next prompt
        # patches from its backup): a file that silently does nothing is worse.
        self.check_weight(weight, key)
        U, V = self.factors(weight.device)
        # W' = W0 - s * U (V^T W0), in float32 whatever the storage dtype (spec section 1).
        Wm = weight.reshape(weight.shape[0], -1).float()
        delta = (U @ (V.t() @ Wm)).mul_(-float(strength)).reshape(weight.shape)
        weight += function(delta.to(weight.dtype))
        # Finite factors can still overflow (entries near 3e38): never apply a NaN/Inf weight.
        check_finite_result(weight, self.source or "PaRa adapter", f"the patched weight {key}")
        return weight


class ReferenceAdapter(ReferenceBypass, WeightAdapterBase):
    """A ``reference``-kind file's layer (spec section 1b): W' = W0 - s U D, i.e. a LoRA with
    up = -U, down = D; the math is para_core.reference's. Stock "Load LoRA" reads
    ``*.para_U`` + ``*.para_D`` files through it."""
    name = "para_reference"

    def __init__(self, loaded_keys, weights, source: Optional[str] = None):
        self.loaded_keys = loaded_keys
        self.weights = weights  # (U (out, r), D (r, in*kh*kw))
        self.source = source  # the file, for errors

    @classmethod
    def from_factors(cls, U: torch.Tensor, D: torch.Tensor, source: Optional[str] = None) -> "ReferenceAdapter":
        return cls(set(), (U, D), source)

    @classmethod
    def load(cls, x: str, lora: dict, alpha: float = None, dora_scale: torch.Tensor = None,
             loaded_keys: set = None) -> Optional["ReferenceAdapter"]:
        if loaded_keys is None:
            loaded_keys = set()
        u_key, d_key = f"{x}.para_U", f"{x}.para_D"
        if u_key in lora and d_key in lora and f"{x}.para_V" not in lora:
            source = lora_file_name()
            check_layer_tensors(source, x, {"para_U": lora[u_key], "para_D": lora[d_key]})  # as PaRa Load
            loaded_keys.update((u_key, d_key))
            return cls(loaded_keys, (lora[u_key], lora[d_key]), source)
        return None

    def factors(self, device) -> tuple:
        U, D = self.weights
        return U.to(device, torch.float32), D.to(device, torch.float32)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        U, D = self.factors(weight.device)
        if U.shape[0] != weight.shape[0] or D.shape[1] != weight[0].numel() or U.shape[1] != D.shape[0]:
            # a misfit stops the prompt, like ParaAdapter's (a file that silently does nothing is worse)
            raise ParaError(f"{self.source or 'PaRa adapter'}: layer {key}: para_U {tuple(U.shape)} / para_D "
                            f"{tuple(D.shape)} do not fit the weight of shape {tuple(weight.shape)} in this model. "
                            "This adapter was made for another model; pick the checkpoint it was trained on.")
        # W' = W0 - s U D in float32 whatever the storage dtype.
        weight += function(reference_delta(weight.shape, U, D, strength).to(weight.dtype))
        check_finite_result(weight, self.source or "PaRa adapter", f"the patched weight {key}")
        return weight


def lora_file_name() -> str:
    """The file ComfyUI's LoRA loader is reading, for error messages. ComfyUI passes the adapters
    only the tensors; its loader's frame (nodes.LoraLoader.load_lora, which the model-only loader
    calls too) holds ``lora_path``. Best effort: a generic name when it is not found."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        path = frame.f_locals.get("lora_path")
        if isinstance(path, str):
            return path
        frame = frame.f_back
    return "the PaRa file given to Load LoRA"


def register() -> bool:
    """Add ParaAdapter to ComfyUI's adapter list (what the stock LoRA loaders iterate)."""
    try:
        import comfy.weight_adapter as wa
        adapters = wa.adapters
    except (ImportError, AttributeError):
        log.warning("PaRa: this ComfyUI has no comfy.weight_adapter.adapters list; the stock 'Load LoRA' node "
                    "will not read PaRa files. The PaRa nodes keep working. Update ComfyUI to get both.")
        return False
    if not any(getattr(a, "name", None) == "para" for a in adapters):
        adapters.append(ParaAdapter)
    if not any(getattr(a, "name", None) == ReferenceAdapter.name for a in adapters):
        adapters.append(ReferenceAdapter)
    # ComfyUI's own trainer (TrainLoraNode) offers the algorithms of this map.
    maps = getattr(wa, "adapter_maps", None)
    if isinstance(maps, dict) and TRAIN_ALGORITHM not in maps:
        maps[TRAIN_ALGORITHM] = ParaAdapter
    return True
