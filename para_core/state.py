"""``ParaState``: one PaRa adapter in memory, what the ``PARA`` socket carries between nodes and
what the command line reads and writes (docs/spec.md section 2).

Layer names are ComfyUI module paths with the ``diffusion_model.`` prefix; files may also use
the kohya-style ``lora_unet_<path with _>`` (fit.resolve_layers maps them onto a model).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from .errors import FingerprintWarning, ParaError
from .functional import reference
from .functional.projection import basis_batched
from .write import build_metadata

__all__ = ["ParaError", "FingerprintWarning", "ParaState", "KINDS", "PREFIX", "KOHYA_PREFIX", "SUFFIXES",
           "reference_state"]

PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
# The tensor names of each kind, after "<layer>.".
TENSORS = {"subject": ("para_B",), "merged": ("para_U", "para_V"), "reference": ("para_U", "para_D")}
KINDS = tuple(TENSORS)
SUFFIXES = (".para_B", ".para_U", ".para_V", ".para_D")


@dataclass
class ParaState:
    """One PaRa adapter.

    ``kind == "subject"``: ``B[layer]`` of shape (out, r), Q = QR(B).
    ``kind == "merged"``: ``U[layer]``, ``V[layer]`` of shape (out, k), W' = W0 - U V^T W0.
    ``kind == "reference"``: ``U[layer]`` (out, r) and ``D[layer]`` (r, in*kh*kw), W' = W0 - U D
    (functional/reference.py); it has no (U, V) form without W0.
    """

    kind: str = "subject"
    B: Dict[str, torch.Tensor] = field(default_factory=dict)
    U: Dict[str, torch.Tensor] = field(default_factory=dict)
    V: Dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None
    D: Dict[str, torch.Tensor] = field(default_factory=dict)
    _factors: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = field(default=None, repr=False, compare=False)

    def _first(self) -> Dict[str, torch.Tensor]:
        """{layer: the factor whose shape is (out, rank)}: B for a subject, else U."""
        return self.B if self.kind == "subject" else self.U

    @property
    def layers(self) -> List[str]:
        return list(self._first())

    def has_layer(self, layer: str) -> bool:
        return layer in self._first()

    @property
    def name(self) -> str:
        return os.path.basename(self.source) if self.source else self.metadata.get("modelspec.title", "PaRa adapter")

    def rank(self, layer: str) -> int:
        return int(self._first()[layer].shape[1])

    def ranks(self) -> Dict[str, int]:
        return {l: int(t.shape[1]) for l, t in self._first().items()}

    def out_dim(self, layer: str) -> int:
        return int(self._first()[layer].shape[0])

    def tensors(self, layer: str) -> Dict[str, torch.Tensor]:
        """{"para_B": B} / {"para_U": U, "para_V": V} / {"para_U": U, "para_D": D} of ``layer``."""
        store = {"para_B": self.B, "para_U": self.U, "para_V": self.V, "para_D": self.D}
        return {n: store[n][layer] for n in TENSORS[self.kind]}

    def num_params(self) -> int:
        stores = {"subject": (self.B,), "merged": (self.U, self.V), "reference": (self.U, self.D)}[self.kind]
        return sum(t.numel() for d in stores for t in d.values())

    def factors(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (U, V)} in float32; a subject gives (Q, Q) from one batched QR per shape."""
        if self.kind == reference.KIND:
            raise ParaError(f"{self.name} is a reference-parametrization adapter (W0 - U D): it has no general "
                            "(U, V) form; use para_core.functional.reference for it.")
        if self._factors is None:
            if self.kind == "subject":
                Q = basis_batched(self.B)
                self._factors = {l: (Q[l], Q[l]) for l in self.B}
            else:
                self._factors = {l: (self.U[l].float(), self.V[l].float()) for l in self.U}
        return self._factors

    def renamed(self, mapping: Mapping[str, str]) -> "ParaState":
        """A copy with layers renamed (used to resolve kohya-style names)."""
        ren = lambda d: {mapping.get(k, k): v for k, v in d.items()}
        return ParaState(self.kind, ren(self.B), ren(self.U), ren(self.V), dict(self.metadata), self.source,
                         D=ren(self.D))


def reference_state(U: Mapping[str, torch.Tensor], D: Mapping[str, torch.Tensor],
                    metadata: Optional[Mapping[str, str]] = None, **metadata_fields) -> ParaState:
    """A ``reference`` ParaState from {layer: U} and {layer: D} (copied to float32 CPU tensors).

    ``metadata``: ready metadata; otherwise ``metadata_fields`` go to write.build_metadata
    (layers=, base_arch=, base_fingerprint=, train=, title=, ...)."""
    if set(U) != set(D):
        missing = sorted(set(U) ^ set(D))[0]
        raise ParaError(f"reference adapter: layer {missing} has only one of U and D; every layer needs both.")
    Uc = {l: u.detach().float().cpu().clone() for l, u in U.items()}
    Dc = {l: D[l].detach().float().cpu().clone() for l in U}
    for l in Uc:
        reference.check_tensors("reference adapter", l, {"para_U": Uc[l], "para_D": Dc[l]})
    if metadata is None:
        metadata_fields.setdefault("ranks", {l: int(u.shape[1]) for l, u in Uc.items()})
        md = build_metadata(reference.KIND, **metadata_fields)
    else:
        md = dict(metadata)
    md["para.kind"] = reference.KIND
    return ParaState(kind=reference.KIND, U=Uc, D=Dc, metadata=md)
