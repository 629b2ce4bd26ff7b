"""The training loop behind the PaRa Trainer node.

It reaches the model the way ComfyUI's own trainer does (comfy_extras/nodes_train.py): a
``Guider_Basic`` loads the model and prepares the conditioning, and a ``Sampler`` subclass runs
the loop instead of sampling. Noise, sigmas and the loss come from the model's own
``model_sampling``, so eps, v-prediction and flow models train the same way.

What it trains is a ``LayerForwards`` (nodes/adapters/: ``ParaForward`` trains B, ``ReferenceForward``
U and D, the reference code's parametrization). Each adapted layer's ``forward`` is replaced for the
run (and restored in a ``finally``) by para_core's forward on the layer's own weight: no copy of
the base weights is made per step, and no full weight gradient is ever formed.
Every step's randomness (images, noise, sigmas) is drawn from generators seeded by
(seed, step), never from the global RNG: a run resumed at step k continues exactly like one that
never stopped.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import comfy.model_management as mm
import comfy.ops
import comfy.samplers
import comfy.utils
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..para_core.errors import ParaError
from .dynamic_vram import is_out_of_memory

try:  # 0.3x: quantized checkpoints (fp8/int8 "mixed precision" files) hold QuantizedTensor weights
    from comfy.quant_ops import QuantizedTensor
except ImportError:  # 0.3.64
    QuantizedTensor = None

log = logging.getLogger("ComfyUI-PaRa")

OPTIMIZERS = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam, "SGD": torch.optim.SGD,
              "RMSprop": torch.optim.RMSprop}
TRAINING_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Timesteps are drawn uniformly in ComfyUI's "percent" of the schedule; the very ends map to
# sigma = 0 (nothing to learn, and a division by zero in the loss) or to an infinite sigma.
PERCENT_MARGIN = 1e-3
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
# What to change when the loss goes NaN depends on what the run computed in.
NAN_DTYPE_ADVICE = {"fp16": "use training_dtype bf16 or fp32 instead of fp16, or ",
                    "bf16": "try training_dtype fp32, or ", "fp32": "or "}
OOM_ADVICE = ("out of memory while training. Try a smaller batch_size, turn gradient_checkpointing on, "
              "a lower rank or fewer layers, smaller latents, or training_dtype bf16/fp16.")


@dataclass
class TrainSettings:
    steps: int
    learning_rate: float
    optimizer: str = "AdamW"
    batch_size: int = 1
    seed: int = 0
    dtype: str = "bf16"
    gradient_checkpointing: bool = False
    save_every: int = 0


class NonFiniteLoss(Exception):
    def __init__(self, step: int, what: str):
        self.step, self.what = step, what
        super().__init__(f"{what} is NaN/Inf at step {step}")


# ------------------------------------------------------------------------- determinism

def generator_for(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A CPU generator for (seed, purpose, index), independent of every other draw."""
    digest = hashlib.sha256(f"{int(seed)}:{purpose}:{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@functools.lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> tuple:
    return tuple(torch.randperm(n, generator=generator_for(seed, "epoch", epoch)).tolist())


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> List[int]:
    """The images of step ``step`` (0-based): consecutive slices of one shuffled order per epoch,
    so every image is seen once per epoch, and step k's batch depends only on (seed, k)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        out.append(_epoch_order(seed, epoch, n)[i])
    return out


# ------------------------------------------------------------------------- the loss

def check_trainable(model_sampling) -> None:
    """A clear error for models whose sampling object lacks what training needs."""
    missing = [a for a in ("percent_to_sigma", "noise_scaling", "calculate_denoised") if not hasattr(model_sampling, a)]
    if missing:
        raise ParaError(f"this model's sampling ({type(model_sampling).__name__}) has no {', '.join(missing)}; "
                        "PaRa Trainer cannot derive a training loss for it.")
    sigma = torch.tensor([float(model_sampling.percent_to_sigma(0.5))])
    c = output_scale(model_sampling, sigma, 4)
    if not torch.isfinite(c).all() or (c == 0).any():
        raise ParaError(f"this model's sampling ({type(model_sampling).__name__}) gives no usable training target; "
                        "PaRa Trainer cannot train it.")


def output_scale(model_sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """c(sigma) in denoised = a(sigma) * x + c(sigma) * model_output.

    ComfyUI's calculate_denoised is affine in the model output for every model type, so the
    output for model_output = 1 and x = 0 is c: -sigma for eps and flow models, the v-prediction
    factor for v models, 1 for x0 models."""
    shape = (sigma.shape[0],) + (1,) * (ndim - 1)
    ones = torch.ones(shape, dtype=torch.float32, device=sigma.device)
    return model_sampling.calculate_denoised(sigma.float(), ones, torch.zeros_like(ones)).float()


def diffusion_loss_sum(model_sampling, denoised, x0, sigma) -> torch.Tensor:
    """Sum of squared errors in the model's own output space: (denoised - x0) / c is the error of
    the predicted eps (eps models), v (v-prediction) or velocity (flow models), i.e. each
    family's standard training loss, from nothing but the model's sampling object."""
    err = (denoised.float() - x0.float()) / output_scale(model_sampling, sigma, x0.dim())
    return err.square().sum()


# ------------------------------------------------------------------------- the adapted layers

def dequantize_tensor(w: torch.Tensor) -> torch.Tensor:
    """A QuantizedTensor's float value; any other tensor unchanged."""
    if QuantizedTensor is not None and isinstance(w, QuantizedTensor):
        return w.dequantize()
    return w


def _weight_and_bias(module, x):
    """The layer's weight and bias as its own forward would use them: ComfyUI's cast ops (dtype
    casting, low-VRAM offload, patches applied on the fly), or the plain tensors."""
    if hasattr(module, "weight_function"):
        W0, b = comfy.ops.cast_bias_weight(module, x)
        return dequantize_tensor(W0), b  # a quantized layer's cast may hand back its QuantizedTensor
    b = module.bias.to(x.dtype) if module.bias is not None else None
    return module.weight.to(x.dtype), b


_MISSING = object()


class LayerForwards:
    """What a TrainingRun trains: forward overrides of the adapted layers, put in place by
    install() and taken out exactly by remove(). Subclasses (nodes/adapters/: ParaForward,
    ReferenceForward) give parameters() and _forward_for(name, module)."""

    def __init__(self, modules: Dict[str, torch.nn.Module]):
        self.modules = modules
        self._saved: Dict[str, object] = {}

    def parameters(self) -> List[torch.nn.Parameter]:
        raise NotImplementedError

    def prepare_step(self) -> None:
        pass

    def install(self) -> None:
        for name, module in self.modules.items():
            self._saved[name] = module.__dict__.get("forward", _MISSING)
            module.forward = self._forward_for(name, module)

    def remove(self) -> None:
        for name, module in self.modules.items():
            prev = self._saved.pop(name, _MISSING)
            if prev is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = prev

    def _forward_for(self, name: str, module: torch.nn.Module):
        raise NotImplementedError


class GradientCheckpointing:
    """Recompute each block's activations in the backward pass instead of keeping them: the
    top-most non-container modules of the diffusion model (ResBlocks, transformer blocks, ...)
    run under torch.utils.checkpoint. Less memory, about a third more time."""

    def __init__(self, root: torch.nn.Module):
        self.modules = list(self._blocks(root))
        self._saved = []

    @staticmethod
    def _blocks(module):
        for child in module.children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
                yield from GradientCheckpointing._blocks(child)
            elif any(True for _ in child.parameters()):
                yield child

    def install(self):
        for m in self.modules:
            inner = m.forward
            self._saved.append((m, m.__dict__.get("forward", _MISSING)))

            def forward(*args, _inner=inner, **kwargs):
                # The forward runs on the caller's tensors (blocks may update them in place, as
                # Flux's do: x += ..., and the caller may rely on it); the recompute in the
                # backward pass runs on copies taken before, so it sees the same inputs.
                def copy(x):
                    return x.clone() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

                first = [True]

                def run(*a, **k):
                    if first[0]:
                        first[0] = False
                        return _inner(*args, **kwargs)
                    return _inner(*a, **k)
                return torch.utils.checkpoint.checkpoint(run, *(copy(x) for x in args), use_reentrant=False,
                                                         **{n: copy(x) for n, x in kwargs.items()})

            m.forward = forward

    def remove(self):
        while self._saved:
            m, prev = self._saved.pop()
            if prev is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.forward = prev


class NormInputCopies:
    """Norm layers get a copy of their input while training. ComfyUI's Flux blocks normalize their
    input and then update it in place (x += gate * out); the norm keeps that input for its
    backward pass, so autograd would refuse the step. A copy per norm costs one activation."""

    def __init__(self, root: torch.nn.Module):
        self.modules = [m for m in root.modules() if "Norm" in type(m).__name__]
        self._handles = []

    @staticmethod
    def _copy_input(module, args):
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return (args[0].clone(),) + tuple(args[1:])
        return None

    def install(self):
        self._handles = [m.register_forward_pre_hook(self._copy_input) for m in self.modules]

    def remove(self):
        while self._handles:
            self._handles.pop().remove()


def materialize_inference_tensors(module: torch.nn.Module) -> int:
    """Replace inference tensors by normal tensors with the same values, once per run.

    ComfyUI runs nodes under torch.inference_mode(), so a model loaded by a node may hold
    inference tensors, which autograd refuses to save for backward (every frozen layer after an
    adapted one saves its weight to pass the gradient on). Returns how many were replaced."""
    n = 0
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                n += 1
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()
                n += 1
    return n


def clone_conditioning(positive):
    """A deep copy of a CONDITIONING list with every tensor cloned (the node's inputs may be
    inference tensors, and ComfyUI's cond processing writes into the dicts)."""
    def clone(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if isinstance(v, dict):
            return {k: clone(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(clone(x) for x in v)
        return v
    return [[clone(c[0]), clone(c[1]) if len(c) > 1 else {}] for c in positive]


# ------------------------------------------------------------------------- the run

class _TrainingSampler(comfy.samplers.Sampler):
    """Called by the guider with the loaded model and processed conds; trains instead of sampling."""

    def __init__(self, run: "TrainingRun"):
        self.run = run

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.run.loop(model_wrap, extra_args)
        return torch.zeros_like(noise)


class TrainingRun:
    """One training run of the parameters of ``adapter`` (a LayerForwards such as ParaForward, or anything with
    parameters/prepare_step/install/remove) on ``model`` from ``start_step`` to ``settings.steps``.

    ``on_checkpoint(run, reason)`` is called at every ``save_every`` step, at the end (when
    save_every > 0), and when the run stops early (interrupt, NaN/Inf, out of memory, error)
    after at least one finished step; it returns the written path. ``on_step(run)`` is called
    after every finished step (progress)."""

    def __init__(self, model, latents, positive, adapter, settings: TrainSettings,
                 start_step: int = 0, optimizer_state=None, scaler_state=None, loss_history=None,
                 on_checkpoint: Optional[Callable[["TrainingRun", str], Optional[str]]] = None,
                 on_step: Optional[Callable[["TrainingRun"], None]] = None):
        self.model = model
        self.latents = latents
        self.positive = positive
        self.adapter = adapter
        self.settings = settings
        self.dtype = TRAINING_DTYPES[settings.dtype]
        self.device = model.load_device
        self.step = start_step  # steps finished so far
        self.start_step = start_step
        self.losses: List[float] = list(loss_history or [])
        self.on_checkpoint = on_checkpoint
        self.on_step = on_step
        self.last_checkpoint: Optional[str] = None
        self._saved_step = start_step
        self.step_times: List[float] = []
        params = adapter.parameters()
        self.optimizer = OPTIMIZERS[settings.optimizer](params, lr=settings.learning_rate)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
            # load_state_dict restores the saved run's learning rate; a resume may set a new one.
            for group in self.optimizer.param_groups:
                group["lr"] = settings.learning_rate
        self.save_errors: List[str] = []  # periodic checkpoints that could not be written
        # fp16 gradients underflow without loss scaling; B itself stays float32 (the master copy).
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        if self.scaler is not None and scaler_state:
            self.scaler.load_state_dict(scaler_state)

    # -- entry point --------------------------------------------------------------------

    def run(self) -> List[float]:
        with torch.inference_mode(False), torch.enable_grad():
            mp = self.model.clone()
            # Like ComfyUI's trainer: the model's ops compute in the training dtype (weights are
            # cast per layer only where their storage dtype differs).
            mp.set_model_compute_dtype(self.dtype)
            mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
            guider = Guider_Basic(mp)
            guider.set_conds(clone_conditioning(self.positive))
            shape = (self.settings.batch_size,) + tuple(self.latents[0].shape)
            # The guider only needs the batch shape; the dataset is handed to the loop directly.
            zeros = torch.zeros(shape)
            # ComfyUI >= 0.33 runs fused kernels without a backward (rope, rms+rope of Flux,
            # Lumina 2) unless this flag is set, as its own trainer sets it.
            was_training = getattr(mm, "in_training", None)
            mm.in_training = True
            try:
                guider.sample(zeros, zeros, _TrainingSampler(self), torch.ones(1), seed=self.settings.seed)
            finally:
                if was_training is None:
                    del mm.in_training
                else:
                    mm.in_training = was_training
        return self.losses

    # -- the loop (runs inside the guider, with the model loaded) ------------------------

    def loop(self, model_wrap, extra_args):
        base = model_wrap.inner_model
        ms = base.model_sampling
        check_trainable(ms)
        if isinstance(self.latents, torch.Tensor):
            data = base.process_latent_in(self.latents.to(self.device, torch.float32))
        else:  # images of different sizes: a list of (C, H, W) latents
            data = [base.process_latent_in(x[None].to(self.device, torch.float32))[0] for x in self.latents]
        conds = list(model_wrap.conds["positive"])
        replaced = materialize_inference_tensors(base)
        if replaced:
            log.info("PaRa: made %d inference-mode tensors trainable-safe (once per run)", replaced)
        grad_flags = {n: p.requires_grad for n, p in base.named_parameters()}
        base.requires_grad_(False)
        checkpointing = GradientCheckpointing(base.diffusion_model) if self.settings.gradient_checkpointing else None
        self.guider, self.checkpointing = model_wrap, checkpointing  # for on_step's previews (nodes/previews.py)
        norms = NormInputCopies(base.diffusion_model)
        self.adapter.install()
        norms.install()
        if checkpointing:
            checkpointing.install()
        try:
            self._steps(model_wrap, extra_args, ms, data, conds)
        finally:
            if checkpointing:
                checkpointing.remove()
            norms.remove()
            self.adapter.remove()
            for n, p in base.named_parameters():
                p.requires_grad_(grad_flags.get(n, False))
            model_wrap.conds["positive"] = conds
            self.optimizer.zero_grad(set_to_none=True)

    def _steps(self, model_wrap, extra_args, ms, data, conds):
        try:
            while self.step < self.settings.steps:
                mm.throw_exception_if_processing_interrupted()
                t0 = time.perf_counter()
                self._one_step(model_wrap, extra_args, ms, data, conds)
                self.step_times.append(time.perf_counter() - t0)
                if self.on_step:
                    self.on_step(self)
                every = self.settings.save_every
                if every > 0 and (self.step % every == 0 or self.step == self.settings.steps):
                    self._checkpoint("save_every" if self.step % every == 0 else "final")
        except mm.InterruptProcessingException:
            self._checkpoint("interrupted", early=True)
            raise
        except NonFiniteLoss as e:
            path = self._checkpoint("non-finite loss", early=True)
            if path:
                kept = f"The last good state (step {self._saved_step}) is saved in {path}."
            elif self.step:
                kept = f"No new step had finished; the last good state (step {self.step}) is the file it resumed from."
            else:
                kept = "No step had finished, so nothing was saved."
            raise ParaError(f"PaRa Trainer stopped: the {e.what} became NaN/Inf at step {e.step}. {kept} Lower "
                            f"learning_rate, {NAN_DTYPE_ADVICE[self.settings.dtype]}check the latents and "
                            "conditioning for NaN.") from None
        except ParaError:
            raise
        except Exception as e:
            if is_out_of_memory(e):  # every form ComfyUI knows (comfy.model_management.is_oom)
                path = self._checkpoint("out of memory", early=True)
                kept = f" The last finished step ({self._saved_step}) is saved in {path}." if path else ""
                raise ParaError(f"PaRa Trainer ran {OOM_ADVICE}{kept}") from e
            self._checkpoint("error", early=True)
            raise

    def _one_step(self, model_wrap, extra_args, ms, data, conds):
        k, s = self.step, self.settings
        n = len(data)
        g = generator_for(s.seed, "step", k)
        idx = batch_indices(s.seed, k, n, s.batch_size)
        mixed = not isinstance(data, torch.Tensor)  # images of different sizes, a list of (C, H, W)
        if mixed:
            x0 = [data[i] for i in idx]
            noise = [torch.randn(x.shape, generator=g).to(self.device) for x in x0]
        else:
            x0 = data[idx]
            noise = torch.randn(x0.shape, generator=g).to(self.device)
        pct = torch.rand(len(idx), generator=g, dtype=torch.float64) * (1 - 2 * PERCENT_MARGIN) + PERCENT_MARGIN
        sigma = torch.tensor([float(ms.percent_to_sigma(float(p))) for p in pct], dtype=torch.float32,
                             device=self.device)
        if mixed:
            xt = [ms.noise_scaling(sigma[j:j + 1], noise[j][None], x[None], False)[0] for j, x in enumerate(x0)]
        else:
            xt = ms.noise_scaling(sigma, noise, x0, False)
        # Images that share a conditioning (and a size) run as one batch; with one caption per
        # image each runs with its own (ComfyUI applies every cond of the list to the whole batch).
        groups: Dict[tuple, List[int]] = {}
        for j, i in enumerate(idx):
            groups.setdefault((i if len(conds) > 1 else 0, tuple(data[i].shape)), []).append(j)

        def rows(t, js, sel):  # the group's rows of the batch (a tensor, or a list of same-size images)
            return torch.stack([t[j] for j in js]) if mixed else t[sel]
        self.adapter.prepare_step()
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        total = None
        with autocast:
            for (c, _size), js in groups.items():
                model_wrap.conds["positive"] = [conds[c]]
                sel = torch.tensor(js, device=self.device)
                denoised = model_wrap(rows(xt, js, sel), sigma[sel], **extra_args)
                part = diffusion_loss_sum(ms, denoised, rows(x0, js, sel), sigma[sel])
                total = part if total is None else total + part
        loss = total / (sum(x.numel() for x in x0) if mixed else x0.numel())
        value = loss.item()
        if not math.isfinite(value):
            raise NonFiniteLoss(k + 1, "loss")
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        # Cancel between backward and update: the half-done step is dropped, B stays at step k.
        mm.throw_exception_if_processing_interrupted()
        params = self.adapter.parameters()
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
            self.scaler.update()
        else:
            if not _all_finite([p.grad for p in params if p.grad is not None]):
                raise NonFiniteLoss(k + 1, "gradient")
            before = [p.detach().clone() for p in params]
            self.optimizer.step()
            if not _all_finite(params):
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b)
                self._optimizer_broken = True
                raise NonFiniteLoss(k + 1, "update of B")
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(value)
        self.step = k + 1

    # -- checkpoints ---------------------------------------------------------------------

    _optimizer_broken = False

    @property
    def optimizer_state_valid(self) -> bool:
        """False after an update that had to be rolled back (the optimizer moments saw it)."""
        return not self._optimizer_broken

    def _checkpoint(self, reason: str, early: bool = False) -> Optional[str]:
        if self.on_checkpoint is None:
            return None
        if early and self.step == self._saved_step:
            return self.last_checkpoint  # nothing new since the last save
        if early and self.step == self.start_step:
            return None
        try:
            path = self.on_checkpoint(self, reason)
        except Exception as e:  # never let a failed save hide the reason the run stopped
            if early:
                log.error("PaRa: could not save a checkpoint after '%s': %r", reason, str(e))
                return None
            # A full disk or a name the file system refuses must not throw the run away: keep
            # training (the state stays in memory and is returned), retry at the next save.
            self.save_errors.append(f"step {self.step}: {e}")
            log.warning("PaRa: could not write the checkpoint of step %d (%r); training goes on, the next save "
                        "retries and the final result is returned in memory either way.", self.step, str(e))
            return None
        self.last_checkpoint, self._saved_step = path, self.step
        return path


def _all_finite(tensors) -> bool:
    tensors = [t.detach() for t in tensors]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors)
    return bool(torch.isfinite(torch.stack(norms)).all().item())
