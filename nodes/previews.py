"""Training previews for PaRa Trainer: every N steps one image sampled with the model being
trained, shown live on the node (ComfyUI's own sampler-preview channel: ProgressBar's preview
image) and returned at the end as an IMAGE batch (and as the node's preview images).

The preview runs between two training steps, inside the training loop, on the very ModelPatcher
the loop has loaded (a second ModelPatcher would make ComfyUI load another copy), with the
adapted layers' training forwards in place. It never touches what training depends on:

- B, the optimizer and the loss history are only read; Q is recomputed from the current B
  (the next step recomputes it anyway);
- the training draws its randomness from its own generators, and the preview's noise comes from
  a generator of its own; the global RNGs (CPU and CUDA, which some samplers and ComfyUI's
  prepare_noise use) are saved and restored around it (torch.random.fork_rng);
- no autograd graph (torch.no_grad), gradient checkpointing taken out for the preview and put back;
- the nested sampler's cleanup resets the model's current_patcher, which the training
  forward needs: it is put back.

Its time is measured apart from the step times (TrainingRun.step_times times the step only).
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import List, Optional

import torch
from comfy_api.latest import io, ui

import comfy.model_management as mm
import comfy.samplers

log = logging.getLogger("ComfyUI-PaRa")

PREVIEW_SAMPLER = "euler"
PREVIEW_SCHEDULER = "normal"
PIXELS_PER_LATENT = 8


def preview_inputs() -> list:
    """The trainer's optional preview inputs (added after its existing ones)."""
    return [
        io.Int.Input("preview_every", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="Sample one preview image every N steps with the model being trained (0 = off). "
                             "Previews never change the training: B is the same with and without them."),
        io.Conditioning.Input("preview_prompt", optional=True,
                              tooltip="The preview's conditioning (default: the first training caption)."),
        io.Conditioning.Input("preview_negative", optional=True,
                              tooltip="The preview's negative conditioning (default: the prompt zeroed out)."),
        io.Int.Input("preview_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     optional=True, tooltip="Seed of the preview's noise: the same for every preview, so they compare."),
        io.Int.Input("preview_steps", default=20, min=1, max=200, optional=True,
                     tooltip=f"Sampling steps per preview ({PREVIEW_SAMPLER}, {PREVIEW_SCHEDULER} schedule)."),
        io.Float.Input("preview_cfg", default=5.0, min=0.0, max=100.0, step=0.1, optional=True,
                       tooltip="CFG of the previews (1 = the prompt only)."),
        io.Vae.Input("preview_vae", optional=True,
                     tooltip="Decode previews with this VAE. Without it they are ComfyUI's fast latent-to-RGB "
                             "previews, at latent size."),
    ]


def preview_output():
    return io.Image.Output(display_name="previews", tooltip="The preview images, one per preview_every steps.")


class Previews:
    """The on_step companion. ``bar``: the trainer's ProgressBar (its preview argument is how a
    KSampler shows its live preview on the node)."""

    def __init__(self, every: int, positive, negative=None, seed: int = 0, steps: int = 20, cfg: float = 5.0,
                 vae=None, latent_shape=None, bar=None):
        self.every = int(every or 0)
        self.positive = positive
        self.negative = negative if negative is not None else zeroed(positive)
        self.seed, self.steps, self.cfg = int(seed), int(steps), float(cfg)
        self.vae = vae
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.bar = bar
        self.images: List[torch.Tensor] = []   # (H, W, 3) in [0, 1], one per preview
        self.steps_at: List[int] = []
        self.times: List[float] = []

    def __call__(self, run) -> None:
        if self.every <= 0 or run.step % self.every != 0:
            return
        t0 = time.perf_counter()
        latent = self.sample(run)
        image = self.decode(run, latent)
        self.times.append(time.perf_counter() - t0)
        self.images.append(image)
        self.steps_at.append(run.step)
        log.info("PaRa: preview at step %d in %.2f s", run.step, self.times[-1])
        if self.bar is not None:
            from PIL import Image
            pil = Image.fromarray((image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
            self.bar.update_absolute(run.step, None, ("JPEG", pil, max(pil.size)))

    # -- sampling ------------------------------------------------------------------------------

    def sample(self, run) -> torch.Tensor:
        outer = run.guider
        mp = outer.model_patcher
        base = mp.model
        shape = self.latent_shape or tuple(run.latents[0].shape)
        latent = torch.zeros((1,) + shape)
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(self.seed))
        devices = [run.device] if run.device.type == "cuda" else []
        saved_patcher = getattr(base, "current_patcher", None)
        checkpointing = getattr(run, "checkpointing", None)
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _suspended(checkpointing):
            run.adapter.prepare_step()  # Q of the B this step ended with
            guider = comfy.samplers.CFGGuider(mp)
            guider.set_conds(self.positive, self.negative)
            guider.set_cfg(self.cfg)
            sigmas = comfy.samplers.calculate_sigmas(mp.get_model_object("model_sampling"), PREVIEW_SCHEDULER,
                                                     self.steps)
            try:
                out = guider.sample(noise, latent, comfy.samplers.sampler_object(PREVIEW_SAMPLER), sigmas,
                                    disable_pbar=True, seed=self.seed)
            finally:
                if hasattr(base, "current_patcher"):
                    base.current_patcher = saved_patcher
        return out.float().cpu()

    def decode(self, run, latent: torch.Tensor) -> torch.Tensor:
        if self.vae is not None:
            with torch.no_grad():
                image = self.vae.decode(latent)
            _reload(run)  # decoding may have moved the training model off the device to make room
            image = image.reshape((-1,) + tuple(image.shape[-3:]))[0]
            return image.float().cpu()
        return latent_rgb(run.guider.model_patcher.model.latent_format, latent)

    # -- the node's output ------------------------------------------------------------------------

    def batch(self, fallback_hw=None) -> torch.Tensor:
        """The previews as one IMAGE batch (N, H, W, 3); an empty batch when there were none."""
        if not self.images:
            h, w = fallback_hw or (PIXELS_PER_LATENT, PIXELS_PER_LATENT)
            return torch.zeros(0, h, w, 3)
        return torch.stack(self.images)

    def ui(self, text: str, cls):
        """The node's UI: its text, and the previews as ComfyUI's preview images (temp files)."""
        if not self.images:
            return ui.PreviewText(text)
        return _TextAndImages(f"{text}\n{self.summary()}", ui.PreviewImage(self.batch(), cls=cls))

    def summary(self) -> str:
        if not self.times:
            return ""
        per = sum(self.times) / len(self.times)
        return f"{len(self.times)} preview(s), {per:.2f} s each (not counted in the step times)"


class _TextAndImages(ui.PreviewText):
    def __init__(self, text: str, images):
        super().__init__(text)
        self.images = images

    def as_dict(self):
        out = super().as_dict()
        out.update(self.images.as_dict())
        return out


def zeroed(positive):
    """A negative for CFG when none is given: the prompt's conditioning zeroed out (what
    ComfyUI's ConditioningZeroOut node makes)."""
    out = []
    for t, extra in positive:
        extra = dict(extra)
        if isinstance(extra.get("pooled_output"), torch.Tensor):
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(t), extra])
    return out


def latent_rgb(latent_format, latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's latent-to-RGB preview (latent_preview.Latent2RGBPreviewer) of one latent, as an
    (H, W, 3) float image at latent size."""
    import numpy as np
    import latent_preview
    factors = getattr(latent_format, "latent_rgb_factors", None)
    if factors is None:
        return torch.zeros(latent.shape[-2], latent.shape[-1], 3)
    previewer = latent_preview.Latent2RGBPreviewer(factors, getattr(latent_format, "latent_rgb_factors_bias", None))
    pil = previewer.decode_latent_to_preview(latent_format.process_in(latent)[:1])
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)


@contextlib.contextmanager
def _suspended(checkpointing):
    if checkpointing is None:
        yield
        return
    checkpointing.remove()
    try:
        yield
    finally:
        checkpointing.install()


def _reload(run) -> None:
    mp = run.guider.model_patcher
    if not any(getattr(m, "model", None) is mp for m in mm.current_loaded_models):
        mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
