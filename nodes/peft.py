"""ComfyUI side of PEFT's DEFT adapters (para_core/peft.py): diffusers <-> ComfyUI layer names
from ComfyUI's own maps, and the PEFT export of PaRa Export LoRA."""
from __future__ import annotations

import logging
import os
from typing import Dict

import comfy.lora
import comfy.utils

from ..para_core import ParaError
from ..para_core.errors import printable
from ..para_core import peft as core_peft

log = logging.getLogger("ComfyUI-PaRa")
WEIGHT = ".weight"
# model_lora_keys_unet's diffusers-style keys: "<prefix><diffusers module path>" -> "diffusion_model.<path>.weight"
_PREFIXES = ("unet.", "transformer.", "base_model.model.")


def diffusers_names(model) -> Dict[str, str]:
    """{diffusers module path: "diffusion_model.<ComfyUI module path>"} for ``model`` (a
    ModelPatcher), from comfy.utils.unet_to_diffusers (SD-style UNets) and the dotted diffusers
    keys of comfy.lora.model_lora_keys_unet (DiT families). Keys that map onto a slice of a fused
    weight (e.g. Flux's to_q inside qkv) are left out: a slice is not a layer here."""
    base = model.model
    names: Dict[str, str] = {}
    try:
        for dkey, lkey in comfy.utils.unet_to_diffusers(base.model_config.unet_config).items():
            if dkey.endswith(WEIGHT) and isinstance(lkey, str) and lkey.endswith(WEIGHT):
                names[dkey[: -len(WEIGHT)]] = "diffusion_model." + lkey[: -len(WEIGHT)]
    except Exception:  # not a UNet config (no num_res_blocks, ...)
        pass
    for key, target in comfy.lora.model_lora_keys_unet(base, {}).items():
        if not (isinstance(target, str) and target.endswith(WEIGHT)):
            continue
        for p in _PREFIXES:
            if key.startswith(p):
                names.setdefault(key[len(p):], target[: -len(WEIGHT)])
    return names


_warned = set()


def to_model_names(state, model, family: str):
    """The hook in fit_to_model: a PEFT state's diffusers names renamed onto ``model``'s layers;
    the unknown base fingerprint is said once per adapter."""
    if not core_peft.has_diffusers_names(state):
        return state
    key = state.source or state.name
    if key not in _warned:
        _warned.add(key)
        log.warning("PaRa: %s", printable(core_peft.base_unknown_message(state)))
    return core_peft.to_model_names(state, diffusers_names(model), family)


def export_peft(state, model, folder: str, strength: float, dtype, shapes) -> dict:
    """Write ``state`` (fitted to ``model``) as a PEFT DEFT adapter folder; returns save_peft's report."""
    names = {}
    for path, layer in diffusers_names(model).items():
        names.setdefault(layer, path)  # unet_to_diffusers' names come first
    report = core_peft.save_peft(state, folder, names, shapes, strength, dtype)
    left = report["left_out_conv"] + report["left_out_unnamed"]
    if left:
        log.warning("PaRa: the PEFT export of %r leaves out %d layer(s) (PEFT's DEFT adapts Linear layers only): %s",
                    state.name, len(left), ", ".join(left))
    return report


def export_peft_node(state, model, names, strength: float, dtype):
    """PaRa Export LoRA with format peft-deft: a new folder <prefix>_NNNNN_ in models/para (the
    first of ``names`` free, claimed by para_nodes.claim_folder; PaRa Loader lists its
    adapter_model.safetensors, so the export loads back), and its report in the node's UI."""
    import shutil
    import folder_paths
    from comfy_api.latest import io, ui
    from .para_nodes import claim_folder
    from .patching import layer_shapes
    folder = folder_paths.get_folder_paths("para")[0]
    out = claim_folder(names)
    try:
        report = export_peft(state, model, out, strength, dtype, layer_shapes(model))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # the folder is ours alone: leave nothing half-made
        raise
    rel = os.path.relpath(os.path.join(out, core_peft.WEIGHTS_NAME), folder)
    text = f"saved models/para/{os.path.dirname(rel)}: " + core_peft.report_text(report, strength)
    log.info("PaRa: %s", printable(text))
    return io.NodeOutput(rel, ui=ui.PreviewText(text))
