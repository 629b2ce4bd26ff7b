"""Fitting an adapter to a model: the base fingerprint, layer names (the kohya spelling), and
the check that every layer exists and has the shapes of the model's weight (docs/spec.md
section 2: a file that does not fit is an error naming the first bad layer, nothing is patched;
another fingerprint is a warning)."""
from __future__ import annotations

import hashlib
import warnings
from typing import Iterable, Mapping, Optional, Sequence

import torch

from .errors import FingerprintWarning, ParaError
from .functional.base import inner_size
from .state import KOHYA_PREFIX, PREFIX, ParaState

__all__ = ["fingerprint", "kohya_name", "resolve_layers", "check_layer_fits", "check_fits", "check_fingerprint"]


def fingerprint(weights: Mapping[str, torch.Tensor], samples: int = 16) -> str:
    """A cheap fingerprint of the base weights an adapter was made against.

    Hashes, for every adapted layer (sorted), its shape and ``samples`` evenly spaced entries
    rounded to fp16 (so fp32 and fp16 copies of one base agree; a bf16 copy, which keeps
    fewer mantissa bits, does not: it gets the mismatch warning).
    A value may also be a safetensors slice (``safe_open(...).get_slice(key)``): then only the
    sampled entries are read from disk, so a checkpoint's fingerprint costs milliseconds.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        shape = tuple(w.get_shape()) if hasattr(w, "get_shape") else tuple(w.shape)
        n = 1
        for d in shape:
            n *= int(d)
        k = min(samples, n)
        # integer arithmetic: a float linspace can round the last index past the end
        idx = [i * (n - 1) // max(k - 1, 1) for i in range(k)]
        if hasattr(w, "get_shape"):
            vals = torch.stack([_slice_entry(w, shape, i) for i in idx])
        else:
            vals = w.reshape(-1)[torch.tensor(idx, device=w.device)]
        h.update(_norm_name(name).encode())
        h.update(str(shape).encode())
        h.update(vals.detach().float().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _slice_entry(sl, shape, flat_index: int) -> torch.Tensor:
    """One entry of a safetensors slice, by flat (row-major) index, reading only that entry."""
    sel = []
    for d in reversed(shape):
        sel.append(flat_index % d)
        flat_index //= d
    sel.reverse()
    return sl[tuple(slice(i, i + 1) for i in sel)].reshape(())


def _norm_name(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


def kohya_name(layer: str) -> str:
    """``diffusion_model.a.b`` (or ``a.b``) -> ``lora_unet_a_b``; a kohya name stays as it is."""
    if layer.startswith(KOHYA_PREFIX):
        return layer
    path = layer[len(PREFIX):] if layer.startswith(PREFIX) else layer
    return KOHYA_PREFIX + path.replace(".", "_")


def resolve_layers(state: ParaState, model_layers: Iterable[str]) -> ParaState:
    """Map kohya-style ``lora_unet_*`` names (and bare paths) onto the model's layer names."""
    lookup = {}
    for l in model_layers:
        lookup[l] = l
        lookup[kohya_name(l)] = l
        if l.startswith(PREFIX):
            lookup[l[len(PREFIX):]] = l
    mapping = {l: lookup[l] for l in state.layers if l in lookup and lookup[l] != l}
    return state.renamed(mapping) if mapping else state


def check_layer_fits(where: str, layer: str, kind: str, factor_shapes: Mapping[str, Sequence[int]],
                     weight_shape: Sequence[int], family: str = "this model", base_arch: str = "") -> None:
    """One layer of an adapter against the weight it adapts: output channels, a subject's rank at
    most what the layer allows, a reference D with the weight's in*kh*kw columns.
    ``factor_shapes``: {"para_B": shape} / {"para_U": ..., "para_V": ...} / {"para_U": ..., "para_D": ...}.
    Shared by check_fits and the ComfyUI adapters (patching and bypass)."""
    shape = tuple(int(d) for d in weight_shape)
    first = tuple(factor_shapes["para_B" if kind == "subject" else "para_U"])
    out_dim, rank = int(first[0]), int(first[1])
    other = (f"This adapter was made for another model (its base: {base_arch or 'unknown'}); pick the checkpoint it "
             "was trained on.")
    if len(shape) < 2 or shape[0] != out_dim:
        raise ParaError(f"{where}: layer {layer} has {out_dim} output channels in the file but the weight in {family} "
                        f"has shape {shape}. {other}")
    inner = inner_size(shape)
    if kind == "subject" and rank > min(shape[0], inner):
        raise ParaError(f"{where}: layer {layer} has rank {rank}, more than the layer allows ({min(shape[0], inner)}).")
    if kind == "reference" and int(tuple(factor_shapes["para_D"])[1]) != inner:
        raise ParaError(f"{where}: layer {layer}: para_D has {tuple(factor_shapes['para_D'])[1]} input columns but the "
                        f"weight in {family} has shape {shape} ({inner} = in*kh*kw). {other}")


def check_fits(state: ParaState, shapes: Mapping[str, Sequence[int]], family: str = "this model") -> ParaState:
    """Check every layer exists in the model and has matching shapes.

    ``shapes``: {layer name: weight shape} of the model. Returns the state with names resolved.
    Raises ParaError naming the file and the first layer that does not fit.
    """
    where = state.source or state.name
    base_arch = state.metadata.get("para.base_arch", "")
    state = resolve_layers(state, shapes)
    for layer in state.layers:
        if layer not in shapes:
            raise ParaError(
                f"{where}: layer {layer} does not exist in {family}. This adapter was made for another model "
                f"(its base: {base_arch or 'unknown'}); pick the checkpoint it was trained on.")
        factor_shapes = {n: tuple(t.shape) for n, t in state.tensors(layer).items()}
        check_layer_fits(where, layer, state.kind, factor_shapes, shapes[layer], family, base_arch)
    return state


def check_fingerprint(state: ParaState, model_fingerprint: str) -> Optional[str]:
    """Warn (and return the message) when the file was made against other base weights."""
    theirs = state.metadata.get("para.base_fingerprint", "")
    if theirs and model_fingerprint and theirs != model_fingerprint:
        msg = (f"{state.name}: made against base weights with fingerprint {theirs}, this model has {model_fingerprint}. "
               "Fine for fine-tunes of the same base; results may differ.")
        warnings.warn(msg, FingerprintWarning, stacklevel=2)
        return msg
    return None
