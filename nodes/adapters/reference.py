"""PaRa's (U, D) form in ComfyUI (docs/spec.md section 1b: W' = W0 - s U D, a LoRA with up = -U,
down = D): the weight adapter (weight patching and bypass), its train diff for ComfyUI's own
trainer (a reference file as TrainLoraNode's existing_lora trains on), and the PaRa Trainer's
layer forward. The math is para_core/functional/reference.py's.

Its bypass form y - s U (D x) needs only the input, so the plain ``h`` serves it, with the
layer geometry ComfyUI's bypass hook sets on the adapter.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from comfy.weight_adapter.base import WeightAdapterBase, WeightAdapterTrainBase

from ...para_core.errors import ParaError
from ...para_core.functional import reference
from ...para_core.functional.base import add_product_, is_linear, layer_op
from ..training_loop import LayerForwards, _weight_and_bias
from .base import (STOCK_SOURCE, StoredAdapter, bypass_op, bypass_weight_shape, check_fits, output_positions,
                   split_weights, stock_layer)

NAMES = ("para_U", "para_D")


class ReferenceBypass:
    """``h`` for W0 - s U D: -s U (D x). Subclasses give ``bypass_factors(device) -> (U, D)``,
    ``where`` and ``check_bypass(weight_shape)``."""

    where = STOCK_SOURCE

    def check_bypass(self, weight_shape) -> None:
        pass

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if "is_conv" not in getattr(self, "__dict__", {}):
            raise NotImplementedError(
                "PaRa reference bypass: h() was called without the layer geometry ComfyUI's bypass hook sets "
                "(is_conv, conv_dim, kernel_size, in_channels, kw_dict); apply the file with weight patching "
                "(PaRa Loader or Load LoRA) instead.")
        conv_dim = int(self.conv_dim) if self.is_conv else 0
        channel_dim = 1 if conv_dim else -1
        kw = dict(getattr(self, "kw_dict", None) or {})
        groups = int(kw.get("groups", 1) or 1)
        if groups != 1:
            raise ParaError(f"{self.where}: the reference kind's bypass form U (D x) needs an ungrouped layer, this "
                            f"conv has groups={groups}; apply the file with weight patching (PaRa Loader or Load LoRA) "
                            "instead.")
        weight_shape = bypass_weight_shape(x, int(base_out.shape[channel_dim]), conv_dim,
                                           tuple(getattr(self, "kernel_size", ()) or ()))
        self.check_bypass(weight_shape)
        U, D = self.bypass_factors(x.device)
        return reference.output_delta(bypass_op(conv_dim, kw), x, U, D, weight_shape[1:], channel_dim,
                                      float(getattr(self, "multiplier", 1.0)), base_out.dtype)


class ReferenceAdapter(StoredAdapter, ReferenceBypass, WeightAdapterBase):
    """One layer of a reference file. ``weights``: (U (out, r), D (r, in*kh*kw)), then optionally
    the source file and the layer name (for errors). Stock "Load LoRA" reads ``*.para_U`` +
    ``*.para_D`` files through it."""
    name = "para_reference"

    @property
    def where(self) -> str:
        return split_weights(self.weights, 2)[1]

    @classmethod
    def from_factors(cls, U: torch.Tensor, D: torch.Tensor, source: Optional[str] = None,
                     layer: Optional[str] = None) -> "ReferenceAdapter":
        return cls(set(), (U, D, source or STOCK_SOURCE, layer or ""))

    @classmethod
    def load(cls, x: str, lora: dict, alpha: float = None, dora_scale: torch.Tensor = None,
             loaded_keys: set = None) -> Optional["ReferenceAdapter"]:
        found = stock_layer(x, lora, (reference.KIND,))  # raises on a broken file: the prompt stops
        if found is None:
            return None
        _, t = found
        keys = set() if loaded_keys is None else loaded_keys
        keys.update(f"{x}.{n}" for n in NAMES)
        return cls(keys, (t["para_U"], t["para_D"], STOCK_SOURCE, x))

    def factors(self, device) -> tuple:
        U, D = split_weights(self.weights, 2)[0]
        return U.to(device, torch.float32), D.to(device, torch.float32)

    def check_bypass(self, weight_shape) -> None:
        tensors, source, layer = split_weights(self.weights, 2)
        check_fits(source, layer or "(the layer it is loaded on)", reference.KIND, NAMES, tensors, weight_shape)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        tensors, source, _ = split_weights(self.weights, 2)
        # a misfit stops the prompt, like ParaAdapter's (a file that silently does nothing is worse)
        check_fits(source, key, reference.KIND, NAMES, tensors, weight.shape)
        U, D = self.factors(weight.device)
        # W' = W0 - s U D in float32 whatever the storage dtype (ComfyUI hands a float32 working copy).
        up, down = reference.delta_factors(weight.shape, U, D, strength)
        return add_product_(weight, up, down, function, source, f"the patched weight {key}")

    def to_train(self):
        """Continue training this file's U and D in TrainLoraNode (its existing_lora input)."""
        U, D = split_weights(self.weights, 2)[0]
        return ReferenceTrainDiff(U, D)


class ReferenceTrainDiff(ReferenceBypass, WeightAdapterTrainBase):
    """TrainLoraNode's reference layer: W' = W0 - U D with U (out, r) and D (r, in*kh*kw)
    trainable, saved as ``<layer>.para_U`` / ``<layer>.para_D``: a reference PaRa file again."""

    def __init__(self, U: torch.Tensor, D: torch.Tensor):
        super().__init__()
        # contiguous float32 copies: TrainLoraNode saves the parameters themselves
        self.para_U = torch.nn.Parameter(U.detach().float().clone(memory_format=torch.contiguous_format))
        self.para_D = torch.nn.Parameter(D.detach().float().clone(memory_format=torch.contiguous_format))

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        return reference.reduce_weight(w, self.para_U, self.para_D)

    def bypass_factors(self, device):
        return self.para_U.to(device), self.para_D.to(device)

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())


class ReferenceForward(LayerForwards):
    """The PaRa Trainer's layers in the reference parametrization: trainable U (out, r) and
    D (r, in*kh*kw) per layer, float32 masters, forward y = W0 x + b - U (D x).
    ``side``: "auto", or "activation"/"weight" to force one."""

    def __init__(self, modules: Dict[str, torch.nn.Module], U: Dict[str, torch.nn.Parameter],
                 D: Dict[str, torch.nn.Parameter], side: str = "auto"):
        super().__init__(modules)
        missing = set(modules) ^ set(U) | set(modules) ^ set(D)
        if missing:
            raise ParaError(f"ReferenceForward: layer {sorted(missing)[0]} needs a module, a U and a D.")
        self.U, self.D = U, D
        self.side = side
        self.sides: Dict[str, str] = {}

    def parameters(self) -> List[torch.nn.Parameter]:
        return [p for name in self.U for p in (self.U[name], self.D[name])]

    def _forward_for(self, name, module):
        op = layer_op(module)
        channel_dim = -1 if is_linear(module) else 1
        out, inner = module.weight.shape[0], math.prod(module.weight.shape[1:])
        rank = self.U[name].shape[1]
        grouped = getattr(module, "groups", 1) != 1

        def forward(x, *args, **kwargs):
            W0, b = _weight_and_bias(module, x)
            if grouped:  # D x is no grouped conv; U D has W0's shape, so the weight side works
                side = "weight"
            elif self.side != "auto":
                side = self.side
            else:
                side = reference.cheaper_side(output_positions(module, x, channel_dim), out, inner, rank=rank,
                                              backward=torch.is_grad_enabled())
            self.sides[name] = side
            fwd = reference.forward_activation_side if side == "activation" else reference.forward_weight_side
            return fwd(op, x, W0, b, self.U[name], self.D[name], channel_dim)

        return forward
