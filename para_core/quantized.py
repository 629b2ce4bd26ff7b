"""Quantized checkpoint weights as ComfyUI stores them (0.3x "mixed precision" files), read and
written by the command line (inspect, export-lora, bake). Inside ComfyUI the nodes get W0
through ComfyUI's own dequantization instead (nodes/patching.py).

How a file says a layer is quantized (ComfyUI comfy/utils.py convert_old_quants, comfy/ops.py):
- a ``<layer>.comfy_quant`` tensor (uint8 bytes of JSON, e.g. {"format": "float8_e4m3fn"}) next
  to ``<layer>.weight`` and its ``<layer>.weight_scale``;
- the same per-layer JSON in the header metadata ``_quantization_metadata`` ({"layers": {...}});
- the older "scaled fp8" files: a ``scaled_fp8`` marker key and ``<layer>.scale_weight``.

Per-tensor formats are read exactly (W0 = q * scale) and, when baked, requantized with a new
per-tensor scale (amax / the format's largest value, as ComfyUI's requantize with
scale="recalculate" does). Block-scaled and rotated formats (nvfp4, mxfp8, convrot, w4a4/w4a8)
are refused with a message that says what to do.
"""
from __future__ import annotations

import json
from typing import Dict, Mapping, Optional, Tuple

import torch

from .errors import ParaError

__all__ = ["QuantSpec", "find_quantized", "dequantize", "requantize", "SUPPORTED_FORMATS"]

# format -> (storage dtype, largest representable magnitude)
SUPPORTED_FORMATS = {
    "float8_e4m3fn": (torch.float8_e4m3fn, 448.0),
    "float8_e5m2": (torch.float8_e5m2, 57344.0),
    "int8_tensorwise": (torch.int8, 127.0),
}
ADVICE = ("use the unquantized checkpoint with the command line, or apply the PaRa file inside ComfyUI "
          "(PaRa Loader, or Load LoRA (Bypass), which leaves quantized weights untouched)")


class QuantSpec:
    """How one layer's weight is stored: its format and the key of its scale."""

    def __init__(self, fmt: str, scale_key: str, conf: Optional[dict] = None):
        self.format, self.scale_key, self.conf = fmt, scale_key, dict(conf or {})

    def check_supported(self, where: str) -> None:
        params = self.conf.get("params") if isinstance(self.conf.get("params"), dict) else {}
        if self.format not in SUPPORTED_FORMATS or self.conf.get("convrot") or params.get("convrot"):
            raise ParaError(f"{where} is quantized as {self.format}{' with rotation' if self.format in SUPPORTED_FORMATS else ''}, "
                            f"which PaRa's command line cannot read; {ADVICE}.")


def _conf_from_tensor(t: torch.Tensor) -> dict:
    try:
        return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))
    except Exception:
        return {}


def find_quantized(keys, metadata: Mapping[str, str], read) -> Dict[str, QuantSpec]:
    """{weight key: QuantSpec} for every quantized ``.weight`` among ``keys``.

    ``read(key)`` returns a (small) tensor of the file (the ``.comfy_quant`` entries)."""
    keys = set(keys)
    out: Dict[str, QuantSpec] = {}
    layers: Dict[str, dict] = {}
    for k in keys:
        if k.endswith(".comfy_quant"):
            layers[k[: -len(".comfy_quant")]] = _conf_from_tensor(read(k))
    raw = metadata.get("_quantization_metadata") if metadata else None
    if raw:
        try:
            for layer, conf in (json.loads(raw).get("layers") or {}).items():
                layers.setdefault(layer, conf if isinstance(conf, dict) else {})
        except (ValueError, AttributeError):
            raise ParaError("the checkpoint's _quantization_metadata is not valid JSON; the file may be corrupt.") from None
    for layer, conf in layers.items():
        if layer + ".weight" in keys:
            out[layer + ".weight"] = QuantSpec(str(conf.get("format")), layer + ".weight_scale", conf)
    if any(k == "scaled_fp8" or k.endswith(".scaled_fp8") for k in keys):
        for k in keys:
            if k.endswith(".scale_weight") and k[: -len(".scale_weight")] + ".weight" in keys:
                out.setdefault(k[: -len(".scale_weight")] + ".weight", QuantSpec("float8_e4m3fn", k, {"legacy": True}))
    return out


def _scale_like(scale: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    s = scale.float()
    if s.numel() == 1:
        return s.reshape(())
    if s.numel() == q.shape[0]:  # per output channel
        return s.reshape((q.shape[0],) + (1,) * (q.dim() - 1))
    raise ParaError(f"a quantization scale of shape {tuple(scale.shape)} does not fit a weight of shape "
                    f"{tuple(q.shape)}; {ADVICE}.")


def dequantize(q: torch.Tensor, scale: torch.Tensor, spec: QuantSpec, where: str) -> torch.Tensor:
    """W0 = q * scale in float32."""
    spec.check_supported(where)
    if scale is None:
        raise ParaError(f"{where} is quantized as {spec.format} but its scale {spec.scale_key} is missing; "
                        "the file may be corrupt.")
    return q.float() * _scale_like(scale, q)


def requantize(W: torch.Tensor, spec: QuantSpec, old_scale: torch.Tensor, storage: torch.dtype
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) for a float weight, in the layer's format with a recalculated scale of the old
    scale's shape and dtype (per tensor, or per output channel when it was)."""
    qmax = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.int8: 127.0}[storage]
    Wf = W.float()
    if old_scale.numel() == 1:
        amax = Wf.abs().max()
    else:
        amax = Wf.reshape(Wf.shape[0], -1).abs().amax(dim=1)
    scale = torch.clamp(amax / qmax, min=torch.finfo(torch.float32).tiny)
    scaled = Wf / _scale_like(scale, Wf)
    if storage == torch.int8:
        q = scaled.round().clamp(-qmax, qmax).to(torch.int8)
    else:
        q = scaled.clamp(-qmax, qmax).to(storage)
    return q, scale.reshape(old_scale.shape).to(old_scale.dtype)
