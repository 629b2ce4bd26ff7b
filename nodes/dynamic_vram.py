"""PaRa Trainer under ComfyUI 0.3x's memory management, the way its own TrainLoraNode copes
(comfy_extras/nodes_train.py).

- Dynamic VRAM: on CUDA, 0.3x loads models as ``ModelPatcherDynamic`` (weights streamed into a
  virtual buffer per layer, ``--disable-dynamic-vram`` turns it off). The trainer's layer forwards
  read each weight with ``comfy.ops.cast_bias_weight`` and keep it for the backward pass; a
  streamed weight's buffer may be reused by the next layer. TrainLoraNode trains on its own
  freshly loaded copy (``clone(force_deepcopy=True)``); PaRa Trainer does the same through the
  dynamic patcher's own non-dynamic delegate (``get_non_dynamic_delegate``: the model loaded
  again the classic way, kept for later runs), so every weight it reads stays put. The trained
  adapter is then applied to the model the user gave (ComfyUI patches dynamic models itself).
- ``comfy.model_management.in_training``: TrainingRun.run sets it while training, as TrainLoraNode
  does; 0.3x models and ops pick autograd-safe paths under it (RoPE kernels, INT8 fused kernels).
- Out of memory comes in several forms (torch.OutOfMemoryError, an AcceleratorError with an
  out-of-memory code after an async CUDA error): ``comfy.model_management.is_oom`` knows them.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management as mm

from ..para_core import ParaError

log = logging.getLogger("ComfyUI-PaRa")
OUT_OF_MEMORY = getattr(mm, "OOM_EXCEPTION", None) or getattr(torch, "OutOfMemoryError", None) \
    or torch.cuda.OutOfMemoryError


def is_dynamic(model) -> bool:
    f = getattr(model, "is_dynamic", None)
    return bool(f()) if callable(f) else False


def training_patcher(model):
    """The ModelPatcher PaRa Trainer trains on: ``model`` itself, or for a dynamic-VRAM model its
    non-dynamic delegate (same patches and options, weights loaded the classic way)."""
    if not is_dynamic(model):
        return model
    try:
        get = getattr(model, "get_non_dynamic_delegate", None)
        delegate = get() if callable(get) else model.clone(disable_dynamic=True)
    except Exception as e:
        raise ParaError(f"PaRa Trainer: this model is loaded with dynamic VRAM and could not be loaded again the "
                        f"classic way for training ({e}). Load it with a core loader (Load Checkpoint, Load "
                        "Diffusion Model), or start ComfyUI with --disable-dynamic-vram.") from None
    if is_dynamic(delegate):
        raise ParaError("PaRa Trainer: ComfyUI returned a dynamic-VRAM copy where a classic one was asked for; "
                        "start ComfyUI with --disable-dynamic-vram to train.")
    log.info("PaRa: the model uses dynamic VRAM; training on its classic (non-dynamic) copy, "
             "as ComfyUI's own trainer does")
    return delegate


def is_out_of_memory(e: BaseException) -> bool:
    check = getattr(mm, "is_oom", None)
    if callable(check):
        try:
            return bool(check(e))
        except Exception:  # the check itself must never hide the error being handled
            pass
    return isinstance(e, OUT_OF_MEMORY)
