"""PaRa Trainer: MODEL + latents + conditioning -> MODEL with the trained adapter, PARA, loss.

The node checks its inputs (every error names the input), builds B for the selected layers
(or takes it from a PaRa file / trainer checkpoint), hands the loop to training_loop.py, writes
checkpoints into models/para, and applies the result through PaRa Apply's patching."""
from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import torch
from comfy_api.latest import io, ui

import comfy.utils
import folder_paths

from ..para_core import (PRESET_NAMES, DEFAULT_PRESET, ParaError, ParaState, PresetError, build_metadata, check_fits,
                         load_para, save_para, select_layers)
from ..para_core.functional import reference
from ..para_core.functional.base import RankCap, effective_rank, is_linear
from ..para_core.functional.projection import DEFAULT_INIT, INIT_METHODS, init_B
from ..para_core.functional.reference import DEFAULT_PARAMETRIZATION, PARAMETRIZATIONS
from ..para_core.state import reference_state
from ..para_core.trainer_state import (check_optimizer_state, check_scaler_state, load_trainer_state,
                                       save_trainer_state, trainer_state_path)
from ..para_core.write import NameTaken, claim_run, refresh_run, release_run
from .para_nodes import CATEGORY, check_prefix, para_files, save_target
from .patching import apply_para, layer_shapes, model_family, model_fingerprint, original_weight
from .adapters.para import ParaForward
from .adapters.reference import ReferenceForward
from .training_loop import OPTIMIZERS, TRAINING_DTYPES, TrainSettings, TrainingRun, generator_for
from .dynamic_vram import training_patcher
from .previews import Previews, preview_inputs, preview_output
from .types import PARA, check_model

log = logging.getLogger("ComfyUI-PaRa")
NONE = "[none]"
# Latent -> pixel size of the models ComfyUI trains this way (SD1.x/2.x, SDXL, SD3, Flux).
PIXELS_PER_LATENT = 8


def settings_from_lists(*list_inputs):
    """With is_input_list=True ComfyUI hands every input over as a list: the inputs named here
    (the training data) stay lists, every other one must be a list of one value and is unwrapped.
    Plain values (a direct Python call) pass through unchanged."""
    def wrap(fn):
        @functools.wraps(fn)
        def execute(cls, **inputs):
            for name, value in inputs.items():
                if name in list_inputs or not isinstance(value, list):
                    continue
                if len(value) != 1:
                    raise ParaError(f"input '{name}' got a list of {len(value)} values; PaRa Trainer takes one "
                                    f"{name} per run (connect a single value, not a list).")
                inputs[name] = value[0]
            return fn(cls, **inputs)
        return execute
    return wrap


class PaRaTrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PaRaTrainer", display_name="PaRa Trainer", category=CATEGORY, is_output_node=True,
            # The dataset nodes (MakeTrainingDataset, ResolutionBucket, ...) output lists, one latent and one
            # conditioning per image or per size bucket: with this the list arrives whole (and every other
            # input as a list of one, see settings_from_lists). ComfyUI 0.3.64's V3 schema has it too.
            is_input_list=True,
            description=(
                "Trains a PaRa adapter (paper: Personalizing Text-to-Image Diffusion via Parameter Rank Reduction): "
                "for every selected layer it learns an r-dimensional output subspace Q and removes it, "
                "W' = W0 - Q(Q^T W0) (parametrization paper; with parametrization reference it trains what the authors' "
                "code trains: U and D free, W' = W0 - U D). Feed it the latents of your subject's images (VAE Encode, or the "
                "lists of the dataset nodes: Make Training Dataset, Resolution Bucket, Load Training Dataset) and "
                "their conditioning (one for all, or one per image). Shows the loss while it runs, saves checkpoints "
                "into models/para, stops cleanly on Cancel (keeping the last finished step) and can resume."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to personalize (any model ComfyUI can sample)."),
                io.Latent.Input("latents", tooltip="The training images as latents: VAE Encode of a batch of images, or the "
                                                "lists of ComfyUI's dataset nodes (Make Training Dataset, Resolution "
                                                "Bucket, Load Training Dataset), whose images may differ in size."),
                io.Conditioning.Input("positive", tooltip="The caption conditioning: one for all images, or one per image "
                                                          "in the same order (put your trigger word in it)."),
                io.Int.Input("rank", default=4, min=1, max=1024,
                             tooltip="Dimensions removed per layer (the paper uses 4). Capped per layer, see rank_cap."),
                io.Combo.Input("layers", options=PRESET_NAMES, default=DEFAULT_PRESET,
                               tooltip="Which layers to adapt. noxattn (the paper's default): attention, resnet and "
                                       "resampling layers except cross-attention; on transformers (SD3, Flux, Lumina 2) "
                                       "the image path's attention and MLP weights, not the text path. "
                                       "noxattn-hspace-last: one layer in the middle of the network (single-image "
                                       "editing; measured, parametrization reference edits and paper does not: "
                                       "bench/README.md). See docs/presets.md for each preset per model family."),
                io.Combo.Input("rank_cap", options=list(RankCap.MODES), default=RankCap.REFERENCE,
                               tooltip="reference: a layer with fewer than rank_ratio*rank outputs gets rank "
                                       "out//rank_ratio (at least 1). reference-code: exactly the authors' code: "
                                       "Linear layers uncapped, convs min(rank, out//rank_ratio, in, out) when "
                                       "out < rank_ratio*rank. none: only what the layer allows."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000,
                             tooltip="Total optimizer steps (the paper trains 1000). When resuming, the total to reach."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="Learning rate of the optimizer."),
                io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW",
                               tooltip="The optimizer for B (AdamW as in the paper)."),
                io.Int.Input("batch_size", default=1, min=1, max=256,
                             tooltip="Images per step. Every image is seen once per epoch."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the initial B, the image order, the noise and the timesteps."),
                io.Combo.Input("training_dtype", options=list(TRAINING_DTYPES), default="bf16",
                               tooltip="Precision of the model's computation. B is always kept in float32."),
                io.Boolean.Input("gradient_checkpointing", default=True,
                                 tooltip="Recompute activations in the backward pass: much less memory, ~30% slower."),
                io.Combo.Input("init", options=list(INIT_METHODS), default=DEFAULT_INIT,
                               tooltip="Initial B (U0 = QR(B0)). kaiming: random subspace (LoRA's init for a down "
                                       "factor, not the reference code's). orthogonal: random orthonormal columns. "
                                       "top-singular: removes the layer's strongest output directions at once. "
                                       "bottom-singular: starts from the weakest, i.e. closest to the base model. "
                                       "reference: the authors' code, B0 = 0, so U0 = the first rank unit vectors "
                                       "(removes the layer's first output channels at step 0)."),
                io.Int.Input("save_every", default=250, min=0, max=1_000_000,
                             tooltip="Write a checkpoint every N steps (and at the end); 0 = only when stopped early."),
                io.String.Input("filename_prefix", default="PaRa",
                                tooltip="Checkpoints go to models/para/<prefix>_<run>_step<N>.safetensors, each with "
                                        "a .trainer.pt beside it for exact resume."),
                io.Combo.Input("resume_from", options=[NONE] + para_files(), default=NONE,
                               tooltip="Continue from a file in models/para: with its .trainer.pt the run resumes "
                                       "exactly (optimizer, step, loss history); a PaRa file alone warm-starts B."),
                io.String.Input("custom_layers", default="", multiline=True, optional=True,
                                tooltip="Overrides 'layers' when not empty: comma/newline separated globs over module "
                                        "paths (e.g. *attn1.to_q), 're:' for a regex, '!' to exclude."),
                io.String.Input("trigger_words", default="", optional=True,
                                tooltip="Stored in the file's metadata (para.train, modelspec.trigger_phrase)."),
                io.Combo.Input("parametrization", options=list(PARAMETRIZATIONS), default=DEFAULT_PARAMETRIZATION,
                               optional=True,
                               tooltip="paper: train B, W' = W0 - Q(Q^T W0) with Q = QR(B) (the paper's equation, "
                                       "r*out parameters per layer). reference: what the authors' code trains: U and "
                                       "D free, W' = W0 - U D, starting at U0 = QR(B0), D0 = U0^T W0 "
                                       "(r*(out + in*k*k) parameters; saved as a para_U/para_D file). On the pack's "
                                       "quality benchmark both learned a known-class subject (instance 0.92 paper, "
                                       "1.00 reference, LoRA 0.89); only reference learned a new shape (0.33 vs 0.00) "
                                       "and it drifted more (bench/README.md, Quality)."),
                io.Int.Input("rank_ratio", default=RankCap.DEFAULT_RATIO, min=1, max=4096, optional=True,
                             tooltip="The ratio of rank_cap's reference rules (the code's --loraRatio, default 40)."),
            ] + preview_inputs(),
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the trained adapter applied (strength 1)."),
                PARA.Output(display_name="PARA", tooltip="The trained adapter: save it with PaRa Save."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step, for ComfyUI's Plot Loss Graph node."),
                io.Int.Output(display_name="steps", tooltip="Steps trained in total."),
                preview_output(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    @settings_from_lists("latents", "positive")
    # ComfyUI runs nodes under torch.inference_mode(); B, its optimizer state and the cloned
    # inputs must be normal tensors for autograd, so the whole node runs outside it.
    @torch.inference_mode(False)
    def execute(cls, model, latents, positive, rank, layers, rank_cap, steps, learning_rate, optimizer, batch_size,
                seed, training_dtype, gradient_checkpointing, init, save_every, filename_prefix, resume_from,
                custom_layers="", trigger_words="", parametrization=DEFAULT_PARAMETRIZATION,
                rank_ratio=RankCap.DEFAULT_RATIO, preview_every=0, preview_prompt=None, preview_negative=None,
                preview_seed=0, preview_steps=20, preview_cfg=5.0, preview_vae=None) -> io.NodeOutput:
        check_model(model)
        hidden = getattr(cls, "hidden", None)
        node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
        custom = (custom_layers or "").strip()
        layers_input = "custom_layers" if custom else "layers"
        samples, positive = training_data(latents, positive, model)
        check_settings(steps, learning_rate, batch_size, save_every, optimizer, training_dtype, init, rank_cap,
                       parametrization, rank_ratio)
        trigger_words = check_trigger_words(trigger_words)
        check_prefix(filename_prefix or "PaRa", folder_paths.get_folder_paths("para")[0],
                     len(f"_00001_step{int(steps):06}.safetensors"))
        given = model
        model = training_patcher(model)  # dynamic VRAM: train on a classic copy (nodes/dynamic_vram.py)
        family = model_family(model)
        shapes = layer_shapes(model)
        resume = load_resume(resume_from, model, shapes, family)
        if resume is not None and resume.parametrization != parametrization:
            log.warning("PaRa: %r was trained with parametrization %s; continuing it as %s (input 'parametrization' "
                        "is %s).", resume_from, resume.parametrization, resume.parametrization, parametrization)
            parametrization = resume.parametrization
        is_reference = parametrization == reference.KIND
        if resume is None:
            spec = custom or layers
            names = choose_layers(shapes, spec, layers_input, family)
            ranks = choose_ranks(names, shapes, rank, rank_cap, rank_ratio)
            gen = generator_for(seed, "init")
            if is_reference:  # U0 = QR(B0), D0 = U0^T W0 (docs/spec.md section 1b)
                UD0 = {l: reference.init(original_weight(model, l), ranks[l], init, gen) for l in names}
                B0 = {l: UD0[l][0] for l in names}
                D0 = {l: UD0[l][1] for l in names}
            else:
                B0 = {l: init_B(original_weight(model, l), ranks[l], init, gen).float() for l in names}
            start, trainer_state = 0, None
        else:
            spec = resume.para.metadata.get("para.layers", "") or "custom"
            names = resume.layers
            if is_reference:
                B0 = {l: resume.para.U[l].float() for l in names}
                D0 = {l: resume.para.D[l].float() for l in names}
            else:
                B0 = {l: resume.para.B[l].float() for l in names}
            ranks = {l: int(B0[l].shape[1]) for l in names}
            trainer_state = resume.trainer
            start = int(trainer_state["step"]) if trainer_state else 0
            if steps < start:
                raise ParaError(f"input 'steps' is {steps} but the checkpoint {resume_from} is already at step {start}; "
                                f"set steps above {start} to continue training it.")
        modules = layer_modules(model, names, layers_input)

        device = model.load_device
        # float32 masters whatever the training dtype (the authors' code keeps them in bf16)
        B = {l: torch.nn.Parameter(B0[l].detach().float().clone().to(device)) for l in names}
        if is_reference:
            D = {l: torch.nn.Parameter(D0[l].detach().float().clone().to(device)) for l in names}
            adapter = ReferenceForward(modules, B, D)
        else:
            adapter = ParaForward(modules, B)
        settings = TrainSettings(steps=steps, learning_rate=float(learning_rate), optimizer=optimizer,
                                 batch_size=batch_size, seed=seed, dtype=training_dtype,
                                 gradient_checkpointing=bool(gradient_checkpointing), save_every=save_every)
        info = RunInfo(model=model, names=names, ranks=ranks, spec=spec, rank=rank, rank_cap=rank_cap,
                       parametrization=parametrization, rank_ratio=rank_ratio,
                       init=init if resume is None else f"from {resume_from}",
                       samples=samples, n_captions=len(positive), trigger_words=(trigger_words or "").strip(),
                       settings=settings, family=family, resume_from=None if resume is None else resume_from,
                       exact=bool(trainer_state))
        if resume is not None:
            resume.warn_differences(info)
        checkpoints = Checkpoints(filename_prefix, info)
        progress = Progress(steps, node_id)
        previews = Previews(preview_every, preview_prompt if preview_prompt is not None else positive[:1],
                            preview_negative, preview_seed, preview_steps, preview_cfg, preview_vae, bar=progress.bar)
        run = TrainingRun(model, samples, positive, adapter, settings, start_step=start,
                          optimizer_state=resume.optimizer_state(optimizer) if resume else None,
                          scaler_state=trainer_state.get("scaler") if trainer_state else None,
                          loss_history=trainer_state.get("loss_history") if trainer_state else None,
                          on_checkpoint=checkpoints, on_step=lambda r: (progress(r), previews(r)))
        log.info("PaRa: training %d layers of this %s model (%r), ranks %s, %d trainable parameters, steps %d -> %d",
                 len(names), family, spec, rank_summary(ranks), sum(p.numel() for p in adapter.parameters()), start,
                 steps)
        try:
            run.run()
        finally:
            checkpoints.close()

        state = info.state(run)
        out_model = apply_para(given, state, 1.0)
        last = f"{run.losses[-1]:.4f}" if run.losses else "n/a"
        text = f"PaRa: {run.step} steps, loss {last}" + (f", saved {checkpoints.last_name}" if checkpoints.last_name else "")
        if getattr(run, "save_errors", None):
            text += (f"\nWARNING: {len(run.save_errors)} checkpoint(s) could not be written (last: {run.save_errors[-1]}); "
                     "the result is only in memory: connect PARA to PaRa Save.")
        return io.NodeOutput(out_model, state, {"loss": list(run.losses)}, run.step, previews.batch(),
                             ui=previews.ui(text, cls))


# ------------------------------------------------------------------------- validation

def is_conditioning(value) -> bool:
    """A CONDITIONING ([[tensor, dict], ...]) as opposed to a list of them."""
    return (isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], (list, tuple))
            and len(value[0]) > 0 and isinstance(value[0][0], torch.Tensor))


def training_data(latents, positive, model):
    """(samples, positive) from what the inputs hold, one of:
    - a latent batch (VAE Encode) and one conditioning, for all images or one per image;
    - the lists the dataset nodes of current ComfyUI make: MakeTrainingDataset gives one latent
      and one conditioning per image (sizes may differ), ResolutionBucket one latent batch and
      one conditioning list (one per image) per size; LoadTrainingDataset either.
    samples: one (N, C, H, W) tensor when all images have one size, else a list of N (C, H, W)
    tensors (a step's batch then runs one forward per size). positive: 1 or N conditionings."""
    latent_list = list(latents) if isinstance(latents, (list, tuple)) else [latents]
    cond_list = list(positive) if isinstance(positive, (list, tuple)) and not is_conditioning(positive) else []
    cond_list = cond_list or [positive]
    if not latent_list:
        raise ParaError("input 'latents' holds no latents; connect VAE Encode or Make Training Dataset of your images.")
    many = len(latent_list) > 1
    batches = [check_latents(lat, model, f"input 'latents' item {i + 1} of {len(latent_list)}" if many else None)
               for i, lat in enumerate(latent_list)]
    counts = [b.shape[0] for b in batches]
    n = sum(counts)
    if len(cond_list) == 1:  # one conditioning for every batch: for all images, or one per image in order
        conds = check_conditioning(cond_list[0], n)
    elif len(cond_list) == len(batches):  # one per batch: for its images, or one per image of it
        conds = []
        for i, (c, k) in enumerate(zip(cond_list, counts)):
            c = check_conditioning(c, k, f"input 'positive' item {i + 1} of {len(cond_list)}")
            conds += c * k if len(c) == 1 else c
        if all(c is conds[0] for c in conds):
            conds = conds[:1]
    else:
        raise ParaError(f"input 'positive' is a list of {len(cond_list)} conditionings but input 'latents' a list of "
                        f"{len(batches)} latent batches; give one conditioning (list) per latent batch, or one for "
                        "all (e.g. connect both from the same Make Training Dataset or Resolution Bucket node).")
    if len({tuple(b.shape[1:]) for b in batches}) == 1:
        return torch.cat(batches) if many else batches[0], conds
    images = [x for b in batches for x in b]
    log.info("PaRa: %d training images in %d sizes (%s); each step runs one batch per size", n,
             len({tuple(x.shape) for x in images}), ", ".join(sorted({size_text(x) for x in images})))
    return images, conds


def size_text(latent: torch.Tensor) -> str:
    return f"{latent.shape[-1] * PIXELS_PER_LATENT}x{latent.shape[-2] * PIXELS_PER_LATENT}"


def check_latents(latents, model, where: Optional[str] = None) -> torch.Tensor:
    where = where or "input 'latents'"
    samples = latents.get("samples") if isinstance(latents, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() < 4:
        raise ParaError(f"{where} holds no latent batch; connect VAE Encode (or a latent batch) of your images.")
    if samples.shape[0] == 0:
        raise ParaError(f"{where} is empty (0 images); connect VAE Encode of at least one image.")
    channels = getattr(getattr(getattr(model, "model", None), "latent_format", None), "latent_channels", None)
    if channels is not None and samples.shape[1] != channels:
        raise ParaError(f"{where} has {samples.shape[1]} channels but this {model_family(model)} model uses "
                        f"{channels}; encode the images with this model's VAE.")
    bad = [i for i in range(samples.shape[0]) if not torch.isfinite(samples[i]).all()]
    if bad:
        raise ParaError(f"{where}: image {bad[0]} contains NaN/Inf values (VAE Encode in fp16 can overflow; "
                        "try the VAE in fp32/bf16).")
    if isinstance(latents, dict) and latents.get("noise_mask") is not None:
        log.warning("PaRa: the latents carry a noise mask; the trainer uses whole images and ignores it.")
    return samples.detach().clone().float().cpu()


def check_conditioning(positive, n_images: int, where: Optional[str] = None):
    where = where or "input 'positive'"
    if not isinstance(positive, (list, tuple)) or len(positive) == 0:
        raise ParaError(f"{where} holds no conditioning; connect CLIP Text Encode with your caption.")
    if len(positive) not in (1, n_images):
        raise ParaError(f"{where} has {len(positive)} conditionings but the latents it goes with have {n_images} "
                        "images; give one conditioning for all images or exactly one per image, in the same order.")
    return list(positive)


def check_settings(steps, learning_rate, batch_size, save_every, optimizer, training_dtype, init, rank_cap,
                   parametrization=DEFAULT_PARAMETRIZATION, rank_ratio=RankCap.DEFAULT_RATIO):
    if steps is None or int(steps) < 1:
        raise ParaError(f"input 'steps' is {steps}; train at least 1 step.")
    if learning_rate is None or not math.isfinite(float(learning_rate)) or float(learning_rate) <= 0:
        raise ParaError(f"input 'learning_rate' is {learning_rate}; give a positive finite number (the paper uses 1e-4).")
    if batch_size is None or int(batch_size) < 1:
        raise ParaError(f"input 'batch_size' is {batch_size}; use at least 1.")
    if save_every is None or int(save_every) < 0:
        raise ParaError(f"input 'save_every' is {save_every}; use 0 (off) or a positive number of steps.")
    for name, value, options in (("optimizer", optimizer, OPTIMIZERS), ("training_dtype", training_dtype, TRAINING_DTYPES),
                                 ("init", init, INIT_METHODS), ("rank_cap", rank_cap, RankCap.MODES),
                                 ("parametrization", parametrization, PARAMETRIZATIONS)):
        if value not in options:
            raise ParaError(f"input '{name}' is {value!r}; use one of {', '.join(options)}.")
    if rank_ratio is None or int(rank_ratio) < 1:
        raise ParaError(f"input 'rank_ratio' is {rank_ratio}; use at least 1 (the reference code uses 40).")


# Trigger words go into the metadata three times (title, modelspec.trigger_phrase, para.train);
# safetensors refuses a header over 100 MB. A phrase is words, not a document.
MAX_TRIGGER_WORDS_BYTES = 65536


def check_trigger_words(trigger_words) -> str:
    """The trigger words as they will be stored, checked before training (a problem here would
    otherwise fail every checkpoint): text, encodable, at most MAX_TRIGGER_WORDS_BYTES."""
    if trigger_words is None:
        return ""
    if not isinstance(trigger_words, str):
        raise ParaError(f"input 'trigger_words' is a {type(trigger_words).__name__}; give a text.")
    try:
        n = len(trigger_words.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ParaError(f"input 'trigger_words' contains a lone surrogate ({trigger_words[e.start]!r} at character "
                        f"{e.start}), which cannot be stored in the file's metadata (it comes from broken text); "
                        "remove it.") from None
    if n > MAX_TRIGGER_WORDS_BYTES:
        raise ParaError(f"input 'trigger_words' is {n:,} bytes; the file's metadata takes at most "
                        f"{MAX_TRIGGER_WORDS_BYTES:,} (trigger words are a short phrase, e.g. 'sks dog').")
    return trigger_words


def choose_layers(shapes, spec: str, input_name: str, family: str) -> List[str]:
    try:
        return select_layers(shapes, spec, family=f"this {family} model")
    except PresetError as e:
        raise ParaError(f"input '{input_name}': {e}") from None


def choose_ranks(names, shapes, rank: int, cap: str, ratio: int = RankCap.DEFAULT_RATIO) -> Dict[str, int]:
    if rank is None or int(rank) < 1:
        raise ParaError(f"input 'rank' is {rank}; use at least 1.")
    largest = max(min(shapes[l][0], math.prod(shapes[l][1:])) for l in names)
    if rank > largest:
        raise ParaError(f"input 'rank' is {rank} but the largest selected layer allows at most {largest}; lower the rank.")
    return {l: effective_rank(int(rank), shapes[l], cap, int(ratio)) for l in names}


def layer_modules(model, names, input_name: str) -> Dict[str, torch.nn.Module]:
    modules = {}
    for l in names:
        m = comfy.utils.get_attr(model.model, l)
        if not (is_linear(m) or isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))):
            raise ParaError(f"input '{input_name}' selects {l}, a {type(m).__name__}; PaRa trains Linear and Conv layers only.")
        if getattr(m, "scale_weight", None) is not None:
            raise ParaError(f"layer {l} stores scaled fp8 weights, which PaRa Trainer cannot train through; load the "
                            "model with weight_dtype default (fp16/bf16).")
        modules[l] = m
    return modules


def rank_summary(ranks: Dict[str, int]) -> str:
    counts: Dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    return ", ".join(f"{n}x r{r}" for r, n in sorted(counts.items()))


# ------------------------------------------------------------------------- resume

class Resume:
    def __init__(self, para: ParaState, trainer: Optional[dict], name: str):
        self.para, self.trainer, self.name = para, trainer, name
        self.layers = list(trainer["layers"]) if trainer else para.layers
        self.parametrization = "reference" if para.kind == "reference" else "paper"

    def warn_differences(self, info: "RunInfo") -> None:
        """An exact resume needs the same data and settings; say what differs (it still runs)."""
        if not self.trainer:
            return
        theirs, s = self.trainer.get("settings", {}), info.settings
        ours = {"lr": s.learning_rate, "batch_size": s.batch_size, "seed": s.seed, "dtype": s.dtype}
        diff = [f"{k} {theirs[k]} -> {v}" for k, v in ours.items() if k in theirs and theirs[k] != v]
        if self.trainer.get("data_fingerprint") not in (None, info.data_fingerprint):
            diff.append("other latents")
        if diff:
            log.warning("PaRa: resuming %r with %s: the result will differ from an uninterrupted run.",
                        self.name, ", ".join(diff))

    def optimizer_state(self, optimizer: str):
        if not self.trainer:
            return None
        if self.trainer.get("optimizer_name") != optimizer:
            log.warning("PaRa: %r was trained with %r, this run uses %s: the optimizer starts fresh (not an exact resume).",
                        self.name, self.trainer.get("optimizer_name"), optimizer)
            return None
        return self.trainer.get("optimizer")


def load_resume(resume_from, model, shapes, family) -> Optional[Resume]:
    if not resume_from or resume_from == NONE:
        return None
    path = folder_paths.get_full_path("para", resume_from)
    if path is None:
        raise ParaError(f"input 'resume_from': {resume_from!r} is not in models/para.")
    para = load_para(path)
    if para.kind not in ("subject", "reference"):
        raise ParaError(f"input 'resume_from': {resume_from} is a merged adapter (para_U/para_V); only a trained "
                        "subject (para_B) or reference adapter (para_U/para_D) can be trained further.")
    para = check_fits(para, shapes, family=f"this {family} model")
    trainer = None
    tpath = trainer_state_path(path)
    if os.path.isfile(tpath):
        try:
            trainer = load_trainer_state(tpath)
        except ParaError as e:
            raise ParaError(f"input 'resume_from': {e}") from None
        if sorted(trainer["layers"]) != sorted(para.layers):
            log.warning("PaRa: %r does not match its PaRa file's layers; warm start from the PaRa file only.", tpath)
            trainer = None
        else:
            check_optimizer_shapes(trainer, para, tpath, resume_from)
            check_whole_state(trainer, para, tpath, resume_from)
    if trainer:
        log.info("PaRa: resuming %r exactly from step %d", resume_from, int(trainer["step"]))
    else:
        log.info("PaRa: warm start from %r (no trainer state beside it: fresh optimizer, step 0)", resume_from)
    return Resume(para, trainer, resume_from)


def check_optimizer_shapes(trainer: dict, para: ParaState, tpath: str, resume_from: str) -> None:
    """The optimizer moments must have the shapes of the tensors they belong to: a trainer state
    from a run of another rank (or another file) is an error naming both files, not torch's
    'output with shape [320, 1] doesn't match the broadcast shape' at the first step."""
    layers = list(trainer["layers"])
    if para.kind == "reference":
        expected = [(l, n, tuple(t[l].shape)) for l in layers for n, t in (("para_U", para.U), ("para_D", para.D))]
    else:
        expected = [(l, "para_B", tuple(para.B[l].shape)) for l in layers]
    opt = trainer.get("optimizer")
    if not opt:
        return
    n_params = sum(len(g.get("params", [])) for g in opt.get("param_groups", []) if isinstance(g, dict))
    problem = None
    if n_params != len(expected):
        problem = f"its optimizer holds {n_params} tensors, the PaRa file has {len(expected)}"
    else:
        for idx, st in opt.get("state", {}).items():
            if not isinstance(idx, int) or not 0 <= idx < len(expected) or not isinstance(st, dict):
                problem = f"its optimizer state has an entry {idx!r} that belongs to no tensor"
                break
            layer, name, shape = expected[idx]
            bad = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != shape]
            if bad:
                problem = (f"its optimizer state '{bad[0]}' of {layer} has shape {tuple(st[bad[0]].shape)}, the PaRa "
                           f"file's {name} has {shape} (a trainer state of another rank or run)")
                break
    if problem:
        raise ParaError(f"input 'resume_from': {tpath} does not belong to {resume_from}: {problem}. Delete the "
                        ".trainer.pt to warm-start from the PaRa file alone, or pick the checkpoint it was saved with.")


def check_whole_state(trainer: dict, para: ParaState, tpath: str, resume_from: str) -> None:
    """The optimizer and GradScaler state as a whole (para_core.trainer_state): a damaged
    .trainer.pt is an error naming resume_from before the run starts, never a TypeError or
    KeyError at the first step, nor a flag like amsgrad="yes" that silently changes the run."""
    layers = list(trainer["layers"])
    if para.kind == "reference":
        params = [(f"{l}.{n}", tuple(t[l].shape)) for l in layers for n, t in (("para_U", para.U), ("para_D", para.D))]
    else:
        params = [(f"{l}.para_B", tuple(para.B[l].shape)) for l in layers]
    try:
        opt_cls = OPTIMIZERS.get(trainer.get("optimizer_name"))
        if trainer.get("optimizer") is not None and opt_cls is not None:  # another optimizer: unused, fresh start
            check_optimizer_state(trainer["optimizer"], opt_cls, [s for _, s in params], tpath, [n for n, _ in params])
        check_scaler_state(trainer.get("scaler"), tpath)
    except ParaError as e:
        raise ParaError(f"input 'resume_from' ({resume_from}): {e}") from None


# ------------------------------------------------------------------------- metadata, checkpoints, progress

def data_fingerprint(samples) -> str:
    """Of a latent batch, or of a list of latents of different sizes."""
    parts = [samples] if isinstance(samples, torch.Tensor) else list(samples)
    h = hashlib.sha256(str(tuple(samples.shape) if len(parts) == 1 else [tuple(x.shape) for x in parts]).encode())
    for x in parts:
        h.update(x.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RunInfo:
    """Everything the PaRa file's metadata and the trainer state say about a run."""

    def __init__(self, model, names, ranks, spec, rank, rank_cap, init, samples, n_captions, trigger_words, settings,
                 family, resume_from, exact, parametrization=DEFAULT_PARAMETRIZATION, rank_ratio=RankCap.DEFAULT_RATIO):
        self.names, self.ranks, self.spec, self.settings = names, ranks, spec, settings
        self.parametrization = parametrization
        self.family = family
        self.fingerprint = model_fingerprint(model, names)
        self.data_fingerprint = data_fingerprint(samples)
        sizes = sorted({size_text(x) for x in samples}) if not isinstance(samples, torch.Tensor) else None
        shape = list(samples.shape[1:]) if sizes is None else [list(x.shape) for x in samples]
        self.train = {
            "trainer": "ComfyUI-PaRa PaRaTrainer", "total_steps": settings.steps, "lr": settings.learning_rate,
            "optimizer": settings.optimizer, "batch_size": settings.batch_size, "seed": settings.seed,
            "resolution": size_text(samples) if sizes is None else ", ".join(sizes), "latent_shape": shape,
            "dtype": settings.dtype, "gradient_checkpointing": settings.gradient_checkpointing, "init": init,
            "rank_cap": rank_cap, "rank_ratio": int(rank_ratio), "parametrization": parametrization,
            "trigger_words": trigger_words, "images": len(samples),
            "captions": n_captions, "loss": "mse in the model's prediction space (eps / v / flow)",
        }
        if resume_from:
            self.train["resumed_from" if exact else "warm_start_from"] = resume_from
        self.rank = rank
        self.trigger_words = trigger_words

    def state(self, run: TrainingRun, reason: str = "final") -> ParaState:
        train = dict(self.train, steps=run.step, stopped="" if reason in ("final", "save_every") else reason)
        if run.losses:
            tail = run.losses[-min(len(run.losses), 50):]
            train.update(final_loss=run.losses[-1], mean_loss_last_50=sum(tail) / len(tail))
        fields = dict(rank=max(self.ranks.values()), ranks=self.ranks, layers=self.spec,
                      base_arch=self.family, base_fingerprint=self.fingerprint, train=train,
                      title=f"PaRa {self.trigger_words or 'subject'} ({run.step} steps)",
                      extra={"modelspec.trigger_phrase": self.trigger_words} if self.trigger_words else None)
        if self.parametrization == "reference":
            return reference_state(run.adapter.U, run.adapter.D, **fields)
        md = build_metadata("subject", **fields)
        B = {l: p.detach().float().cpu().clone() for l, p in run.adapter.B.items()}
        return ParaState(kind="subject", B=B, metadata=md)

    def trainer_state(self, run: TrainingRun, para_name: str, reason: str) -> dict:
        s = self.settings
        return {
            "step": run.step, "layers": list(self.names), "optimizer_name": s.optimizer,
            "parametrization": self.parametrization,
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict() if run.scaler else None,
            "loss_history": list(run.losses), "para_file": para_name, "reason": reason,
            "settings": {"lr": s.learning_rate, "batch_size": s.batch_size, "seed": s.seed, "dtype": s.dtype,
                         "steps": s.steps},
            "rng": {"seed": s.seed, "scheme": "per step: sha256(seed:purpose:step) seeds a CPU generator; "
                                              "no global RNG state is used"},
            "data_fingerprint": self.data_fingerprint,
        }


class Checkpoints:
    """Writes <prefix>_<run>_step<N>.safetensors (+ .trainer.pt) into models/para, atomically.

    The run number is claimed at the first checkpoint (para_core.write.claim_run), so two ComfyUIs
    sharing models/para never write into one run's name, and every file is written exclusively:
    nothing another writer made is ever replaced. close() gives the run number's claim back."""

    def __init__(self, prefix: str, info: RunInfo):
        folder = os.path.abspath(folder_paths.get_folder_paths("para")[0])
        # the longest name a run writes: <prefix>_00001_step<steps>.safetensors
        tail = len(f"_00001_step{info.settings.steps:06}.safetensors")
        full, filename, counter = save_target(folder, check_prefix(prefix or "PaRa", folder, tail))
        self.folder, self.info = folder, info
        self._target = (full, filename, counter)
        self.stem: Optional[str] = None
        self._claim: Optional[str] = None
        self.last_name: Optional[str] = None

    def close(self) -> None:
        release_run(self._claim)
        self._claim = None

    def __call__(self, run: TrainingRun, reason: str) -> str:
        if self.stem is None:
            self.stem, self._claim = claim_run(*self._target)
        refresh_run(self._claim)
        path = f"{self.stem}_step{run.step:06}.safetensors"
        tpath = trainer_state_path(path)
        wrote_state = False
        if run.optimizer_state_valid:
            # Trainer state first: the PaRa file, which the resume list shows, appears last, so a
            # listed checkpoint always has its state (a crash in between leaves an unlisted
            # .trainer.pt, removed at the next start: para_core.write.remove_stale_temp_files).
            save_trainer_state(self.info.trainer_state(run, os.path.basename(path), reason), tpath, exclusive=True)
            wrote_state = True
        try:
            save_para(self.info.state(run, reason), path, exclusive=True)
        except BaseException as e:
            # our state must not stay beside a PaRa file that is not ours, nor alone
            if wrote_state and (isinstance(e, NameTaken) or not os.path.exists(path)):
                try:
                    os.unlink(tpath)
                except OSError:
                    pass
            raise
        self.last_name = os.path.relpath(path, self.folder)
        log.info("PaRa: step %d: saved checkpoint %r (%s)", run.step, path, reason)
        return path


class Progress:
    """ComfyUI progress bar + the loss as node text + a console line every few seconds."""

    def __init__(self, steps: int, node_id):
        self.steps, self.node_id = steps, node_id
        self.bar = comfy.utils.ProgressBar(steps)
        self.last_log = self.last_text = 0.0
        self.t0 = time.monotonic()

    def __call__(self, run: TrainingRun):
        self.bar.update_absolute(run.step, self.steps)
        now = time.monotonic()
        done = len(run.step_times)
        tail = run.losses[-min(len(run.losses), 20):]
        msg = f"step {run.step}/{self.steps}  loss {run.losses[-1]:.4f} (avg {sum(tail) / len(tail):.4f})"
        if now - self.last_text > 0.5 or run.step == self.steps:
            self.last_text = now
            self._send_text(msg)
        if done == 1 or now - self.last_log > 15 or run.step == self.steps:
            self.last_log = now
            per = sum(run.step_times[-20:]) / len(run.step_times[-20:])
            log.info("PaRa: %s  %.2f s/step, %.0f s left", msg, per, per * (self.steps - run.step))

    def _send_text(self, text: str):
        server = sys.modules.get("server")
        instance = getattr(getattr(server, "PromptServer", None), "instance", None)
        if instance is not None and self.node_id is not None:
            try:
                instance.send_progress_text(text, self.node_id)
            except Exception:  # progress text is a nicety; never let it stop training
                pass
