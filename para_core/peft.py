"""PaRa as huggingface/peft ships it: the DEFT tuner with ``para=True``, read into a ParaState
and written from one. Plain json/safetensors/torch: neither peft nor ComfyUI is imported.

The format (peft >= 0.21, ``peft/tuners/deft``): a folder with ``adapter_config.json``
(``peft_type: DEFT``, ``r``, ``para``, ``decomposition_method``, ``target_modules``, ...) and
``adapter_model.safetensors`` with one ``<prefix><module path>.deft_P`` (out_features, r) per
adapted Linear layer (``<prefix>`` is ``base_model.model.`` for PeftModel.save_pretrained).
With ``para=True`` the layer computes W' = W - P_proj W, where

- ``decomposition_method = "qr"``:   P_proj = Q Q^T, Q = qr(P)  -> this pack's subject, B = P;
- ``decomposition_method = "relu"``: P_proj = P relu(P)^T      -> the general form U = P, V = relu(P).

``para=False`` (DEFT proper) adds an injection term Q_P R (``deft_R``), which is not PaRa: refused.
``alpha`` only scales that injection term, so it has no effect on a ``para=True`` file.
DEFT adapts Linear (and transformers' Conv1D) layers only, never Conv2d.

Layer names are the diffusers model's module paths. A state read from PEFT keeps them (metadata
``para.layer_names = diffusers``) until it meets a model: ``to_model_names`` renames them with a
map {diffusers module path: ComfyUI layer} that the caller takes from a maintained conversion
(inside ComfyUI: comfy.utils.unet_to_diffusers / comfy.lora.model_lora_keys_unet, nodes/peft.py;
on the command line: diffusers' own LDM -> diffusers UNet conversion, ``diffusers_unet_names``).
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

from .errors import ParaError  # standard library only, like this module's top (the CLI asks it before torch)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
P_SUFFIX = ".deft_P"
R_SUFFIX = ".deft_R"
# Key prefixes in front of the module path: PeftModel.save_pretrained, then the prefixes that
# diffusers' pipelines put in front of a component's adapter weights.
KEY_PREFIXES = ("base_model.model.", "unet.", "transformer.")
LAYER_NAMES = "para.layer_names"   # metadata: "diffusers" while the layer names are diffusers module paths
DIFFUSERS = "diffusers"
SOURCE_FORMAT = "para.source_format"
PEFT_FORMAT = "peft-deft"
DECOMPOSITIONS = ("qr", "relu")


# ------------------------------------------------------------------------------- finding the files

def peft_paths(path) -> Optional[Tuple[str, str]]:
    """(adapter_config.json, adapter_model.safetensors) when ``path`` names a PEFT adapter: its
    folder, its adapter_config.json, or a .safetensors with adapter_config.json beside it (or
    ``<name>.json``, for a file renamed to sit in models/para). None when it is not one.
    Standard library only (the CLI asks before it imports torch)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        config = os.path.join(path, CONFIG_NAME)
        return (config, os.path.join(path, WEIGHTS_NAME)) if os.path.isfile(config) else None
    folder, name = os.path.split(path)
    if name.endswith(".json"):
        return path, os.path.join(folder, WEIGHTS_NAME)
    if name.endswith(".safetensors"):
        for config in (os.path.join(folder, os.path.splitext(name)[0] + ".json"), os.path.join(folder, CONFIG_NAME)):
            if os.path.isfile(config):
                return config, path
    return None


def is_peft_folder(path) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def is_deft_key(key: str) -> bool:
    return key.endswith(P_SUFFIX) or key.endswith(R_SUFFIX)


def _module_path(key: str, suffix: str) -> str:
    path = key[: -len(suffix)]
    for p in KEY_PREFIXES:
        if path.startswith(p):
            return path[len(p):]
    return path


# ------------------------------------------------------------------------------- reading

def read_config(config_path: str, weights_path: str) -> dict:
    where = os.path.dirname(os.path.abspath(config_path))
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ParaError(f"{weights_path}: holds PEFT DEFT tensors (deft_P) but no {CONFIG_NAME} lies beside it; "
                        "the adapter's settings (para, decomposition_method) are in that file: copy it next to the "
                        "weights (or name it after them, <name>.json).") from None
    except (OSError, ValueError) as e:
        raise ParaError(f"{config_path}: not a readable PEFT adapter_config.json ({e}).") from None
    if not isinstance(cfg, dict):
        raise ParaError(f"{config_path}: not a PEFT adapter config (not a JSON object).")
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "DEFT":
        raise ParaError(f"{where}: a PEFT {peft_type or 'untyped'} adapter, not DEFT; this pack reads PEFT's DEFT "
                        "adapters with para=true (PaRa). Load LoRA-type adapters with ComfyUI's Load LoRA node.")
    if cfg.get("para") is not True:
        raise ParaError(f"{where}: a DEFT adapter with para={json.dumps(cfg.get('para', False))}: it adds DEFT's "
                        "injection term Q_P R (deft_R) to the subspace removal, W' = (I - P_proj) W + Q_P R. That term "
                        "is not PaRa and this pack does not support it; only para=true adapters (W' = W - P_proj W) load.")
    method = cfg.get("decomposition_method", "relu")
    if method not in DECOMPOSITIONS:
        raise ParaError(f"{where}: unknown decomposition_method {method!r}; PEFT's DEFT has 'qr' and 'relu'.")
    return cfg


def load_peft(path, device: str = "cpu"):
    """A PEFT DEFT (para=true) adapter as a ParaState with diffusers layer names: ``qr`` -> a
    subject (B = deft_P), ``relu`` -> merged (U = P, V = relu(P)), which is exactly PEFT's W' = W -
    P relu(P)^T W. Everything else is a ParaError that says what is not supported. The header
    guard, the tensor reader and the per-layer validation are those of every PaRa file (read.py)."""
    import torch
    from .read import check_layer_tensors, read_header, read_layers
    from .state import ParaState
    from .write import build_metadata

    found = peft_paths(path)
    if found is None:
        path = os.fspath(path)
        found = (os.path.join(os.path.dirname(path), CONFIG_NAME), path)
    config_path, weights_path = found
    folder = os.path.dirname(os.path.abspath(weights_path))
    if not os.path.isfile(weights_path):
        other = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, n))]
        hint = (f" It has {other[0]} (a pickle): re-save it with save_pretrained(..., safe_serialization=True)."
                if other else "")
        raise ParaError(f"{folder}: no {WEIGHTS_NAME} in this PEFT adapter folder.{hint}")
    cfg = read_config(config_path, weights_path)
    method = cfg.get("decomposition_method", "relu")
    groups = {}  # {diffusers module path: {"P": key}}
    for key in read_header(weights_path, what="PEFT adapter").keys:
        if key.endswith(P_SUFFIX):
            groups[_module_path(key, P_SUFFIX)] = {"P": key}
        elif key.endswith(R_SUFFIX):
            raise ParaError(f"{weights_path}: holds DEFT's injection matrix {key} although {CONFIG_NAME} says "
                            "para=true; this pack supports pure subspace removal (para=true, no deft_R) only.")
        else:
            raise ParaError(f"{weights_path}: holds {key}, which is not a DEFT projection (deft_P); trained "
                            "biases (bias='all'/'deft_only') and modules_to_save are not supported: only "
                            "deft_P tensors can be applied as PaRa.")
    if not groups:
        raise ParaError(f"{weights_path}: no deft_P tensors; not a PEFT DEFT adapter.")
    kind = "subject" if method == "qr" else "merged"
    stores: Dict[str, Dict[str, "torch.Tensor"]] = {"para_B": {}, "para_U": {}, "para_V": {}}
    where = f"{weights_path} (deft_P read as para_B)"  # the validator's messages name PaRa's tensors
    for layer, t in read_layers(weights_path, groups, device).items():
        # P is an (out, r) factor like para_B: checked (float8 read in float32) before relu sees it
        P = check_layer_tensors(where, layer, {"para_B": t["P"]}, "subject")[1]["para_B"]
        if kind == "subject":
            stores["para_B"][layer] = P
        else:
            stores["para_U"][layer], stores["para_V"][layer] = P, torch.relu(P)
    first = stores["para_B"] if kind == "subject" else stores["para_U"]
    ranks = {l: int(t.shape[1]) for l, t in first.items()}
    extra = {LAYER_NAMES: DIFFUSERS, SOURCE_FORMAT: PEFT_FORMAT, "para.peft_decomposition": method,
             "para.peft_config": json.dumps(cfg, sort_keys=True)}
    if cfg.get("base_model_name_or_path"):
        extra["para.peft_base_model"] = str(cfg["base_model_name_or_path"])
    md = build_metadata(kind, rank=int(cfg.get("r", max(ranks.values()))), ranks=ranks,
                        layers=_targets_text(cfg.get("target_modules")),
                        title=os.path.basename(folder.rstrip(os.sep)) or "PEFT DEFT adapter", extra=extra)
    return ParaState(kind=kind, B=stores["para_B"], U=stores["para_U"], V=stores["para_V"], metadata=md,
                     source=folder)


def _targets_text(targets) -> str:
    if isinstance(targets, (list, tuple, set)):
        return "peft target_modules: " + ", ".join(sorted(map(str, targets)))
    return f"peft target_modules: {targets}" if targets else "peft"


def has_diffusers_names(state) -> bool:
    return state.metadata.get(LAYER_NAMES) == DIFFUSERS


def merged_layer_names(states) -> Dict[str, str]:
    """The metadata a merge of ``states`` needs so that its names still get mapped: PEFT imports
    keep diffusers names until they meet a model, so a merge of only such states keeps the
    marker; a merge of diffusers-named with model-named states is refused (their names cannot be
    matched without the model)."""
    marked = [has_diffusers_names(st) for st in states]
    if all(marked):
        return {LAYER_NAMES: DIFFUSERS} if marked else {}
    if any(marked):
        peft_names = ", ".join(st.name for st, m in zip(states, marked) if m)
        raise ParaError(f"cannot merge {peft_names} (PEFT, with diffusers layer names) with adapters that name the "
                        "model's layers: the two kinds of names only meet through a model. Apply them one after the "
                        "other instead (two PaRa Loaders, or PaRa Apply twice).")
    return {}


def base_unknown_message(state) -> str:
    return (f"{state.name}: a PEFT DEFT adapter: it records no base fingerprint, so this pack cannot check that it "
            "was trained on this model's base weights"
            + (f" (PEFT says its base was {state.metadata['para.peft_base_model']})"
               if state.metadata.get("para.peft_base_model") else "") + ".")


def to_model_names(state, names: Mapping[str, str], family: str = "this model", hint: str = ""):
    """``state`` with its diffusers module paths renamed to the model's layers through ``names``
    ({diffusers module path: model layer}). A state with model names is returned as it is.
    A layer without a counterpart is a ParaError naming it."""
    if not has_diffusers_names(state):
        return state
    where = state.source or state.name
    mapping = {}
    for layer in state.layers:
        target = names.get(layer)
        if target is None:
            raise ParaError(f"{where}: layer {layer} (a diffusers/PEFT module name) has no counterpart in {family}. "
                            "The adapter was made for another model, or for a model whose diffusers names this pack "
                            f"cannot map{hint}.")
        mapping[layer] = target
    dup = len(set(mapping.values())) < len(mapping)
    if dup:
        raise ParaError(f"{where}: two diffusers layers map onto one layer of {family}; the adapter does not fit it.")
    out = state.renamed(mapping)
    out.metadata.pop(LAYER_NAMES, None)
    if "para.ranks" in out.metadata:
        out.metadata["para.ranks"] = json.dumps(out.ranks(), sort_keys=True)
    return out


# ------------------------------------------------------------------------------- the CLI's name map

def _layers_per_block(paths: Iterable[str]) -> int:
    """The one size diffusers' LDM UNet conversion needs: resnets per level. LDM input block i
    (i >= 1) is level (i-1) // (lpb+1); the last block of every level but the deepest is a
    downsampler (``input_blocks.<i>.0.op``)."""
    idx, ops = set(), set()
    for p in paths:
        parts = p.split(".")
        if len(parts) > 2 and parts[0] == "input_blocks" and parts[1].isdigit():
            idx.add(int(parts[1]))
            if parts[2] == "0" and len(parts) > 3 and parts[3] == "op":
                ops.add(int(parts[1]))
    if ops:
        return min(ops) - 1
    return max(idx) if idx else 0


def diffusers_unet_names(layers: Iterable[str]) -> Dict[str, str]:
    """{diffusers module path: layer} for an SD-style UNet whose layers (``diffusion_model.<LDM
    path>``, e.g. Checkpoint.layer_shapes()) are given, from diffusers' own single-file conversion
    (``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``, which only moves keys for
    UNets: it is run on names, not tensors). ParaError when diffusers is not installed; {} for a
    model that is not a UNet."""
    from .state import PREFIX
    try:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except Exception as e:
        raise ParaError("mapping a PEFT/diffusers adapter's layer names onto an LDM checkpoint needs the diffusers package "
                        f"on the command line ({type(e).__name__}: {e}); install it (pip install diffusers), or load "
                        "the adapter inside ComfyUI (PaRa Load / PaRa Loader), which maps the names itself.") from None
    paths = [l[len(PREFIX):] if l.startswith(PREFIX) else l for l in layers]
    if not any(p.startswith("input_blocks.") for p in paths):
        return {}
    fake = {}
    for p in paths:
        for leaf in ("weight", "bias"):  # names only; every value is the LDM path it came from
            fake[f"model.diffusion_model.{p}.{leaf}"] = f"{p}.{leaf}"
    config = {"layers_per_block": _layers_per_block(paths)}
    if any(p.startswith("label_emb.0.") for p in paths):
        config["addition_embed_type"] = "text_time"
    try:
        converted = convert_ldm_unet_checkpoint(fake, config)
    except Exception as e:
        raise ParaError(f"diffusers could not map this checkpoint's UNet names ({type(e).__name__}: {e}).") from None
    out = {}
    for dkey, lkey in converted.items():
        if isinstance(lkey, str) and dkey.endswith(".weight") and lkey.endswith(".weight"):
            out[dkey[: -len(".weight")]] = PREFIX + lkey[: -len(".weight")]
    return out


def resolve_for_checkpoint(state, layer_names: Iterable[str], family: str = "this checkpoint"):
    """The CLI's step before fitting: a diffusers-named state renamed onto the checkpoint's layers."""
    if not has_diffusers_names(state):
        return state
    return to_model_names(state, diffusers_unet_names(layer_names), family,
                          hint=" (the command line maps diffusers names for SD-style UNets, through diffusers' own "
                               "conversion; load other models' adapters in ComfyUI)")


# ------------------------------------------------------------------------------- writing

def deft_form(state, strength: float = 1.0, qr: bool = True) -> Tuple[str, Dict[str, "torch.Tensor"]]:
    """(decomposition_method, {layer: P}) such that PEFT's DEFT (para=true) gives exactly this
    pack's W' = W0 - s U (V^T W0) (the ranks still differ per layer; ``save_peft`` pads).

    - a subject at strength 1: ``qr`` with P = B (what PEFT would train), unless ``qr`` is False;
    - otherwise, where it exists, the ``relu`` form, since P relu(P)^T = U V^T holds for
      P = [c U, -c U] when V = c^2 U (relu(x) - relu(-x) = x), for P = sqrt(s) U when V = relu(U),
      and zero columns add nothing: a subject at strength s > 0 (U = V = Q), a PEFT relu import at
      s > 0, and every merge whose U V^T is symmetric positive semi-definite (sum and union merges
      of subjects at strengths >= 0: U V^T = X X^T, P = [X, -X], exact to float rounding);
    - else a ParaError (reference adapters, sequential merges, s <= 0)."""
    import torch
    from .functional import reference
    where = state.source or state.name
    s = float(strength)
    if state.kind == reference.KIND:
        raise ParaError(f"{where}: a reference-parametrization adapter (W0 - U D) has no DEFT form: PEFT's DEFT with "
                        "para=true is a projection, W - P_proj W. Export it as a LoRA instead.")
    if not math.isfinite(s) or s <= 0:
        raise ParaError(f"{where}: strength {s:g} has no PEFT DEFT form (para=true always removes a positive amount of "
                        "a subspace); export at a strength > 0, or as a LoRA.")
    if state.kind == "subject" and s == 1.0 and qr:
        return "qr", dict(state.B)
    out = {}
    for layer, (U, V) in state.factors().items():  # a subject's are (Q, Q), from one batched QR per shape
        if state.kind == "subject":
            X = U
        elif torch.equal(V, torch.relu(U)):
            out[layer] = math.sqrt(s) * U
            continue
        else:
            X = _psd_factor(U, V)
            if X is None:
                raise ParaError(f"{where}: layer {layer}: this merged adapter's U V^T is not a symmetric positive "
                                f"semi-definite map ({state.metadata.get('para.merge_mode') or 'general'} form), so "
                                "PEFT's DEFT (para=true, W - P relu(P)^T W) cannot express it. Export sum or union "
                                "merges of subjects at positive strengths, or a LoRA.")
        X = X * math.sqrt(s)
        out[layer] = torch.cat([X, -X], dim=1)
    return "relu", out


def _psd_factor(U, V, tol: float = 1e-5):
    """X with X X^T = U V^T when U V^T is symmetric positive semi-definite (a sum or union merge of
    projections at strengths >= 0), else None. In V's orthonormal basis Qv (V = Qv R, U = Qv A),
    U V^T = Qv (A R^T) Qv^T, and the k x k matrix A R^T is eigendecomposed."""
    import torch
    Qv, R = torch.linalg.qr(V, mode="reduced")
    A = Qv.t() @ U
    scale = max(float(U.norm()), 1e-30)
    if float((U - Qv @ A).norm()) > tol * scale:
        return None  # U leaves the span of V: not symmetric
    K = A @ R.t()
    if float((K - K.t()).norm()) > tol * max(float(K.norm()), 1e-30):
        return None
    lam, E = torch.linalg.eigh((K + K.t()) / 2)
    top = float(lam.abs().max()) if lam.numel() else 0.0
    if lam.numel() and float(lam.min()) < -tol * top:
        return None
    keep = lam > tol * top
    return (Qv @ E[:, keep]) * torch.sqrt(lam[keep])[None, :]


def peft_config(targets: Sequence[str], r: int, method: str, base_model: Optional[str] = None) -> dict:
    cfg = {"peft_type": "DEFT", "r": int(r), "target_modules": sorted(targets), "exclude_modules": None,
           "decomposition_method": method, "init_scale": 1.0, "alpha": None, "para": True, "fan_in_fan_out": False,
           "deft_dropout": 0.0, "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
           "bias": "none", "modules_to_save": None, "base_model_name_or_path": base_model, "revision": None,
           "task_type": None, "inference_mode": True}
    return cfg


def save_peft(state, folder: str, names: Mapping[str, str], shapes: Mapping[str, Sequence[int]],
              strength: float = 1.0, dtype=None, base_model: Optional[str] = None) -> dict:
    """Write ``state`` (model layer names) as a PEFT DEFT (para=true) adapter folder that
    ``PeftModel.from_pretrained`` loads on the diffusers model of the same base.

    ``names``: {model layer: diffusers module path}; ``shapes``: {model layer: weight shape}.
    Only Linear layers (2-D weights) are written: PEFT's DEFT has no Conv2d. Returns a report:
    {"decomposition", "r", "written", "left_out_conv", "left_out_unnamed"}. Both files are
    written atomically; nothing is written when the state has no DEFT form."""
    import torch
    from .functional.base import check_finite
    from .write import atomic_save_safetensors, atomic_write
    dtype = dtype or torch.float32
    where = state.source or state.name
    if has_diffusers_names(state):  # read from PEFT and never fitted: its names already are diffusers paths
        names = {l: l for l in state.layers}
        shapes = {l: (state.out_dim(l), 1) for l in state.layers}
    method, P = deft_form(state, strength)
    conv = sorted(l for l in P if len(tuple(shapes.get(l, (0, 0)))) > 2)
    unnamed = sorted(l for l in P if l not in conv and l not in names)
    written = [l for l in P if l not in conv and l not in unnamed and P[l].shape[1] > 0]
    if not written:
        raise ParaError(f"{where}: no Linear layer to write: PEFT's DEFT adapts Linear layers only, and this adapter has "
                        f"{len(conv)} conv layer(s)" + (f" and {len(unnamed)} layer(s) without a diffusers name" if unnamed
                                                     else "") + ".")
    reason = ""
    if method == "relu":
        reason = ("this merged adapter is not one subject" if state.kind == "merged"
                  and state.metadata.get("para.peft_decomposition") != "relu" else
                  "it came from a PEFT relu adapter" if state.kind == "merged" else f"strength {float(strength):g} is not 1")
    elif len({P[l].shape[1] for l in written}) > 1:
        # PEFT has one rank for every layer; zero columns keep a relu projection exact, never a qr one
        reason = "its layers have different ranks (" + ", ".join(
            str(k) for k in sorted({P[l].shape[1] for l in written})) + "), PEFT's DEFT has one"
        method, P = deft_form(state, strength, qr=False)
    r = max(P[l].shape[1] for l in written)
    tensors = {}
    for l in written:
        out_dim = int(P[l].shape[0])
        width = min(r, out_dim)  # PEFT caps r at out_features per layer
        if P[l].shape[1] > width:
            raise ParaError(f"{where}: layer {l} needs {P[l].shape[1]} DEFT columns but has only {out_dim} outputs; "
                            "PEFT cannot hold it at one rank for every layer.")
        pad = torch.zeros(out_dim, width - P[l].shape[1], dtype=P[l].dtype, device=P[l].device)
        t = torch.cat([P[l], pad], dim=1).to(dtype).contiguous().cpu()
        key = f"base_model.model.{names[l]}{P_SUFFIX}"
        check_finite(t, where, f"the PEFT tensor {key}")
        tensors[key] = t
    cfg = peft_config([names[l] for l in written], r, method, base_model)
    os.makedirs(folder, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(folder, WEIGHTS_NAME), {"format": "pt"})
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(os.path.join(folder, CONFIG_NAME), write_json)
    return {"decomposition": method, "reason": reason, "r": r, "written": written, "left_out_conv": conv,
            "left_out_unnamed": unnamed, "folder": folder}


def report_text(report: dict, strength: float = 1.0) -> str:
    """One paragraph for the CLI and the node: what was written and what was left out."""
    method = report["decomposition"]
    why = ""
    if method == "relu" and report.get("reason"):
        why = f" (the relu form, which expresses it exactly: {report['reason']})"
    text = (f"PEFT DEFT adapter (para=true, decomposition_method={method}, r={report['r']}){why}: "
            f"{len(report['written'])} Linear layer(s)")
    if report["left_out_conv"]:
        text += (f"; left out {len(report['left_out_conv'])} conv layer(s), which PEFT's DEFT cannot adapt: "
                 + ", ".join(report["left_out_conv"]))
    if report["left_out_unnamed"]:
        text += (f"; left out {len(report['left_out_unnamed'])} layer(s) with no diffusers name: "
                 + ", ".join(report["left_out_unnamed"]))
    return text
