"""SD-style checkpoints read tensor by tensor, and PaRa adapters baked into them.

A checkpoint is a safetensors file in one of three layouts, told apart by its keys:
``model.diffusion_model.*`` (a full SD checkpoint with text encoder and VAE), ``diffusion_model.*``,
or bare module keys (a diffusion-model-only file, e.g. ``input_blocks.0.0.weight``). Whatever the
layout, layers are named like PaRa files name them: ``diffusion_model.<module path>``.

Nothing is read until asked for: shapes come from the header, weights one at a time.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from safetensors import safe_open

from .errors import ParaError
from .fit import check_fingerprint, check_fits, fingerprint
from .functional import projection, reference
from .functional.base import check_finite
from .merge import MERGE_MODES, merge_states
from .quantized import dequantize, find_quantized, requantize
from .read import LORA_MARKERS, read_header
from .state import PREFIX, SUFFIXES, ParaState
from .write import atomic_save_safetensors

__all__ = ["Checkpoint", "bake", "fit_states", "combined_factors", "LAYOUTS"]

# Key prefix of the diffusion model in each layout (the bare layout has none).
LAYOUTS = {"checkpoint": "model.diffusion_model.", "diffusion_model": PREFIX, "bare": ""}

# In a bare file these are other models' weights, never the diffusion model's.
_NOT_DIFFUSION = ("cond_stage_model.", "first_stage_model.", "conditioner.", "text_encoders.", "model_ema.",
                  "vae.", "text_model.", "clip_l.", "clip_g.", "t5xxl.", "embedding_manager.")


class _LazyWeights(Mapping):
    """{layer: safetensors slice}: fingerprint() reads only its sampled entries from disk."""

    def __init__(self, ckpt: "Checkpoint", layers: Sequence[str]):
        self._ckpt, self._layers = ckpt, list(layers)

    def __getitem__(self, layer: str):
        if layer not in self._layers:
            raise KeyError(layer)
        if self._ckpt.quantized(self._ckpt.key(layer)):
            return self._ckpt.weight(layer)  # the sampled entries need the scale: read it dequantized
        return self._ckpt.weight_slice(layer)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


class Checkpoint:
    """A checkpoint file opened lazily. Use as a context manager, or call ``close()``."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ParaError(f"{self.path}: no such checkpoint file.")
        header = read_header(self.path, what="checkpoint")
        self.metadata: Dict[str, str] = dict(header.metadata)
        self._shapes = header.shapes
        self.keys: List[str] = header.keys
        if any(k.endswith(SUFFIXES) for k in self.keys):
            raise ParaError(f"{self.path}: this is a PaRa file, not a checkpoint. Give the base model's checkpoint "
                            "(the .safetensors from models/checkpoints or models/diffusion_models).")
        if any(m in k for k in self.keys for m in LORA_MARKERS):
            raise ParaError(f"{self.path}: this is a LoRA file, not a checkpoint. Give the base model's checkpoint.")
        self.layout = self._detect_layout()
        prefix = LAYOUTS[self.layout]
        self._layer_keys: Dict[str, str] = {}
        for k, shape in self._shapes.items():
            if not (k.startswith(prefix) and k.endswith(".weight")) or len(shape) < 2:
                continue
            if not prefix and k.startswith(_NOT_DIFFUSION):
                continue
            self._layer_keys[PREFIX + k[len(prefix):-len(".weight")]] = k
        if not self._layer_keys:
            raise ParaError(f"{self.path}: no diffusion-model weights in this file (no model.diffusion_model.*, "
                            "diffusion_model.* or UNet/DiT module keys with >= 2-D weights). Give an SD-style "
                            "checkpoint or a diffusion-model-only file.")
        self._file = None
        self._fingerprints: Dict[Tuple[str, ...], str] = {}
        # {weight key: QuantSpec} of the quantized layers (ComfyUI's fp8/int8 "mixed precision" files)
        self._quant = find_quantized(self.keys, self.metadata, self.tensor)

    # ---------------------------------------------------------------- layout
    def _detect_layout(self) -> str:
        for name in ("checkpoint", "diffusion_model"):
            if any(k.startswith(LAYOUTS[name]) for k in self.keys):
                return name
        return "bare"

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def layer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """{"diffusion_model.<path>": shape} for every >= 2-D ``.weight`` (from the header, no data read)."""
        return {l: self._shapes[k] for l, k in self._layer_keys.items()}

    def key(self, layer: str) -> str:
        """The key under which ``layer``'s weight is stored in this file."""
        try:
            return self._layer_keys[layer]
        except KeyError:
            raise ParaError(f"{self.path}: no layer {layer} in this checkpoint.") from None

    def family(self) -> str:
        """The model family guessed from keys and shapes, in ComfyUI's names (SD15, SDXL, ...), or 'unknown'."""
        paths = [l[len(PREFIX):] for l in self._layer_keys]
        if any(p.startswith("double_blocks.") for p in paths):
            return "Flux"
        if any(p.startswith("joint_blocks.") for p in paths):
            return "SD3"
        if not any(p.startswith(("input_blocks.", "middle_block.")) for p in paths):
            return "unknown"
        label_emb = any(p.startswith("label_emb.") for p in paths)
        shapes = self.layer_shapes()
        # context_dim: the input width of cross-attention's to_k.
        ctx = {shapes[l][1] for l in shapes if l.endswith(".attn2.to_k") and len(shapes[l]) == 2}
        context = ctx.pop() if len(ctx) == 1 else None
        if context == 2048:
            return "SDXL"
        if label_emb and context == 1280:
            return "SDXLRefiner"
        if context == 768 and not label_emb:
            return "SD15"
        if context == 1024 and not label_emb:
            return "SD20"
        if label_emb:
            return "SDXL"
        return "unknown"

    def describe(self) -> str:
        """'name (family)' for messages."""
        return f"{self.name} ({self.family()})"

    # ---------------------------------------------------------------- data
    def _handle(self):
        if self._file is None:
            try:
                self._file = safe_open(self.path, framework="pt", device="cpu")
            except Exception as e:
                raise ParaError(f"{self.path}: could not read the safetensors file ({e}).") from None
        return self._file

    def tensor(self, key: str) -> torch.Tensor:
        """Any tensor of the file by its key, as stored."""
        try:
            return self._handle().get_tensor(key)
        except ParaError:
            raise
        except Exception as e:
            raise ParaError(f"{self.path}: could not read tensor {key} ({e}); the file may be corrupt.") from None

    def weight(self, layer: str) -> torch.Tensor:
        """The weight W0 of ``layer`` ("diffusion_model.<path>"): as stored (dtype kept), or
        dequantized to float32 when the file stores it quantized."""
        key = self.key(layer)
        spec = self._quant.get(key)
        if spec is None:
            return self.tensor(key)
        return dequantize(self.tensor(key), self.scale(spec), spec, f"{self.path}: layer {layer}")

    def quantized(self, key: str):
        """The QuantSpec of a quantized weight key, else None."""
        return self._quant.get(key)

    def scale(self, spec):
        """The stored scale tensor of a quantized weight (None when the file lacks it)."""
        return self.tensor(spec.scale_key) if spec.scale_key in self._shapes else None

    def weight_slice(self, layer: str):
        """A lazy safetensors slice of ``layer``'s weight (nothing read until indexed)."""
        return self._handle().get_slice(self.key(layer))

    def fingerprint(self, layers: Sequence[str]) -> str:
        """fit.fingerprint of these layers' weights, reading only the sampled entries."""
        key = tuple(sorted(layers))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint(_LazyWeights(self, key))
        return self._fingerprints[key]

    def close(self) -> None:
        self._file = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_strength(s: float, where: str) -> float:
    s = float(s)
    if not math.isfinite(s):
        raise ParaError(f"strength of {where} is {s}; give a finite number.")
    return s


def fit_states(ckpt: Checkpoint, states: Sequence[ParaState]) -> Tuple[List[ParaState], List[str]]:
    """Check each adapter fits ``ckpt`` (ParaError naming the first layer that does not) and
    compare fingerprints. Returns (states with names resolved, fingerprint warning messages)."""
    from .peft import base_unknown_message, has_diffusers_names, resolve_for_checkpoint
    shapes = ckpt.layer_shapes()
    messages = [base_unknown_message(st) for st in states if has_diffusers_names(st)]
    states = [resolve_for_checkpoint(st, shapes, ckpt.describe()) for st in states]
    fitted = [check_fits(st, shapes, family=ckpt.describe()) for st in states]
    for st in fitted:
        if st.metadata.get("para.base_fingerprint"):
            msg = check_fingerprint(st, ckpt.fingerprint(st.layers))
            if msg:
                messages.append(msg)
    return fitted, messages


def combined_factors(states: Sequence[ParaState], strengths: Sequence[float], mode: str = "sum"
                     ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (U, V)} with the strengths folded into U: W' = W0 - U (V^T W0).

    One adapter: its factors with U scaled by its strength. Several: merge_states in ``mode``.
    """
    if not states:
        raise ParaError("give at least one PaRa adapter")
    strengths = [_check_strength(s, st.name) for st, s in zip(states, strengths)]
    if len(states) == 1:
        s = strengths[0]
        return {l: (s * U, V) for l, (U, V) in states[0].factors().items()}
    return merge_states(list(states), strengths, mode).factors()


def bake(ckpt, items: Sequence[Tuple[ParaState, float]], mode: str = "sum", out_path: str = "") -> Dict:
    """Write ``ckpt`` with the adapters applied, W' = W0 - U (V^T W0), to ``out_path`` (atomic).

    ``ckpt``: a Checkpoint or a path. ``items``: [(ParaState, strength)]; several are merged with
    ``mode`` (merge_states). Every tensor that is not an adapted weight is copied bit-identically,
    keys keep their names, each adapted weight keeps its dtype (computed in float32). Metadata is
    kept, plus ``para.baked``. The output is built in memory (one copy of the model), then saved.
    Returns {"layers": n adapted, "warnings": [fingerprint messages], "fingerprint": ...}.
    """
    if not out_path:
        raise ParaError("bake needs an output path")
    if mode not in MERGE_MODES:
        raise ParaError(f"unknown merge mode {mode!r}; use one of {', '.join(MERGE_MODES)}")
    own = not isinstance(ckpt, Checkpoint)
    ckpt = Checkpoint(ckpt) if own else ckpt
    try:
        states, messages = fit_states(ckpt, [st for st, _ in items])
        if any(st.kind == "reference" for st in states):
            # W0 - sum_i s_i U_i D_i (reference parametrization, only 'sum' combines them)
            strengths = [_check_strength(s, st.name) for st, (_, s) in zip(states, items)]
            ref = merge_states(list(states), strengths, mode if len(states) > 1 else "sum")
            adapted = {ckpt.key(l): (reference.reduce_weight, ref.U[l], ref.D[l]) for l in ref.layers
                       if ref.U[l].shape[1] > 0}
        else:
            factors = combined_factors(states, [s for _, s in items], mode)
            adapted = {ckpt.key(l): (projection.reduce_weight, U, V) for l, (U, V) in factors.items() if U.shape[1] > 0}
        tensors: Dict[str, torch.Tensor] = {}
        rescaled: Dict[str, torch.Tensor] = {}  # new scales of requantized weights
        for key in ckpt.keys:
            if key in rescaled:
                tensors[key] = rescaled[key]
                continue
            t = ckpt.tensor(key)
            spec = ckpt.quantized(key) if key in adapted else None
            if key in adapted:
                reduce_weight, U, V = adapted[key]
                w = t if spec is None else dequantize(t, ckpt.scale(spec), spec, f"{ckpt.path}: weight {key}")
                w = reduce_weight(w, U, V, 1.0)
                check_finite(w, ", ".join(st.source or st.name for st in states), f"the baked weight {key} of {ckpt.name}")
                if spec is None:
                    t = w
                else:  # back into the layer's format, with a scale for the new weight
                    t, rescaled[spec.scale_key] = requantize(w, spec, ckpt.scale(spec), t.dtype)
                    tensors[spec.scale_key] = rescaled[spec.scale_key]
            tensors[key] = t
        layers = sorted({l for st in states for l in st.layers})
        info = {
            "inputs": [[st.name, float(s)] for st, (_, s) in zip(states, items)],
            "mode": mode if len(states) > 1 else "single",
            "layers": len(adapted),
            "base": ckpt.name,
            "base_fingerprint": ckpt.fingerprint(layers),
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        metadata = dict(ckpt.metadata)
        metadata["para.baked"] = json.dumps(info, sort_keys=True)
        atomic_save_safetensors(tensors, out_path, metadata)
        return {"layers": len(adapted), "warnings": messages, "fingerprint": info["base_fingerprint"]}
    finally:
        if own:
            ckpt.close()
