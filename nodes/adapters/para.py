"""PaRa's (U, V) form in ComfyUI, as comfy/weight_adapter/lora.py keeps LoRA: the weight adapter
(weight patching and bypass), its train diff for ComfyUI's own trainer, and the PaRa Trainer's
layer forward. The math is para_core/functional/projection.py's.

ComfyUI calls ``calculate_weight`` with the weight it is patching, on the device it patches on
(the GPU when there is one), whenever the model is loaded; ``unpatch_model`` restores the
backup it took. Registered in ``comfy.weight_adapter.adapters`` (adapters/__init__.py), the stock
"Load LoRA" node reads PaRa files (``*.para_B``, ``*.para_U``/``*.para_V``) through it too, and
TrainLoraNode offers it as the algorithm "PaRa" (``create_train``, ``to_train``).

The bypass form needs the layer's bias, y' = y - s U (V^T (y - b)), which ``h(x, base_out)``
never receives, so these adapters override ``bypass_forward`` and make ``h`` an error: a caller
that only knows ``h`` must fail loudly, never get "no change" (the base class's ``h`` is zeros).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from comfy.weight_adapter.base import WeightAdapterBase, WeightAdapterTrainBase

from ...para_core.errors import ParaError
from ...para_core.functional import projection
from ...para_core.functional.base import RankCap, add_product_, effective_rank, is_linear, layer_op
from ...para_core.functional.projection import basis, basis_batched, basis_cached
from ..training_loop import LayerForwards, _weight_and_bias
from .base import (STOCK_SOURCE, StoredAdapter, bypass_weight_shape, check_fits, layer_bias, layer_groups, layer_kind,
                   split_weights, stock_layer, output_positions)

# The stock trainer adapts every layer; its init is the PaRa Trainer's default.
STOCK_TRAINER_INIT = projection.DEFAULT_INIT
# QR's gradient grows like 1/sigma_min(B): a B that is numerically rank-deficient (matrix_rank's
# tolerance) or vanishing (all zeros, 1e-40) has no basis to train, and Adam's squared gradients
# overflow float32 once sigma_min is below ~1e-19: NaN at the first step.
MIN_SINGULAR_VALUE = 1e-15


class ProjectionBypass:
    """``bypass_forward`` for W0 - s U (V^T W0): y - s U (V^T (y - b)) (projection.project_outputs). Subclasses give
    ``bypass_factors(device) -> (U, V)`` and ``check_bypass(weight_shape)``."""

    def h(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "PaRa's bypass form y - s U (V^T (y - b)) needs the layer's bias, which h(x, base_out) does not receive. "
            "Call bypass_forward(org_forward, x) (what ComfyUI's bypass loader does), or apply the file with "
            "weight patching: PaRa Loader, or the stock Load LoRA node.")

    def check_bypass(self, weight_shape) -> None:
        pass

    def bypass_forward(self, org_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = org_forward(x, *args, **kwargs)
        channel_dim, conv_dim, kernel_size, dilation = layer_kind(self, org_forward)
        self.check_bypass(bypass_weight_shape(x, y.shape[channel_dim], conv_dim, kernel_size,
                                              layer_groups(self, org_forward)))
        b = layer_bias(org_forward, x, y, conv_dim, kernel_size, dilation, args, kwargs)
        U, V = self.bypass_factors(y.device)
        return projection.project_outputs(y, U, V, channel_dim, float(getattr(self, "multiplier", 1.0)), b)


class ParaAdapter(StoredAdapter, ProjectionBypass, WeightAdapterBase):
    """One layer of a subject or merged PaRa file. ``weights``: ("B", B) for a subject (Q is
    computed where the weight lives) or ("UV", U, V), then optionally the source file and the
    layer name (for errors)."""
    name = "para"

    @property
    def form(self) -> str:
        return self.weights[0]

    @property
    def kind(self) -> str:
        return "subject" if self.form == "B" else "merged"

    def _split(self):
        return split_weights(self.weights[1:], 1 if self.form == "B" else 2)

    @classmethod
    def from_factors(cls, U: torch.Tensor, V: torch.Tensor, source: Optional[str] = None,
                     layer: Optional[str] = None) -> "ParaAdapter":
        return cls(set(), ("UV", U, V, source or STOCK_SOURCE, layer or ""))

    @classmethod
    def load(cls, x: str, lora: dict, alpha: float = None, dora_scale: torch.Tensor = None,
             loaded_keys: set = None) -> Optional["ParaAdapter"]:
        found = stock_layer(x, lora, projection.KINDS)  # raises on a broken file: the prompt stops
        if found is None:
            return None
        kind, t = found
        keys = set() if loaded_keys is None else loaded_keys
        keys.update(f"{x}.{n}" for n in t)
        if kind == "subject":
            return cls(keys, ("B", t["para_B"], STOCK_SOURCE, x))
        return cls(keys, ("UV", t["para_U"], t["para_V"], STOCK_SOURCE, x))

    def factors(self, device) -> tuple:
        tensors = self._split()[0]
        if self.form == "B":
            Q = basis_cached(tensors[0], device)  # QR in float32 on the patching device, once per tensor
            return Q, Q
        U, V = tensors
        return U.to(device, torch.float32), V.to(device, torch.float32)

    def _names(self):
        return ("para_B",) if self.form == "B" else ("para_U", "para_V")

    def check_bypass(self, weight_shape) -> None:
        tensors, source, layer = self._split()
        check_fits(source, layer or "(the layer it is loaded on)", self.kind, self._names(), tensors, weight_shape)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        # A misfit stops the prompt (ComfyUI unloads the half-patched model, the next prompt
        # patches from its backup): a file that silently does nothing is worse.
        tensors, source, _ = self._split()
        check_fits(source, key, self.kind, self._names(), tensors, weight.shape)
        U, V = self.factors(weight.device)
        # W' = W0 - s U (V^T W0), in float32 whatever the storage dtype (docs/spec.md section 1);
        # ComfyUI hands a float32 working copy. Finite factors can still overflow: never a NaN/Inf weight.
        up, down = projection.delta_factors(weight, U, V, strength)
        return add_product_(weight, up, down, function, source, f"the patched weight {key}")

    @classmethod
    def create_train(cls, weight, rank=1, alpha=1.0):
        """A new trainable PaRa layer for ComfyUI's TrainLoraNode (algorithm "PaRa")."""
        return ParaTrainDiff.create(weight, rank)

    def to_train(self):
        """Continue training this file's B in TrainLoraNode (its existing_lora input)."""
        tensors, source, layer = self._split()
        if self.form != "B":
            raise ParaError(f"{source}: layer {layer}: this PaRa file is a merged adapter (para_U/para_V): it has no B to "
                            "train further. Pick a trained subject file (para_B) as existing_lora, or none.")
        return ParaTrainDiff.resume(tensors[0], source, layer)


class ParaTrainDiff(ProjectionBypass, WeightAdapterTrainBase):
    """TrainLoraNode's PaRa layer: W' = W0 - Q (Q^T W0), Q = QR(para_B), with para_B (out, r)
    trainable. Its parameter is saved as ``<layer>.para_B``: exactly a PaRa subject file, which
    the stock loaders and PaRa Loader read.

    A layer the reference code's rank rule leaves out (fewer than 40 outputs, e.g. the final
    conv to the latent channels) gets rank 0: no parameter, the weight passes unchanged."""

    def __init__(self, B: torch.Tensor):
        super().__init__()
        self.rank = int(B.shape[1])
        if self.rank > 0:
            # contiguous: TrainLoraNode saves the parameter itself (safetensors refuses strided views)
            self.para_B = torch.nn.Parameter(B.detach().clone(memory_format=torch.contiguous_format))

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int = 1) -> "ParaTrainDiff":
        out = int(weight.shape[0])
        r = effective_rank(int(rank), tuple(weight.shape), RankCap.REFERENCE)
        if out < RankCap.DEFAULT_RATIO:
            r = 0  # the reference code's out // 40 = 0: not adapted
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        if r == 0:
            return cls(torch.zeros(out, 0, device=device))
        # init from the shape only: the weight may be quantized, offloaded or not materialized yet
        B = projection.init_B(torch.empty(out, 1), r, STOCK_TRAINER_INIT)
        return cls(B.to(device))

    @classmethod
    def resume(cls, B: torch.Tensor, source: str, layer: Optional[str]) -> "ParaTrainDiff":
        """A file's B to train further; a B without a well-defined basis is a clear error."""
        B = B.float()
        if B.shape[1] > 0:
            S = torch.linalg.svdvals(B)
            tolerance = max(float(S[0]) * torch.finfo(torch.float32).eps * max(B.shape), MIN_SINGULAR_VALUE)
            if float(S[-1]) <= tolerance:
                raise ParaError(
                    f"{source}: layer {layer}: para_B {tuple(B.shape)} is rank-deficient or vanishing (singular values "
                    f"{float(S[0]):.3g} .. {float(S[-1]):.3g}: zero, tiny or dependent columns), so Q = QR(B) is not "
                    "defined and training it gives NaN. Pick a trained PaRa file as existing_lora, or none to start "
                    "from scratch.")
        return cls(B)

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return w
        Q = basis(self.para_B.to(w.device))
        return projection.reduce_weight(w, Q, Q)

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        if self.rank == 0:
            return org_forward(x, *args, **kwargs)
        return super().bypass_forward(org_forward, x, *args, **kwargs)

    def bypass_factors(self, device):
        Q = basis(self.para_B.to(device))
        return Q, Q

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())


class ParaForward(LayerForwards):
    """The PaRa Trainer's layers: the trainable B of every adapted layer and the forward override
    that uses them (Q from one batched QR per step, the cheaper side per call)."""

    def __init__(self, modules: Dict[str, torch.nn.Module], B: Dict[str, torch.nn.Parameter], side: str = "auto"):
        super().__init__(modules)
        self.B = B
        self.side = side  # "auto", or "activation"/"weight" to force one (bench/train.py compares them)
        self.Q: Dict[str, torch.Tensor] = {}
        self.sides: Dict[str, str] = {}

    def parameters(self) -> List[torch.nn.Parameter]:
        return list(self.B.values())

    def prepare_step(self) -> None:
        # One batched QR per distinct B shape instead of one per layer.
        self.Q = basis_batched(self.B)

    def remove(self) -> None:
        super().remove()
        self.Q = {}

    def _forward_for(self, name, module):
        op = layer_op(module)
        channel_dim = -1 if is_linear(module) else 1
        inner = math.prod(module.weight.shape[1:])
        rank = self.B[name].shape[1]
        grouped = getattr(module, "groups", 1) != 1

        def forward(x, *args, **kwargs):
            W0, b = _weight_and_bias(module, x)
            # With a backward pass the weight side would form the full weight gradient g^T x (as
            # costly as the layer itself): projection.cheaper_side; measured in bench/train.py.
            if grouped:  # mixing rows across groups is no grouped conv any more
                side = "activation"
            elif self.side != "auto":
                side = self.side
            else:
                side = projection.cheaper_side(output_positions(module, x, channel_dim), inner, rank=rank,
                                               backward=torch.is_grad_enabled())
            self.sides[name] = side
            fwd = projection.forward_activation_side if side == "activation" else projection.forward_weight_side
            Q = self.Q[name]
            return fwd(op, x, W0, b, Q, Q, channel_dim)

        return forward
