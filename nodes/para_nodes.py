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
from ..para_core import peft as core_peft
from ..para_core.write import NameTaken, numbered, remove_stale_temp_files
from .patching import apply_para, check_strength, fit_to_model, model_family, model_fingerprint, original_weight
from .types import PARA, check_model, check_para

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
        log.info("PaRa: removed %d unfinished file(s) left by an interrupted write: %s", len(removed),
                 ", ".join(map(repr, removed)))
    return removed


def check_choice(value, options, input_name: str):
    """The API accepts any value for a combo (ComfyUI 0.3.64 does not validate V3 combos)."""
    if value not in options:
        raise ParaError(f"input '{input_name}' is {value!r}; use one of {', '.join(map(str, options))}.")
    return value


_cache: Dict[str, Tuple[tuple, ParaState]] = {}


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _file_key(path: str) -> tuple:
    """What tells one file from another at a path: a file replaced by another of the same size
    and mtime (``cp -p``, ``rsync -a``, a backup restored) has a new inode or at least a new
    ctime, which no tool can set back. A PEFT adapter's weights are read with the
    adapter_config.json beside them (its decomposition method, its rank): that file counts too."""
    key = _stat_key(os.stat(path))
    found = core_peft.peft_paths(path)
    if found is not None and os.path.abspath(found[1]) == os.path.abspath(path):
        try:
            key += _stat_key(os.stat(found[0]))
        except OSError:
            pass
    return key


def load_para_cached(name: str) -> ParaState:
    path = folder_paths.get_full_path("para", name)
    if path is None:
        raise ParaError(f"PaRa file {name!r} not found in models/para ({', '.join(folder_paths.get_folder_paths('para'))}).")
    key = _file_key(path)
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
    return f"{path}:" + ":".join(map(str, _file_key(path)))


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
        return io.NodeOutput(apply_para(check_model(model), check_para(para), strength))


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
        check_model(model)
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
            states.append(check_para(p, f"para_{i}"))
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


# The name a save adds after the prefix's last part: "_00001_.safetensors".
SAVE_TAIL = len("_00001_.safetensors")
# ComfyUI's date/size variables in a prefix (folder_paths.get_save_image_path) and their widths.
_PREFIX_VARS = {"%year%": 4, "%month%": 2, "%day%": 2, "%hour%": 2, "%minute%": 2, "%second%": 2, "%width%": 1,
                "%height%": 1}


def _name_max(folder: str) -> int:
    """The longest file name (in bytes) the file system of ``folder`` takes (255 nearly everywhere)."""
    while folder and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    try:
        return int(os.pathconf(folder or ".", "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def check_prefix(prefix, folder: str, tail: int = SAVE_TAIL, input_name: str = "filename_prefix") -> str:
    """A file name prefix a file can be written under, checked before any work: text; no NUL
    (no file name can hold one); no lone surrogate (it cannot be encoded, it comes from broken
    text); every folder name and the final file name (the prefix's last part + ``tail`` bytes
    the save adds) within the file system's limit. Every error names the input."""
    if not isinstance(prefix, str):
        raise ParaError(f"input '{input_name}' is a {type(prefix).__name__}; give a text (a file name prefix).")
    if "\x00" in prefix:
        raise ParaError(f"input '{input_name}' {prefix!r:.80} contains a NUL character (\\x00), which no file name "
                        "can hold; remove it.")
    try:
        prefix.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParaError(f"input '{input_name}' contains a lone surrogate ({prefix[e.start]!r} at character {e.start}), "
                        "which cannot be written as a file name (it comes from broken text); remove it.") from None
    text = prefix
    for var, width in _PREFIX_VARS.items():
        text = text.replace(var, "0" * width)
    parts = [p for p in os.path.normpath(text).replace("\\", "/").split("/") if p not in ("", ".", "..")]
    limit = _name_max(folder)
    for part in parts[:-1]:
        n = len(os.fsencode(part))
        if n > limit:
            raise ParaError(f"input '{input_name}': the folder name {part[:40]!r}... is too long ({n} bytes; the file "
                            f"system takes at most {limit} per name); shorten it.")
    last = len(os.fsencode(parts[-1])) if parts else 0
    if last + tail > limit:
        raise ParaError(f"input '{input_name}' is too long: its last part is {last} bytes and the file name it gives "
                        f"would be {last + tail} bytes (the file system takes at most {limit}); use at most "
                        f"{limit - tail} bytes there (a non-ASCII character takes 2 to 4).")
    return prefix


def save_target(folder: str, prefix: str, input_name: str = "filename_prefix"):
    """(full folder, file name stem, first counter) for ``prefix`` inside ``folder``, through
    ComfyUI's own rules (subfolders, %date% variables, no way out of the folder)."""
    try:
        full_folder, filename, counter, _sub, _ = folder_paths.get_save_image_path(prefix, folder)
    except OSError as e:
        raise ParaError(f"input '{input_name}' {prefix!r:.80}: its folder cannot be made ({e.strerror}).") from None
    except Exception:
        raise ParaError(f"input '{input_name}' {prefix!r:.80} points outside {folder}; use a plain name or a "
                        "subfolder.") from None
    os.makedirs(full_folder, exist_ok=True)
    return full_folder, filename, counter


def _save_names(folder: str, prefix: str, ext: str = ".safetensors") -> List[str]:
    """The names a save under ``prefix`` may take, in order: ComfyUI's next counter, then the ones
    after it (<prefix>_NNNNN_<ext>). The save claims the first free one atomically
    (para_core.write.atomic_write, exclusive; claim_folder): two ComfyUIs sharing the folder never
    write over each other's files, even when both listed the folder at the same moment."""
    full_folder, filename, counter = save_target(folder, check_prefix(prefix, folder, len(f"_00001_{ext}")))
    return numbered(lambda n: os.path.join(full_folder, f"{filename}_{n:05}_{ext}"), counter)


def claim_folder(names: List[str]) -> str:
    """Make the first of ``names`` that no file or folder has, as a new empty folder, and return
    it: os.mkdir fails when the name exists, so no other writer ever writes into it."""
    for path in names:
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise NameTaken(f"{names[0]}: this name and the {len(names) - 1} after it are all taken")


def _write_into(kind: str, names: List[str], write, done: str) -> io.NodeOutput:
    """``write(names)`` claims the first free one of ``names`` (see _save_names) in models/<kind>
    and returns it; the node's output is the name relative to that folder."""
    folder = folder_paths.get_folder_paths(kind)[0]
    path = write(names)
    rel = os.path.relpath(path, folder)
    log.info("PaRa: %s %r", done, path)
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
        check_para(para)
        torch_dtype = DTYPES[check_choice(dtype, list(DTYPES), "dtype")]
        names = _save_names(folder_paths.get_folder_paths("para")[0], filename_prefix)
        return _write_into("para", names, lambda n: save_para(para, n, torch_dtype, exclusive=True), "saved")


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
        check_model(model)
        check_para(para)
        strength = check_strength(strength)
        if check_choice(format, list(EXPORT_FORMATS), "format") == "peft-deft":
            from .peft import export_peft_node
            names = _save_names(folder_paths.get_folder_paths("para")[0], filename_prefix, ext="")
            return export_peft_node(fit_to_model(para, model), model, names, strength,
                                    DTYPES[check_choice(dtype, list(DTYPES), "dtype")])
        names = _save_names(folder_paths.get_folder_paths("loras")[0], filename_prefix)
        state = fit_to_model(para, model)
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
        return _write_into("loras", names, lambda n: atomic_save_safetensors(tensors, n, md, exclusive=True),
                           "exported LoRA")


NODES = [PaRaLoader, PaRaLoad, PaRaApply, PaRaMerge, PaRaSave, PaRaExportLoRA]
