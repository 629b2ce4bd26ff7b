"""Trainer state: what makes a resumed run continue exactly where it stopped.

A checkpoint is two files side by side in ``models/para``:

    <name>.safetensors   a complete PaRa file (B of every layer, metadata); usable on its own
    <name>.trainer.pt    optimizer state, step, loss history, the run's settings (this module)

The PaRa file alone warm-starts a new run from its B; with its ``.trainer.pt`` the run resumes
exactly (same optimizer moments, same per-step randomness, since that is derived from
(seed, step) and not from a global RNG). Both are written atomically.
"""
from __future__ import annotations

import os
from typing import Any, Dict

import torch

from .errors import ParaError
from .write import atomic_write

__all__ = ["TRAINER_STATE_VERSION", "trainer_state_path", "save_trainer_state", "load_trainer_state"]

TRAINER_STATE_VERSION = 1
SUFFIX = ".trainer.pt"


def trainer_state_path(para_path: str) -> str:
    """``x.safetensors`` -> ``x.trainer.pt`` (the trainer state that belongs to a PaRa file)."""
    root, ext = os.path.splitext(os.fspath(para_path))
    return (root if ext == ".safetensors" else os.fspath(para_path)) + SUFFIX


def save_trainer_state(state: Dict[str, Any], path: str) -> str:
    """torch.save to a temporary file in the same folder, then rename (never half-written)."""
    return atomic_write(path, lambda tmp: torch.save(dict(state, version=TRAINER_STATE_VERSION), tmp), SUFFIX)


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
