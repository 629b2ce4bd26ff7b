"""PaRa as a trainable weight adapter for ComfyUI's own trainer (TrainLoraNode, algorithm "PaRa").

TrainLoraNode picks its algorithm from ``comfy.weight_adapter.adapter_maps`` and calls
``create_train(module.weight, rank=..., alpha=...)`` for every layer with a >= 2-D weight (the
whole model: the stock trainer has no layer presets), ``to_train()`` on an adapter loaded from
``existing_lora``, then trains the module's parameters either as a weight wrapper
(``__call__(w)`` -> W') or, in bypass mode, through ``bypass_forward``. Its parameters are
saved under ``<layer>.<parameter name>``, so ``para_B`` gives exactly the keys of a PaRa
subject file: the stock loaders (and PaRa Loader) read the result.

PaRa Trainer stays the full-featured path (layer presets, inits, checkpoints, resume, metadata).
"""
from __future__ import annotations

import logging

import torch

from comfy.weight_adapter.base import WeightAdapterTrainBase

from ..para_core.functional.projection import RankCap, basis, effective_rank, reduce_weight_general
from ..para_core.train import init_B
from .adapters.base import OutputSideBypass

log = logging.getLogger("ComfyUI-PaRa")
# The stock trainer adapts every layer; its init is the PaRa Trainer's default.
STOCK_TRAINER_INIT = "orthogonal"


class ParaTrainDiff(OutputSideBypass, WeightAdapterTrainBase):
    """W' = W0 - Q (Q^T W0), Q = QR(para_B), with para_B (out, r) trainable.

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
        if out < getattr(RankCap, "DEFAULT_RATIO", 40):
            r = 0  # the reference code's out // 40 = 0: not adapted
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")
        if r == 0:
            return cls(torch.zeros(out, 0, device=device))
        # init from the shape only: the weight may be quantized, offloaded or not materialized yet
        B = init_B(torch.empty(out, 1), r, STOCK_TRAINER_INIT)
        return cls(B.to(device))

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        if self.rank == 0:
            return w
        Q = basis(self.para_B.to(w.device))
        return reduce_weight_general(w, Q, Q, 1.0)

    def bypass_forward(self, org_forward, x, *args, **kwargs):
        if self.rank == 0:
            return org_forward(x, *args, **kwargs)
        return super().bypass_forward(org_forward, x, *args, **kwargs)

    def bypass_factors(self, device):
        Q = basis(self.para_B.to(device))
        return Q, Q

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())
