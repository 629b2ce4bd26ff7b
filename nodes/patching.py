"""Glue between a ComfyUI ModelPatcher and para_core: layer shapes, original weights,
fingerprints, and applying a ParaState through ``add_patches`` on a clone."""
from __future__ import annotations

import logging
import math
from typing import Dict, Tuple

import torch

import comfy.model_patcher
import comfy.utils

from ..para_core.errors import ParaError, printable
from ..para_core.fit import check_fingerprint, check_fits, fingerprint
from ..para_core.functional import reference
from ..para_core.state import ParaState
from .adapters.para import ParaAdapter
from .adapters.reference import ReferenceAdapter
from .training_loop import QuantizedTensor, dequantize_tensor

log = logging.getLogger("ComfyUI-PaRa")
WEIGHT = ".weight"


def model_family(model) -> str:
    """The model family as ComfyUI detected it (e.g. SD15, SDXL)."""
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(getattr(model, "model", model)).__name__


def layer_shapes(model) -> Dict[str, Tuple[int, ...]]:
    """{layer: weight shape} for every >= 2-D weight of the diffusion model
    (layer = module path with the ``diffusion_model.`` prefix)."""
    out = {}
    for k, v in model.model_state_dict("diffusion_model.").items():
        if k.endswith(WEIGHT) and v.dim() >= 2:
            out[k[: -len(WEIGHT)]] = tuple(v.shape)
    return out


def original_weight(model, layer: str) -> torch.Tensor:
    """The base weight W0 of ``layer``, never a patched copy.

    ComfyUI unpatches lazily, so the live tensor may still carry the previous prompt's patches;
    the backup it keeps (shared by every clone) holds the original, as get_key_patches() does.
    """
    key = layer + WEIGHT
    bk = model.backup.get(key)
    if bk is not None:
        w = bk.weight
    else:
        hbk = getattr(model, "hook_backup", {}).get(key)
        w = hbk[0] if hbk is not None else comfy.utils.get_attr(model.model, key)
    return dequantized(model, layer, w)


def dequantized(model, layer: str, w: torch.Tensor) -> torch.Tensor:
    """``w`` as the float matrix the layer computes with. Quantized checkpoints (0.3x) store a
    QuantizedTensor (its raw data is not W0); older scaled-fp8 files (0.3.64) store fp8 data whose
    module's ``convert_weight`` applies the scale, as ComfyUI does before patching."""
    if QuantizedTensor is not None and isinstance(w, QuantizedTensor):
        try:
            return dequantize_tensor(w)
        except Exception as e:
            raise ParaError(f"layer {layer}: its weight is quantized ({getattr(w, '_layout_cls', type(w).__name__)}) and "
                            f"could not be dequantized here ({e}); load the unquantized checkpoint to train or export "
                            "against it, or apply the PaRa file with Load LoRA (Bypass).") from None
    try:
        module = comfy.utils.get_attr(model.model, layer)
    except AttributeError:
        return w
    convert = getattr(module, "convert_weight", None)
    if convert is not None and getattr(module, "scale_weight", None) is not None:
        return convert(w.float(), inplace=False)
    return w


def model_fingerprint(model, layers) -> str:
    return fingerprint({l: original_weight(model, l) for l in layers})


def check_strength(strength: float, what: str = "strength") -> float:
    if strength is None or not math.isfinite(float(strength)):
        raise ParaError(f"input '{what}' is {strength}; give a finite number (1.0 = the paper, 0 = base model, "
                        f"negative pushes away from the subject).")
    return float(strength)


def fit_to_model(state: ParaState, model) -> ParaState:
    """Validate ``state`` against ``model`` (shapes; fingerprint warning) and resolve its names."""
    shapes = layer_shapes(model)
    from .peft import to_model_names  # a PEFT DEFT adapter names layers the diffusers way
    state = to_model_names(state, model, f"this {model_family(model)} model")
    state = check_fits(state, shapes, family=f"this {model_family(model)} model")
    msg = check_fingerprint(state, model_fingerprint(model, state.layers)) if state.metadata.get("para.base_fingerprint") else None
    if msg:
        log.warning("PaRa: %s", printable(msg))
    return state


def apply_para(model, state: ParaState, strength: float = 1.0):
    """A clone of ``model`` with ``state`` patched in at ``strength``; the input is untouched.
    Nothing is patched when the file does not fit (the error names the first bad layer)."""
    strength = check_strength(strength)
    state = fit_to_model(state, model)
    where = state.source or state.name
    if state.kind == reference.KIND:  # W0 - s U D (docs/spec.md section 1b)
        patches = {l + WEIGHT: ReferenceAdapter.from_factors(state.U[l], state.D[l], where, l) for l in state.layers}
    else:
        patches = {l + WEIGHT: ParaAdapter.from_factors(U, V, where, l) for l, (U, V) in state.factors().items()}
    m = model.clone()
    if strength == 0:
        return m
    added = m.add_patches(patches, strength)
    missing = set(patches) - set(added)
    if missing:
        raise ParaError(f"{state.name}: ComfyUI did not accept the patch for {sorted(missing)[0]}; nothing applied.")
    return m
