"""PaRa nodes (all but the trainer): Load, Apply, Loader, Merge, Save, Export LoRA.

Thin wrappers: the math and the file format live in para_core."""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Tuple

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..para_core import (MERGE_MODES, ParaError, ParaState, atomic_save_safetensors, build_metadata, export_lora,
                         load_para, merge_states, save_para)
from ..para_core.write import remove_stale_temp_files
from .patching import apply_para, check_strength, fit_to_model, model_family, model_fingerprint, original_weight
from .types import PARA

log = logging.getLogger("ComfyUI-PaRa")
CATEGORY = "PaRa"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXPORT_FORMATS = ("lora", "peft-deft")
STRENGTH_TIP = ("How much of the learned subspace to remove: 1.0 = the paper, 0 = the base model, between 0 and 1 "
                "interpolates, 2 reflects the weights across the subspace (norm-preserving), negative values "
                "push away from the subject.")


def register_folder() -> str:
    """models/para (first), plus whatever extra_model_paths.yaml adds under the name ``para``."""
    d = os.path.join(folder_paths.models_dir, "para")
    os.makedirs(d, exist_ok=True)
    folder_paths.add_model_folder_path("para", d, is_default=True)
    paths, exts = folder_paths.folder_names_and_paths["para"]
    folder_paths.folder_names_and_paths["para"] = (paths, set(exts) | {".safetensors"})
    return d


def remove_crash_leftovers() -> List[str]:
    """At start: delete what an interrupted write left in models/para and models/loras (never
    listed, but they take disk space), see para_core.write.remove_stale_temp_files."""
    folders = list(folder_paths.get_folder_paths("para")) + list(folder_paths.get_folder_paths("loras"))
    removed = remove_stale_temp_files(folders)
    if removed:
        log.info("PaRa: removed %d unfinished file(s) left by an interrupted write: %s", len(removed), ", ".join(removed))
    return removed


def check_choice(value, options, input_name: str):
    """The API accepts any value for a combo (ComfyUI 0.3.64 does not validate V3 combos)."""
    if value not in options:
        raise ParaError(f"input '{input_name}' is {value!r}; use one of {', '.join(map(str, options))}.")
    return value


_cache: Dict[str, Tuple[Tuple[float, int], ParaState]] = {}


def load_para_cached(name: str) -> ParaState:
    path = folder_paths.get_full_path("para", name)
    if path is None:
        raise ParaError(f"PaRa file {name!r} not found in models/para ({', '.join(folder_paths.get_folder_paths('para'))}).")
    st = os.stat(path)
    key = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(path)
    if hit is None or hit[0] != key:
        _cache.clear()  # keep one file's tensors, not every file ever loaded
        _cache[path] = (key, load_para(path))
    return _cache[path][1]


def file_stamp(name: str):
    """Changes when the file behind ``name`` changes, so a retrained file under the same name is
    reloaded (ComfyUI otherwise reuses the cached output of an unchanged node)."""
    path = folder_paths.get_full_path("para", name)
    if path is None:
        return name
    st = os.stat(path)
    return f"{path}:{st.st_mtime_ns}:{st.st_size}"


def para_files():
    return folder_paths.get_filename_list("para")


def _para_combo(id_="para_name"):
    return io.Combo.Input(id_, options=para_files(), tooltip="A PaRa file (.safetensors) from models/para.")


def _strength(id_="strength", default=1.0):
    return io.Float.Input(id_, default=default, min=-10.0, max=10.0, step=0.01, tooltip=STRENGTH_TIP)


class PaRaLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PaRaLoad", display_name="PaRa Load", category=CATEGORY,
            description="Reads a PaRa file from models/para. Connect it to PaRa Apply, PaRa Merge, PaRa Save or PaRa Export LoRA.",
            inputs=[_para_combo()],
            outputs=[PARA.Output(display_name="PARA", tooltip="The PaRa adapter (subject, merged or reference).")],
        )

    @classmethod
    def fingerprint_inputs(cls, para_name, **kw):
        return file_stamp(para_name)

    @classmethod
    def execute(cls, para_name) -> io.NodeOutput:
        return io.NodeOutput(load_para_cached(para_name))


class PaRaApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PaRaApply", display_name="PaRa Apply", category=CATEGORY,
            description="Applies a PaRa adapter to a model: W' = W0 - s*Q(Q^T W0) on every adapted layer, through "
                        "ComfyUI's patching (the input model is untouched, unpatching is exact).",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to personalize."),
                    PARA.Input("para", tooltip="A PaRa adapter from PaRa Load, PaRa Merge or PaRa Trainer."),
                    _strength()],
            outputs=[io.Model.Output(tooltip="The model with the subspace removed.")],
        )

    @classmethod
    def execute(cls, model, para, strength) -> io.NodeOutput:
        return io.NodeOutput(apply_para(model, para, strength))


class PaRaLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PaRaLoader", display_name="PaRa Loader", category=CATEGORY,
            description="Loads a PaRa file from models/para and applies it to the model (PaRa Load + PaRa Apply in one).",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to personalize."), _para_combo(), _strength()],
            outputs=[io.Model.Output(tooltip="The model with the subspace removed.")],
        )

    @classmethod
    def fingerprint_inputs(cls, para_name, **kw):
        return file_stamp(para_name)

    @classmethod
    def execute(cls, model, para_name, strength) -> io.NodeOutput:
        check_strength(strength)
        return io.NodeOutput(apply_para(model, load_para_cached(para_name), strength))


MAX_MERGE = 6


class PaRaMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = [io.Combo.Input("mode", options=list(MERGE_MODES), default="sum",
                                 tooltip="sum: W0 - sum_i s_i Q_i Q_i^T W0 (the paper's code). union: one projection onto "
                                         "the union of the subspaces (overlaps counted once). sequential: apply the "
                                         "reductions one after the other, in input order. Reference-parametrization "
                                         "adapters (W0 - U D) merge with sum only.")]
        for i in range(1, MAX_MERGE + 1):
            inputs.append(PARA.Input(f"para_{i}", optional=i > 2,
                                     tooltip=f"PaRa adapter {i}" + (" (optional)" if i > 2 else "")))
            inputs.append(io.Float.Input(f"strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01, optional=i > 2,
                                         tooltip=f"Strength of adapter {i} inside the merge. " + STRENGTH_TIP))
        return io.Schema(
            node_id="PaRaMerge", display_name="PaRa Merge", category=CATEGORY,
            description="Combines several trained subjects into one PaRa adapter without training. The result can be "
                        "applied, saved (general form U, V) or exported as a LoRA. Inputs 3-6 are optional.",
            inputs=inputs,
            outputs=[PARA.Output(display_name="PARA", tooltip="The merged adapter.")],
        )

    @classmethod
    def execute(cls, mode, **kw) -> io.NodeOutput:
        states, strengths = [], []
        for i in range(1, MAX_MERGE + 1):
            p = kw.get(f"para_{i}")
            if p is None:
                continue
            states.append(p)
            strengths.append(check_strength(kw.get(f"strength_{i}", 1.0), f"strength_{i}"))
        if len(states) < 2:
            raise ParaError("PaRa Merge needs at least two connected PARA inputs (para_1 and para_2).")
        mode = check_choice(mode, list(MERGE_MODES), "mode")
        return io.NodeOutput(merge_states(states, strengths, mode, progress=LayerProgress()))


class LayerProgress:
    """merge_states' progress(done, total): honours Cancel after every layer and moves the
    node's progress bar in 1% steps (each update is a message to the browser)."""

    def __init__(self):
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = comfy.utils.ProgressBar(total)
        if done == total or done % max(1, total // 100) == 0:
            self.bar.update_absolute(done, total)


def _save_path(folder: str, prefix: str) -> str:
    full_folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    return os.path.join(full_folder, f"{filename}_{counter:05}_.safetensors")


def _write_into(kind: str, prefix: str, write, done: str) -> io.NodeOutput:
    """``write(path)`` to the next free <prefix>_NNNNN_.safetensors in models/<kind>; the node's
    output is the name relative to that folder."""
    folder = folder_paths.get_folder_paths(kind)[0]
    path = _save_path(folder, prefix)
    write(path)
    rel = os.path.relpath(path, folder)
    log.info("PaRa: %s %s", done, path)
    return io.NodeOutput(rel, ui=ui.PreviewText(f"saved models/{kind}/{rel}"))


class PaRaSave(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PaRaSave", display_name="PaRa Save", category=CATEGORY, is_output_node=True,
            description="Saves a PaRa adapter into models/para (with the spec's metadata) so PaRa Loader and the stock "
                        "Load LoRA node can use it later. Subjects keep para_B; merged adapters are saved as para_U/para_V, reference ones "
                        "(parametrization reference) as para_U/para_D.",
            inputs=[PARA.Input("para", tooltip="The adapter to save."),
                    io.String.Input("filename_prefix", default="PaRa",
                                    tooltip="File name prefix inside models/para; a counter is appended. Subfolders with '/' are allowed."),
                    io.Combo.Input("dtype", options=list(DTYPES), default="fp32", tooltip="Storage dtype of the tensors.")],
            outputs=[io.String.Output(display_name="filename", tooltip="The saved file's name relative to models/para.")],
        )

    @classmethod
    def execute(cls, para, filename_prefix, dtype) -> io.NodeOutput:
        torch_dtype = DTYPES[check_choice(dtype, list(DTYPES), "dtype")]
        return _write_into("para", filename_prefix, lambda path: save_para(para, path, torch_dtype), "saved")


class PaRaExportLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PaRaExportLoRA", display_name="PaRa Export LoRA", category=CATEGORY, is_output_node=True,
            description="Writes an exact standard LoRA (lora_up = -s*U, lora_down = V^T W0, alpha = rank; a reference "
                        "adapter: lora_down = D) into "
                        "models/loras. With the stock Load LoRA node it gives the same weights as the PaRa adapter, "
                        "but only on the base model it was exported against.",
            inputs=[io.Model.Input("model", tooltip="The base model the adapter was trained on (its weights go into lora_down)."),
                    PARA.Input("para", tooltip="The adapter to export."),
                    io.String.Input("filename_prefix", default="PaRa_lora", tooltip="File name prefix inside models/loras."),
                    _strength(),
                    io.Combo.Input("dtype", options=list(DTYPES), default="fp32",
                                   tooltip="Storage dtype; fp32 reproduces the PaRa weights to float rounding, fp16/bf16 to their rounding."),
                    io.Combo.Input("format", options=list(EXPORT_FORMATS), default="lora", optional=True,
                                   tooltip="lora: a LoRA file in models/loras. peft-deft: a PEFT DEFT adapter folder "
                                           "(para=true) in models/para for diffusers + peft (PeftModel.from_pretrained); "
                                           "Linear layers only, base-independent.")],
            outputs=[io.String.Output(display_name="filename", tooltip="The LoRA's name in the Load LoRA list "
                                                                       "(peft-deft: the adapter's file in models/para).")],
        )

    @classmethod
    def execute(cls, model, para, filename_prefix, strength, dtype, format="lora") -> io.NodeOutput:
        strength = check_strength(strength)
        state = fit_to_model(para, model)
        if check_choice(format, list(EXPORT_FORMATS), "format") == "peft-deft":
            from .peft import export_peft_node
            return export_peft_node(state, model, filename_prefix, strength, DTYPES[check_choice(dtype, list(DTYPES), "dtype")])
        tensors = export_lora(state, lambda l: original_weight(model, l), strength,
                              DTYPES[check_choice(dtype, list(DTYPES), "dtype")])
        fam = model_family(model)
        ranks = state.ranks()
        md = build_metadata(
            "lora", ranks=ranks, layers=state.metadata.get("para.layers", ""), base_arch=fam,
            base_fingerprint=model_fingerprint(model, state.layers),
            title=f"LoRA export of {state.name}",
            extra={"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks.values(), default=0)),
                   "ss_network_alpha": str(max(ranks.values(), default=0)), "para.exported_from": state.name,
                   "para.export_strength": f"{strength:g}",
                   "para.note": "exact LoRA export of a PaRa adapter; only fits the base it was exported against "
                                "(para.base_fingerprint)"})
        md["modelspec.architecture"] = md["modelspec.architecture"].replace("/para", "/lora")
        md.pop("para.kind", None)
        return _write_into("loras", filename_prefix, lambda path: atomic_save_safetensors(tensors, path, md),
                           "exported LoRA")


NODES = [PaRaLoader, PaRaLoad, PaRaApply, PaRaMerge, PaRaSave, PaRaExportLoRA]
