"""Reading PaRa files (docs/spec.md section 2): the safetensors header behind a cheap size guard,
the tensors, and the one validation every load path shares: ``load_para`` here (PaRa Load, PaRa
Loader, the trainer's resume, the command line) and ComfyUI's stock loaders (Load LoRA, its
bypass variant, TrainLoraNode's existing_lora: nodes/adapters/) through ``check_layer_tensors``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch
from safetensors import safe_open

from .errors import ParaError
from .fit import kohya_name
from .functional import projection, reference
from .state import SUFFIXES, ParaState

__all__ = ["Header", "read_header", "MAX_HEADER_BYTES", "MAX_LAYERS", "LORA_MARKERS", "layer_and_suffix",
           "layer_kind", "check_layer_tensors", "check_spellings", "read_layers", "load_para"]

# A safetensors header is JSON; a real file's is kilobytes (a checkpoint's: a few MB).
MAX_HEADER_BYTES = 100_000_000
# Layers per PaRa file: the largest presets of real models adapt a few thousand layers.
MAX_LAYERS = 20_000
LORA_MARKERS = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", "_lora.up.", ".hada_w1_a", ".lokr_w1",
                ".oft_blocks", ".lora_B", ".lora_A")


@dataclass(frozen=True)
class Header:
    """What a safetensors header says: metadata, and each tensor's shape and dtype (file order
    is not kept: safetensors lists the keys sorted)."""
    metadata: Dict[str, str]
    shapes: Dict[str, Tuple[int, ...]]
    dtypes: Dict[str, str]

    @property
    def keys(self):
        return list(self.shapes)


def read_header(path: str, what: str = "PaRa file") -> Header:
    """The header of a safetensors file, read by safetensors itself after a check of its first
    8 bytes (the header's length) that refuses absurd sizes and truncated files with a clear
    message. ``what`` names the expected kind of file in the messages ("PaRa file", "checkpoint")."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ParaError(f"{path}: not a safetensors file (only {size} bytes). Pick a .safetensors {what}.")
    (n,) = struct.unpack("<Q", head)
    if n <= 1 or n > MAX_HEADER_BYTES or n + 8 > size:
        raise ParaError(f"{path}: not a safetensors file, or its header is truncated. Pick a .safetensors {what}, "
                        "or re-save/re-download it.")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            shapes, dtypes = {}, {}
            for k in f.keys():
                sl = f.get_slice(k)
                shapes[k] = tuple(int(d) for d in sl.get_shape())
                dtypes[k] = sl.get_dtype()
    except Exception as e:
        reason = str(e).replace("Error while deserializing header: ", "")
        if "not fully covered" in reason or "incomplete" in reason.lower():
            raise ParaError(f"{path}: the file is truncated or damaged ({size} bytes, less or more than its header "
                            "says); re-save or re-download it.") from None
        raise ParaError(f"{path}: not a safetensors file, or a damaged one ({reason}). Pick a .safetensors "
                        f"{what}.") from None
    return Header(metadata, shapes, dtypes)


def layer_and_suffix(key: str) -> Tuple[Optional[str], Optional[str]]:
    """``<layer>.para_B`` -> (layer, "para_B"); (None, None) for any other key."""
    for s in SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)], s[1:]
    return None, None


def layer_kind(where: str, layer: str, names: Iterable[str], default: str = "merged") -> str:
    """The kind ("subject", "merged", "reference") that the tensor names of one layer make; a
    layer that holds only para_U is ``default``'s (the file's metadata decides, else merged)."""
    names = set(names)
    if "para_B" in names:
        if len(names) > 1:
            raise ParaError(f"{where}: layer {layer} mixes para_B with {'/'.join(sorted(names - {'para_B'}))}; a file is "
                            "either a subject (para_B), a merged (para_U/para_V) or a reference (para_U/para_D) "
                            "adapter, never a mix.")
        return "subject"
    if "para_D" in names:
        if "para_V" in names:
            raise ParaError(f"{where}: layer {layer} mixes para_D with para_V; a file is either a merged "
                            "(para_U/para_V) or a reference (para_U/para_D) adapter.")
        return reference.KIND
    return "merged" if "para_V" in names else default


def check_layer_tensors(where: str, layer: str, tensors: Mapping[str, torch.Tensor],
                        kind: Optional[str] = None) -> Tuple[str, Dict[str, torch.Tensor]]:
    """The checks on one layer's tensors that need no model (every load path runs them): a known
    combination, complete pairs, 2-D, floating point (float8 upcast, packed formats refused),
    finite, matching ranks. Returns (kind, the tensors to use). ``where`` names the file."""
    kind = kind or layer_kind(where, layer, tensors)
    check = reference.check_tensors if kind == reference.KIND else projection.check_tensors
    return kind, check(where, layer, tensors)


def check_spellings(where: str, layers: Iterable[str]) -> None:
    """One layer named twice (``diffusion_model.X``, ``lora_unet_X`` or a bare ``X``) is refused:
    the loaders would apply both, or one of them, and disagree."""
    seen: Dict[str, str] = {}
    for layer in layers:
        key = kohya_name(layer)
        if key in seen and seen[key] != layer:
            raise ParaError(f"{where}: layers {seen[key]} and {layer} are two spellings of the same layer; a file names "
                            "each layer once. Keep one of them (or re-save the adapter with PaRa Save).")
        seen.setdefault(key, layer)


def read_layers(path: str, groups: Mapping[str, Mapping[str, str]], device: str = "cpu"
                ) -> Dict[str, Dict[str, torch.Tensor]]:
    """{layer: {name: tensor}} for ``groups`` ({layer: {name: key}}) from the safetensors file
    ``path`` (whose header read_header has checked): at most MAX_LAYERS layers, refused before any
    tensor is read; a read that fails is a ParaError naming the file. Unvalidated: each layer goes
    through check_layer_tensors next."""
    if len(groups) > MAX_LAYERS:
        raise ParaError(f"{path}: {len(groups)} layers, more than a PaRa file holds (at most {MAX_LAYERS}); it is not an "
                        "adapter of a real model.")
    try:
        with safe_open(path, framework="pt", device=device) as f:
            return {layer: {n: f.get_tensor(k) for n, k in names.items()} for layer, names in groups.items()}
    except Exception as e:
        raise ParaError(f"{path}: could not read the safetensors file ({e}); it may be corrupt, re-save it.") from None


def load_para(path: str, device: str = "cpu") -> ParaState:
    """Load and validate a PaRa file; every problem is a ParaError naming the file."""
    path = os.fspath(path)
    from . import peft  # PEFT's DEFT adapters (PaRa trained with diffusers + peft): a folder, its config, its weights
    if os.path.isdir(path) and peft.is_peft_folder(path) or path.endswith(".json") and os.path.isfile(path):
        return peft.load_peft(path, device)
    if not os.path.isfile(path):
        raise ParaError(f"{path}: no such PaRa file. Put .safetensors files in models/para.")
    header = read_header(path)
    groups: Dict[str, Dict[str, str]] = {}  # layer -> {tensor name: key}
    for k in header.shapes:
        layer, name = layer_and_suffix(k)
        if layer is not None:
            groups.setdefault(layer, {})[name] = k
    if not groups:
        if any(peft.is_deft_key(k) for k in header.shapes):
            return peft.load_peft(path, device)
        if any(m in k for k in header.shapes for m in LORA_MARKERS):
            raise ParaError(f"{path}: this is a LoRA file, not a PaRa file (it has lora_up/lora_down-style tensors and no "
                            ".para_B). Load it with ComfyUI's 'Load LoRA' node instead.")
        raise ParaError(f"{path}: no PaRa tensors (*.para_B, *.para_U/*.para_V or *.para_U/*.para_D) in this file; it is "
                        "not a PaRa adapter.")
    check_spellings(path, groups)
    hint = reference.KIND if header.metadata.get("para.kind") == reference.KIND else "merged"
    kinds = {layer: layer_kind(path, layer, names, hint) for layer, names in groups.items()}
    found = set(kinds.values())
    if len(found) > 1:
        if "subject" in found:
            raise ParaError(f"{path}: mixes para_B with para_U/para_V/para_D; a file is either a subject or a merged "
                            "adapter (or a reference one, para_U/para_D), never a mix. (ComfyUI's TrainLoraNode writes "
                            "such files when its existing_lora holds only some layers: load them with Load LoRA.)")
        raise ParaError(f"{path}: mixes para_D with para_V; a file is either a merged (para_U/para_V) or a reference "
                        "(para_U/para_D) adapter.")
    (kind,) = found
    stores: Dict[str, Dict[str, torch.Tensor]] = {"para_B": {}, "para_U": {}, "para_V": {}, "para_D": {}}
    for layer, tensors in read_layers(path, groups, device).items():
        _, checked = check_layer_tensors(path, layer, tensors, kind)
        for n, t in checked.items():
            stores[n][layer] = t
    return ParaState(kind=kind, B=stores["para_B"], U=stores["para_U"], V=stores["para_V"], D=stores["para_D"],
                     metadata=dict(header.metadata), source=path)
