"""Trainer state: what makes a resumed run continue exactly where it stopped.

A checkpoint is two files side by side in ``models/para``:

    <name>.safetensors   a complete PaRa file (B of every layer, metadata); usable on its own
    <name>.trainer.pt    optimizer state, step, loss history, the run's settings (this module)

The PaRa file alone warm-starts a new run from its B; with its ``.trainer.pt`` the run resumes
exactly (same optimizer moments, same per-step randomness, since that is derived from
(seed, step) and not from a global RNG). Both are written atomically.
"""
from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, Optional, Sequence

import torch

from .errors import ParaError
from .write import atomic_write

__all__ = ["TRAINER_STATE_VERSION", "trainer_state_path", "save_trainer_state", "load_trainer_state",
           "check_optimizer_state", "check_scaler_state"]

TRAINER_STATE_VERSION = 1
SUFFIX = ".trainer.pt"


def trainer_state_path(para_path: str) -> str:
    """``x.safetensors`` -> ``x.trainer.pt`` (the trainer state that belongs to a PaRa file)."""
    root, ext = os.path.splitext(os.fspath(para_path))
    return (root if ext == ".safetensors" else os.fspath(para_path)) + SUFFIX


def save_trainer_state(state: Dict[str, Any], path: str, exclusive: bool = False) -> str:
    """torch.save to a temporary file in the same folder, then rename (never half-written); with
    ``exclusive`` an existing file is never replaced (NameTaken, see write.atomic_write)."""
    return atomic_write(path, lambda tmp: torch.save(dict(state, version=TRAINER_STATE_VERSION), tmp), SUFFIX,
                        exclusive=exclusive)


def load_trainer_state(path: str) -> Dict[str, Any]:
    """Load a ``.trainer.pt`` (tensors, numbers, strings only: ``weights_only`` loading, so a
    file from elsewhere cannot run code). Raises ParaError naming the file."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ParaError(f"{path}: unreadable trainer state ({e}); delete it to warm-start from the PaRa file alone.") from None
    if not isinstance(state, dict) or "step" not in state or "layers" not in state:
        raise ParaError(f"{path}: not a PaRa trainer state (no step/layers); delete it to warm-start from the PaRa file alone.")
    _check_fields(state, path)
    if state["version"] > TRAINER_STATE_VERSION:
        raise ParaError(f"{path}: trainer state version {state.get('version')} is newer than this pack understands "
                        f"({TRAINER_STATE_VERSION}); update ComfyUI-PaRa.")
    return state


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field: (check, what it must be); optional fields may be missing (older files) or None.
_FIELDS = {
    "step": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
    "layers": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, str) for x in v),
               "a non-empty list of layer names"),
    "version": (lambda v: _is_int(v), "a whole number"),
}
_OPTIONAL = {
    "loss_history": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                                     for x in v), "a list of numbers"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("state", {}), dict)
                  and isinstance(v.get("param_groups", []), list), "an optimizer state_dict"),
    "optimizer_name": (lambda v: isinstance(v, str), "a string"),
    "scaler": (lambda v: isinstance(v, dict), "a GradScaler state_dict"),
    "settings": (lambda v: isinstance(v, dict), "a dict"),
    "data_fingerprint": (lambda v: isinstance(v, str), "a string"),
}


def _check_fields(state: Dict[str, Any], path) -> None:
    """Every field the trainer reads has the type it expects: a hand-edited or foreign file is a
    clear error naming the field, not a TypeError deep inside the run."""
    state.setdefault("version", 0)
    for key, (ok, want) in _FIELDS.items():
        if not ok(state.get(key)):
            raise ParaError(f"{path}: field '{key}' is {state.get(key)!r:.80}, it must be {want}. The trainer state is "
                            "damaged or not from this pack; delete it to warm-start from the PaRa file alone.")
    for key, (ok, want) in _OPTIONAL.items():
        if state.get(key) is not None and not ok(state[key]):
            raise ParaError(f"{path}: field '{key}' is {state[key]!r:.80}, it must be {want}. The trainer state is "
                            "damaged or not from this pack; delete it to warm-start from the PaRa file alone.")
    history = state.get("loss_history")
    if history is not None and len(history) > state["step"]:
        raise ParaError(f"{path}: field 'loss_history' has {len(history)} entries but 'step' is {state['step']}; the "
                        "trainer state is damaged. Delete it to warm-start from the PaRa file alone.")


# ------------------------------------------------------------------------- optimizer and scaler

_DAMAGED = "The trainer state is damaged or not from this pack; delete it to warm-start from the PaRa file alone."


def _damaged(path, what: str) -> ParaError:
    return ParaError(f"{path}: {what}. {_DAMAGED}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same_kind(value, default) -> bool:
    """A hyperparameter has the kind of value the optimizer's own default has: a flag stays a
    bool (``amsgrad="yes"`` is truthy and would silently change the run), a number a finite
    number, a tuple of numbers a tuple as long; a default of None (foreach, fused) takes None or
    a bool."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if default is None:
        return value is None or isinstance(value, bool)
    if _is_number(default) or isinstance(default, torch.Tensor):
        return (_is_number(value) and math.isfinite(value)) or (
            isinstance(value, torch.Tensor) and value.numel() == 1 and bool(torch.isfinite(value).all()))
    if isinstance(default, (tuple, list)):
        return (isinstance(value, (tuple, list)) and len(value) == len(default)
                and all(_same_kind(v, d) for v, d in zip(value, default)))
    return type(value) is type(default)


def check_optimizer_state(opt_state: Any, optimizer_cls, shapes: Sequence[Sequence[int]], path,
                          names: Optional[Sequence[str]] = None) -> None:
    """Check an optimizer ``state_dict`` as a whole before a run resumes from it: every torch
    optimizer accepts a damaged one in ``load_state_dict`` and fails (or silently misbehaves)
    only at the first step. ``shapes``: the shapes of the run's parameters, in the optimizer's
    order; ``names`` (same order) name them in messages. Raises ParaError naming ``path``.

    It checks the structure (one parameter group holding every tensor, one state entry per
    tensor), every hyperparameter against the kind of the optimizer's own default and against
    the optimizer's own range checks (its constructor), every state entry against what a fresh
    optimizer of that kind holds after one step (keys, shapes, floating point, finite), and then
    loads a copy into a scratch optimizer over zero tensors of those shapes and takes one step:
    it must run and leave every tensor finite."""
    names = list(names) if names is not None else [f"tensor {i}" for i in range(len(shapes))]
    shapes = [tuple(int(d) for d in s) for s in shapes]
    kind = optimizer_cls.__name__
    if not isinstance(opt_state, dict):
        raise _damaged(path, f"its optimizer state is a {type(opt_state).__name__}, not a {kind} state_dict")
    groups, state = opt_state.get("param_groups"), opt_state.get("state")
    if not isinstance(groups, list) or not isinstance(state, dict):
        raise _damaged(path, f"its optimizer state has no 'param_groups' list and 'state' dict ({kind} state_dict)")
    if len(groups) != 1 or not isinstance(groups[0], dict):
        raise _damaged(path, f"its optimizer state has {len(groups)} parameter groups; the PaRa Trainer's {kind} "
                             "has exactly one")
    group = groups[0]
    params = group.get("params")
    if not isinstance(params, list) or params != list(range(len(shapes))):
        raise _damaged(path, f"its parameter group lists the tensors {params!r:.80}; the run has {len(shapes)} "
                             f"(0..{len(shapes) - 1})")

    def scratch():
        return [torch.zeros(s, requires_grad=True) for s in shapes]

    # What the optimizer itself has: its defaults (the kind of every hyperparameter) and, after
    # one step, the state entries it keeps per tensor.
    fresh = optimizer_cls(scratch(), lr=1e-3)
    defaults = {k: v for k, v in fresh.param_groups[0].items() if k != "params"}
    for key, value in group.items():
        if key == "params" or key not in defaults:
            continue  # keys this torch does not know are ignored by the optimizer
        if not _same_kind(value, defaults[key]):
            raise _damaged(path, f"its optimizer setting '{key}' is {value!r:.60}, a {kind} needs "
                                 f"{_kind_text(defaults[key])}")
    try:  # the optimizer's own range checks (betas in [0, 1), eps >= 0, ...)
        optimizer_cls(scratch(), **{k: v for k, v in group.items() if k in defaults and k in _init_args(optimizer_cls)})
    except (ValueError, TypeError, RuntimeError) as e:
        raise _damaged(path, f"its optimizer settings are not valid for {kind} ({e})") from None
    probe_params = scratch()
    probe = optimizer_cls(probe_params, **{k: v for k, v in group.items() if k in defaults and k in _init_args(optimizer_cls)})
    for p in probe_params:
        p.grad = torch.zeros_like(p)
    probe.step()
    expected = probe.state_dict()["state"]
    for i, name in enumerate(names):
        entry = state.get(i)
        if i not in expected and entry is None:
            continue  # an optimizer that keeps nothing per tensor (SGD without momentum)
        if not isinstance(entry, dict):
            raise _damaged(path, f"its optimizer holds no state for {name} (entry {i} is {entry!r:.40})")
        for key, want in expected.get(i, {}).items():
            if key not in entry:
                raise _damaged(path, f"its optimizer state of {name} has no '{key}'")
            got = entry[key]
            if key == "step":
                count = got.item() if isinstance(got, torch.Tensor) and got.numel() == 1 and got.dtype != torch.bool else got
                if not _is_number(count) or not math.isfinite(count) or count < 0:
                    raise _damaged(path, f"its optimizer state '{key}' of {name} is {got!r:.40}, it must be a count >= 0")
                continue
            if want is None:
                continue
            if not isinstance(got, torch.Tensor) or not got.is_floating_point() or tuple(got.shape) != tuple(want.shape):
                what = (f"shape {tuple(got.shape)} {str(got.dtype).replace('torch.', '')}" if isinstance(got, torch.Tensor)
                        else type(got).__name__)
                raise _damaged(path, f"its optimizer state '{key}' of {name} is {what}, it must be a floating-point "
                                     f"tensor of shape {tuple(want.shape)}")
            if not bool(torch.isfinite(got).all()):
                raise _damaged(path, f"its optimizer state '{key}' of {name} contains NaN or Inf")
    extra = [k for k in state if k not in range(len(shapes))]
    if extra:
        raise _damaged(path, f"its optimizer state has an entry {extra[0]!r:.40} that belongs to no tensor")
    # Finally what the run will do: load a copy and take one step on zero gradients.
    run_params = scratch()
    trial = optimizer_cls(run_params, lr=1e-3)
    try:
        trial.load_state_dict(copy.deepcopy(opt_state))
        for p in run_params:
            p.grad = torch.zeros_like(p)
        trial.step()
    except Exception as e:
        raise _damaged(path, f"its {kind} state cannot be used ({type(e).__name__}: {e})") from None
    for name, p in zip(names, run_params):
        if not bool(torch.isfinite(p).all()):
            raise _damaged(path, f"its {kind} state turns {name} into NaN/Inf at the first step (e.g. a negative "
                                 "second moment)")


def _init_args(optimizer_cls):
    import inspect
    return set(inspect.signature(optimizer_cls.__init__).parameters) - {"self", "params"}


def _kind_text(default) -> str:
    if isinstance(default, bool):
        return "True or False"
    if default is None:
        return "None, True or False"
    if _is_number(default):
        return "a finite number"
    if isinstance(default, (tuple, list)):
        return f"{len(default)} finite numbers"
    return f"a {type(default).__name__}"


# GradScaler.state_dict(): what each field must be.
_SCALER_FIELDS = {
    "scale": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
    "growth_factor": (lambda v: _is_number(v) and math.isfinite(v) and v > 1, "a finite number > 1"),
    "backoff_factor": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1"),
    "growth_interval": (lambda v: _is_int(v) and v > 0, "a whole number > 0"),
    "_growth_tracker": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0"),
}


def check_scaler_state(scaler: Any, path, device_type: str = "cpu") -> None:
    """Check a GradScaler ``state_dict`` (fp16 runs): every field present with a sane value, and
    it loads into a scratch GradScaler. An empty one (a disabled scaler's) is fine."""
    if scaler is None or (isinstance(scaler, dict) and not scaler):
        return
    if not isinstance(scaler, dict):
        raise _damaged(path, f"its 'scaler' is a {type(scaler).__name__}, not a GradScaler state_dict")
    for key, (ok, want) in _SCALER_FIELDS.items():
        if key not in scaler:
            raise _damaged(path, f"its GradScaler state has no '{key}' (it has {', '.join(map(repr, scaler)) or 'nothing'})")
        if not ok(scaler[key]):
            raise _damaged(path, f"its GradScaler state '{key}' is {scaler[key]!r:.40}, it must be {want}")
    try:
        torch.amp.GradScaler(device_type).load_state_dict(dict(scaler))
    except Exception as e:
        raise _damaged(path, f"its GradScaler state cannot be loaded ({type(e).__name__}: {e})") from None
