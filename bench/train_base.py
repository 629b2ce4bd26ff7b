"""Build the quality benchmark's base model: a small text-to-image model trained here from
scratch on the synthetic world (bench/world.py), saved as an SD1.5-format checkpoint that
ComfyUI's CheckpointLoaderSimple loads and KSampler samples like any SD-style model.

    python bench/train_base.py            # builds (or reuses) the cached checkpoint, seeded
    python bench/train_base.py --force    # rebuild

What the checkpoint holds (keys as in build_sd15_checkpoint of harness/models.py):
- VAE: TAESD-shaped. The encoder is set by hand to compute world.encode (8x8 colour means,
  scaled), so it needs no training; the decoder is trained here on images of every shape of the
  world (including the novel ones: the autoencoder is the model's "eyes", the diffusion model
  its knowledge).
- Text encoder: SD1 CLIP-L at a deterministic random init (frozen) whose attention and MLP
  output projections are zero (local_text_encoder_): every layer is the identity, so each word's
  embedding is its own (token + position). A plain random CLIP entangles the words and the UNet
  cannot generalize to held-out captions (stage 2, 5000 steps: shape right on 0.48 of them).
  Layer 0's attention is then set by hand (summary_text_encoder_) so that the end and padding
  tokens carry the mean of the caption's words while every word token stays its own: with
  word-local tokens only, the UNet read the colour word and ignored the shape word.
- UNet: ComfyUI's SD1.5 UNet in the smallest shape ComfyUI still detects as SD1.5
  (model_channels 320, one level; harness.models.SD15_SMALL_UNET_CONFIG), eps-prediction with
  ComfyUI's own SD1.5 noise schedule, trained with Min-SNR-5 loss weights times
  clamp(sigma^2, 1, 25) (from sigma = 1 up, the error of the clean latent: see train_unet). To
  train quickly on 2 CPU cores, only part of it is live: conv_in, the input transformer and the
  middle block (ResBlock, transformer, ResBlock; both transformers with their feed-forwards), the
  output skip projections and the output conv (`--live-resblocks` also trains the other three
  ResBlocks). The feed-forwards (GEGLU, right after the cross-attention) are what let it tell a
  circle from a square: without them (`--no-live-ff`, at the previous object sizes) the base drew
  every large circle as a square and every small square as a circle. The other blocks are set to
  exact identities (DEAD_*: their output projection is zero, so a ResBlock returns its skip path
  and a transformer its input) and are skipped while training. ComfyUI still computes them at sampling time, to the same result.
- World: objects at fixed places (world.place: one object at the centre, two at top-left and
  bottom-right, jittered by a pixel); with random places the base never learned its shapes.

Default build (seed 0): decoder 800 steps x 16 images, UNet 3000 steps x 16 at lr 1e-3 (see
README "Quality" for the measured time and held-out accuracy). Each stage is cached beside the
checkpoint under its own version (stage_*.pt), so a change to one stage retrains only that
stage; `build(..., unet_only=True)` trains the UNet stage alone (it does not need the decoder,
so both stages can be built at once in two processes).

Cache: $PARA_QUALITY_CACHE or ~/.cache/comfyui-para/quality (never in git).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if __package__ in (None, ""):  # run as a script: the repo root makes harness/ and bench/ importable
    sys.path.insert(0, str(ROOT))

from bench import world  # noqa: E402

BUILDER_VERSION = "6"
# Each stage is cached under its own version, bumped when what it depends on changes: the decoder
# sees every shape of the world (base and novel); the captions and the UNet only the base world.
DECODER_STAGE = "4"
CAPTION_STAGE = "4"
UNET_STAGE = "6"
UNET_STEPS = 3000
UNET_LR = 1e-3
MIN_SNR = 5.0
HIGH_NOISE = 25.0
CHECKPOINT_NAME = "para_quality_base.safetensors"

# Identity blocks: zeroed output projection, skipped in training (see module docstring).
# `live_resblocks=True` (the default since stage 3) trains every ResBlock: DEAD_RESBLOCKS_LIVE.
DEAD_RESBLOCKS = ["input_blocks.1.0", "output_blocks.0.0", "output_blocks.1.0"]
DEAD_RESBLOCKS_LIVE: list = []
DEAD_TRANSFORMERS = ["output_blocks.0.1", "output_blocks.1.1"]
# Feed-forwards of the two live transformers: trained by default (LIVE_FF); dead, like the blocks
# above, with live_ff=False (the builder before stage 6: it never drew large circles, see README).
LIVE_FF = True
DEAD_FF = ["input_blocks.1.1.transformer_blocks.0.ff", "middle_block.1.transformer_blocks.0.ff"]
# The live layers that PaRa's noxattn preset adapts: the benchmark's "same layers" for PaRa and
# LoRA (custom patterns, since LoRA on a zeroed weight could revive a dead block and PaRa can't).
LIVE_LAYER_PATTERNS = ("input_blocks.1.1.transformer_blocks.0.attn1.*,middle_block.1.transformer_blocks.0.attn1.*,"
                       "middle_block.[02].in_layers.2,middle_block.[02].out_layers.3,middle_block.[02].emb_layers.1,"
                       "output_blocks.*.0.skip_connection")


def cache_dir() -> Path:
    d = os.environ.get("PARA_QUALITY_CACHE")
    return Path(d).expanduser() if d else Path.home() / ".cache" / "comfyui-para" / "quality"


def checkpoint_path() -> Path:
    return cache_dir() / CHECKPOINT_NAME


def _save_stage(obj, path: Path):
    """torch.save through a temporary file: an interrupted build never leaves a half-written stage."""
    import torch
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def progress(what: str, step: int, steps: int, t0: float) -> str:
    """'<what> step k/n (elapsed, ETA)' from the rate so far (steps are of equal cost)."""
    elapsed = time.time() - t0
    done = step + 1
    eta = elapsed / done * (steps - done)
    return f"{what} step {done}/{steps} ({elapsed:.0f}s, ETA {_duration(eta)})"


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------

def analytic_encoder_(enc):
    """Set a TAESD encoder to world.encode: copy RGB, 2x2-average at each stride-2 conv (three
    times: 8x8 means), then the affine map to the 4 latent channels. Every Block is made
    ReLU(x) = x (x >= 0 here) by zeroing its convs."""
    import torch
    with torch.no_grad():
        for p in enc.parameters():
            p.zero_()
        enc[0].weight[[0, 1, 2], [0, 1, 2], 1, 1] = 1.0
        for i in (2, 6, 10):
            for c in range(64):
                enc[i].weight[c, c, 1:, 1:] = 0.25
        g = world.LATENT_GAIN
        last = enc[14]
        for c in range(3):
            last.weight[c, c, 1, 1] = g
            last.weight[3, c, 1, 1] = g * world.LUMA[c]
        last.bias.fill_(-0.5 * g)
    return enc


def local_text_encoder_(clip):
    """Zero the output projections of every attention and MLP of the (random) CLIP: each layer
    becomes the identity, so a token's embedding is final_layer_norm(token + position) and does
    not depend on the other words. A randomly initialised CLIP mixes all earlier words into each
    token (its residual branches are ~30x larger than the embeddings), so "circle" after "red"
    and after "blue" are unrelated vectors, and the UNet can learn captions only by heart: the
    stage-2 base drew the right shape for 0.48 of the held-out captions. A pretrained CLIP gives
    compositional embeddings; this is the cheapest frozen encoder that does too."""
    import torch
    with torch.no_grad():
        for name, m in clip.named_modules():
            if name.endswith("self_attn.out_proj") or name.endswith("mlp.fc2"):
                m.weight.zero_()
                m.bias.zero_()
    return clip


def summary_text_encoder_(clip, gain: float = 1.0):
    """Make layer 0's self-attention (after local_text_encoder_) copy a summary of the caption into
    the end and padding tokens, and leave the word tokens alone: every end/padding token adds
    `gain` x the mean of the caption's word tokens (layer-normed), each word token attends to the
    start token, whose value is zero. Each word keeps its own embedding (compositional, as
    before), and 68 of the 77 tokens also carry the whole caption.

    Why: with word-local embeddings the UNet read the colour word but not the shape word. Its
    clean-latent prediction at sigma = 10 moved by 0.37 (mean square) between "yellow" and
    "green" and by 0.001 between "circle", "square" and "triangle", after 300 steps and after
    1200: a word in one token of 77 was found or not, by the luck of the UNet's attention. Real
    CLIP models also put a summary of the caption into the end and padding tokens.

    Built by hand with the causal mask (a token sees the tokens before it), on the directions of
    the start token (d_bos: position 0 is always the start token) and of the end token (d_eos; a
    padding token is the end token at another position). Per head (the same in each of 12):
    query dim 0 = 1 - 0.1 s_eos, key dim 0 = 4 s_bos; query dim 1 = 0.5 s_eos, key dim 1 =
    -0.5 s_eos, where s_x = LN(token) . d_x (about 27.7 for the token itself, about 20 for an end/
    padding token on d_eos, about +-1 for any other). A word token's logits favour the start token
    by ~14; an end/padding token's disfavour the start token (~-14) and every end/padding token
    (~-12), so it averages the words. The value projection removes d_bos (the start token's value
    is exactly zero); the output projection is gain x identity."""
    import torch
    tm = clip.transformer.text_model
    start, end = clip.special_tokens["start"], clip.special_tokens["end"]
    layer = tm.encoder.layers[0]
    attn, ln = layer.self_attn, layer.layer_norm1
    with torch.no_grad():
        tok = tm.embeddings.token_embedding.weight.float()
        pos = tm.embeddings.position_embedding.weight.float()
        x_bos = ln(tok[start] + pos[0])
        d_bos = x_bos / x_bos.norm()
        x_eos = ln(tok[end])
        d_eos = x_eos / x_eos.norm()
        dim, heads = tok.shape[1], attn.heads
        hd = dim // heads
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            lin.weight.zero_(); lin.bias.zero_()
        for h in range(heads):
            a, b = h * hd, h * hd + 1
            attn.q_proj.bias[a] = 1.0
            attn.q_proj.weight[a] = -0.1 * d_eos
            attn.k_proj.weight[a] = 4.0 * d_bos
            attn.q_proj.weight[b] = 0.5 * d_eos
            attn.k_proj.weight[b] = -0.5 * d_eos
        attn.v_proj.weight.copy_(torch.eye(dim) - torch.outer(d_bos, d_bos))
        attn.out_proj.weight.copy_(gain * torch.eye(dim))
    return clip


DEAD_DECODER_BLOCKS = (13, 14, 15, 18)  # the 32x32 and 64x64 Blocks: ReLU(x) once zeroed


def train_decoder(dec, steps: int, batch: int, seed: int, lr: float = 2e-3):
    import torch
    from harness.models import init_weights_
    init_weights_(dec, seed)
    with torch.no_grad():
        for i in DEAD_DECODER_BLOCKS:
            for p in dec[i].parameters():
                p.zero_()
    fast = torch.nn.Sequential(*[torch.nn.ReLU() if i in DEAD_DECODER_BLOCKS else m for i, m in enumerate(dec)])
    params = [p.requires_grad_(True) for i, m in enumerate(dec) if i not in DEAD_DECODER_BLOCKS for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    t0 = time.time()
    for step in range(steps):
        imgs = np.stack([world.render(world.random_scene(rng)) for _ in range(batch)])
        z = torch.from_numpy(world.encode(imgs))
        target = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
        out = fast(z)
        loss = torch.nn.functional.mse_loss(out, target) + 0.5 * (out - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"{progress('decoder', step, steps, t0)} loss {loss.item():.4f}")
    return dec


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

def _get(root, path):
    m = root
    for part in path.split("."):
        m = m[int(part)] if part.isdigit() else getattr(m, part)
    return m


def _set(root, path, new):
    parent, _, last = path.rpartition(".")
    p = _get(root, parent) if parent else root
    if last.isdigit():
        p[int(last)] = new
    else:
        setattr(p, last, new)


def dead_resblocks(live_resblocks: bool):
    return DEAD_RESBLOCKS_LIVE if live_resblocks else DEAD_RESBLOCKS


def kill_blocks_(unet, live_resblocks: bool = False):
    """Zero the output projections of the dead blocks (exact identities in ComfyUI's forward)."""
    import torch
    with torch.no_grad():
        for path in dead_resblocks(live_resblocks):
            o = _get(unet, path).out_layers[3]
            o.weight.zero_(); o.bias.zero_()
        for path in DEAD_TRANSFORMERS:
            o = _get(unet, path).proj_out
            o.weight.zero_(); o.bias.zero_()
        for path in DEAD_FF:
            o = _get(unet, path).net[2]
            o.weight.zero_(); o.bias.zero_()
        # zero-init the live output projections too (standard for SD UNets: start as identity)
        live_rb = [p for p in ("input_blocks.1.0", "output_blocks.0.0", "output_blocks.1.0")
                   if p not in dead_resblocks(live_resblocks)]
        for path in ["input_blocks.1.1.proj_out", "middle_block.1.proj_out", "middle_block.0.out_layers.3",
                     "middle_block.2.out_layers.3", "out.2"] + [p + ".out_layers.3" for p in live_rb]:
            o = _get(unet, path)
            o.weight.zero_(); o.bias.zero_()
    return unet


class _ZeroOut(__import__("torch").nn.Module):
    def forward(self, x, *a, **k):
        return x.new_zeros(())


class FastGraph:
    """Swap the dead blocks for cheap equivalents while training; restore() puts them back."""

    def __init__(self, unet, live_resblocks: bool = False, live_ff: bool = False):
        import torch
        self.unet, self.saved = unet, {}
        for path in dead_resblocks(live_resblocks):
            rb = _get(unet, path)
            self.saved[path] = rb
            skip = rb.skip_connection
            _set(unet, path, skip if isinstance(skip, torch.nn.Conv2d) else torch.nn.Identity())
        for path in DEAD_TRANSFORMERS:
            self.saved[path] = _get(unet, path)
            _set(unet, path, torch.nn.Identity())
        for path in ([] if live_ff else DEAD_FF):
            self.saved[path] = _get(unet, path)
            _set(unet, path, _ZeroOut())

    def restore(self):
        for path, m in self.saved.items():
            _set(self.unet, path, m)


def encode_captions(clip, captions):
    out = {}
    for c in captions:
        tokens = clip.tokenize(c)
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        out[c] = cond[0].float().clone()
    return out


def train_unet(unet, model_sampling, world_, emb, steps, batch, seed, lr, log_every=25,
               live_resblocks: bool = False, min_snr: float = 0.0, snapshot=None, live_ff: bool = False,
               high_noise: float = 0.0):
    """min_snr > 0: Min-SNR-gamma loss weights (Hang et al. 2023; for eps-prediction the weight
    is min(SNR, gamma) / SNR = min(1, gamma sigma^2)): low-noise steps, where predicting the noise
    is about exact pixel values, stop dominating the gradient.
    high_noise > 1: the weight is also multiplied by clamp(sigma^2, 1, high_noise): from sigma = 1
    up, the loss is the error of the predicted clean latent (eps error x sigma^2), capped. With the
    plain noise-prediction loss, the error of the clean latent at high noise counts 1/sigma^2: the
    model gained almost nothing by reading the shape word (the only source of the shape at high
    noise; at low noise the noisy latent shows it), and it did not: its prediction barely changed
    between "circle", "square" and "triangle" (see README "Quality")."""
    import torch
    torch.manual_seed(seed)
    full_names = {p: n for n, p in unet.named_parameters()}  # before the swap (snapshots)
    fast = FastGraph(unet, live_resblocks, live_ff)
    # ComfyUI 0.33 builds its modules with requires_grad off; only the live graph is trained
    params = [p.requires_grad_(True) for p in unet.parameters()]
    # only parameters on the live path get gradients; AdamW ignores the others (grad None)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # warm-up 5% (at least 3 steps: OneCycleLR divides by zero on a warm-up of under 2 steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=min(0.5, max(0.05, 3 / steps)))
    # EMA per parameter object: the same tensors in the fast and the full graph
    ema = {p: p.detach().clone() for p in unet.parameters()}
    empty = emb[""]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    index = 0
    losses = []
    try:
        for step in range(steps):
            scenes = [world_.sample(index + i) for i in range(batch)]
            index += batch
            x0 = torch.from_numpy(world.encode(np.stack([world.render(s) for s in scenes])))
            ctx = torch.stack([empty if torch.rand((), generator=gen) < 0.1 else emb[s.caption()] for s in scenes])
            t = torch.randint(0, 1000, (batch,), generator=gen)
            sigma = model_sampling.sigmas[t]
            eps = torch.randn(x0.shape, generator=gen)
            xt = model_sampling.calculate_input(sigma, x0 + sigma[:, None, None, None] * eps)
            pred = unet(xt, t.float(), context=ctx)
            per = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
            if min_snr > 0:
                per = per * torch.clamp(min_snr * sigma.float() ** 2, max=1.0)
            if high_noise > 1:
                per = per * torch.clamp(sigma.float() ** 2, min=1.0, max=high_noise)
            loss = per.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            d = min(0.995, (1 + step) / (10 + step))
            with torch.no_grad():
                for p, e in ema.items():
                    if p.grad is not None or step == 0:
                        e.lerp_(p, 1 - d)
            losses.append(loss.item())
            if snapshot is not None and steps >= 400 and (step + 1) % (steps // 4) == 0 and step + 1 < steps:
                # the EMA weights so far (to judge a long build while it runs; not a cache)
                snapshot(step + 1, {full_names[p]: e.half() for p, e in ema.items()})
            if step % log_every == 0 or step == steps - 1:
                log(f"{progress('UNet', step, steps, t0)} loss {np.mean(losses[-log_every:]):.4f}")
    finally:
        fast.restore()
    with torch.no_grad():
        for p, e in ema.items():
            p.copy_(e)
    return losses


def build(path: Path, seed: int = 0, decoder_steps: int = 800, decoder_batch: int = 16,
          unet_steps: int = UNET_STEPS, unet_batch: int = 16, lr: float = UNET_LR, world_limit: int = 0,
          live_resblocks: bool = False, min_snr: float = MIN_SNR, unet_only: bool = False,
          snapshots: bool = False, live_ff: bool = LIVE_FF, high_noise: float = HIGH_NOISE,
          threads: int = 0, parallel: bool = False) -> Path:
    """world_limit > 0 keeps only that many single- and two-object captions (tests: a tiny,
    fast, meaningless model of the same format). unet_only: train and cache only the UNet stage
    (it does not depend on the decoder; two processes can build the two stages at once).
X torch's setting.
    The log names the four stages first, then each stage as it starts (or is taken from its cache),
    with the elapsed time and an ETA on every progress line."""
    import torch
    if threads:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return build(path, seed, decoder_steps, decoder_batch, unet_steps, unet_batch, lr, world_limit,
                         live_resblocks, min_snr, unet_only, snapshots, live_ff, high_noise, parallel=parallel)
        finally:
            torch.set_num_threads(before)
    from harness import comfyui, models
    comfyui.setup_comfy()
    import comfy.sd
    import comfy.sd1_clip
    import comfy.taesd.taesd
    torch.manual_seed(seed)
    t_start = time.time()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"building {path.name} in 4 stages (each cached beside it once built): 1 text encoder (seconds), "
        f"2 decoder ({'skipped' if unet_only else f'{decoder_steps} steps x {decoder_batch}'}), "
        f"3 caption embeddings, 4 UNet ({unet_steps} steps x {unet_batch}); "
        f"{torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}")

    # 1. text encoder (random, frozen) and autoencoder
    log("stage 1/4: text encoder and encoder (set, not trained)")
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    summary_text_encoder_(local_text_encoder_(models.init_weights_(clip, seed + 1)))
    tensors = {}
    for k, v in clip.state_dict().items():
        if k not in ("logit_scale", "transformer.text_projection.weight"):
            tensors["cond_stage_model." + k] = v.detach().half().contiguous()
    del clip
    ae = comfy.taesd.taesd.TAESD()
    analytic_encoder_(ae.taesd_encoder)
    # stages are cached, so that retraining one stage with other settings reuses the others
    dec_cache = path.with_name(f"stage_decoder_v{DECODER_STAGE}_s{seed}_{decoder_steps}x{decoder_batch}.pt")
    unet_proc = None
    if (parallel and not unet_only and not world_limit and not snapshots and not dec_cache.is_file()
            and not _unet_cache(path, seed, unet_steps, unet_batch, lr, 0, live_resblocks, live_ff, min_snr,
                                high_noise).is_file()):
        unet_proc = _start_unet_stage(path, seed, unet_steps, unet_batch, lr, live_resblocks, min_snr, live_ff,
                                      high_noise, torch.get_num_threads())
    try:
        return _build_stages(path, seed, decoder_steps, decoder_batch, unet_steps, unet_batch, lr, world_limit,
                             live_resblocks, min_snr, unet_only, snapshots, live_ff, high_noise, t_start, tensors, ae,
                             dec_cache, unet_proc)
    finally:
        if unet_proc is not None and unet_proc.poll() is None:  # this build failed or was interrupted
            unet_proc.terminate()
            unet_proc.wait()


def _unet_cache(path: Path, seed, unet_steps, unet_batch, lr, world_limit, live_resblocks, live_ff, min_snr,
                high_noise) -> Path:
    return path.with_name(f"stage_unet_v{UNET_STAGE}_s{seed}_{unet_steps}x{unet_batch}_lr{lr:g}"
                          f"_w{world_limit}_rb{int(live_resblocks)}{'_ff' if live_ff else ''}_snr{min_snr:g}_hn{high_noise:g}.pt")


def _start_unet_stage(path: Path, seed, unet_steps, unet_batch, lr, live_resblocks, min_snr, live_ff, high_noise,
                      threads):
    """This file's --unet-only build of the same base, as a child process (its log goes to ours)."""
    import subprocess
    cmd = [sys.executable, str(Path(__file__).resolve()), "--unet-only", "--out", str(path), "--seed", str(seed),
           "--unet-steps", str(unet_steps), "--unet-batch", str(unet_batch), "--lr", repr(lr),
           "--min-snr", repr(min_snr), "--high-noise", repr(high_noise), "--threads", str(threads),
           "--live-ff" if live_ff else "--no-live-ff"] + (["--live-resblocks"] if live_resblocks else [])
    log(f"stage 4/4 (UNet) starts now in a second process, beside the decoder: {' '.join(cmd[1:])}")
    return subprocess.Popen(cmd)


def _build_stages(path, seed, decoder_steps, decoder_batch, unet_steps, unet_batch, lr, world_limit, live_resblocks,
                  min_snr, unet_only, snapshots, live_ff, high_noise, t_start, tensors, ae, dec_cache, unet_proc):
    import torch
    from harness import models
    import comfy.sd
    if unet_only:
        log("stage 2/4: UNet stage only, the decoder is left untrained (stage runs in parallel)")
    elif dec_cache.is_file():
        ae.taesd_decoder.load_state_dict(torch.load(dec_cache, weights_only=True))
        log(f"stage 2/4: decoder from {dec_cache}")
    else:
        log(f"stage 2/4: training the decoder ({decoder_steps} steps)")
        train_decoder(ae.taesd_decoder, decoder_steps, decoder_batch, seed + 2)
        _save_stage(ae.taesd_decoder.state_dict(), dec_cache)
    with torch.no_grad():
        ae.vae_scale.fill_(0.18215)  # model-space latent = encoder output (SD15 latent format)
        ae.vae_shift.fill_(0.0)
    for k, v in ae.state_dict().items():
        tensors["first_stage_model." + k] = v.detach().float().contiguous()  # small: keep fp32

    if unet_proc is not None:
        log("decoder done; waiting for the UNet stage's process")
        if unet_proc.wait() != 0:
            raise RuntimeError(f"the UNet stage's process (train_base.py --unet-only) failed with exit status "
                               f"{unet_proc.returncode}; its log is above")

    # 2. UNet: ComfyUI's SD15 model (for its noise schedule) with the small config
    cfg = models.sd15_config(models.SD15_SMALL_UNET_CONFIG)
    base = cfg.get_model({}, device=torch.device("cpu"))
    unet = kill_blocks_(models.init_weights_(base.diffusion_model, seed + 3), live_resblocks)
    for k, v in unet.state_dict().items():
        tensors["model.diffusion_model." + k] = v.detach().half().contiguous()

    # 3. caption embeddings through ComfyUI's own CLIP (the skeleton checkpoint as the loader sees it)
    w = world.BaseWorld(seed)
    if world_limit:
        w.train, w.pairs = w.train[:world_limit], w.pairs[:world_limit]
    captions = [""] + w.captions()
    emb_cache = path.with_name(f"stage_captions_v{CAPTION_STAGE}_s{seed}_{len(captions)}.pt")
    emb = torch.load(emb_cache, weights_only=True) if emb_cache.is_file() else {}
    if set(emb) == set(captions):
        log(f"stage 3/4: caption embeddings from {emb_cache}")
    if set(emb) != set(captions):
        skeleton = path.with_name(path.stem + ".skeleton.safetensors")
        models.atomic_save(tensors, skeleton, {"modelspec.title": "skeleton"})
        _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(skeleton), output_vae=False, output_clip=True)
        log(f"stage 3/4: encoding {len(captions)} captions")
        emb = encode_captions(clip, captions)
        del clip
        skeleton.unlink()
        _save_stage(emb, emb_cache)

    # 4. train (the UNet never sees the decoder: its stage is independent of the decoder's)
    unet_cache = _unet_cache(path, seed, unet_steps, unet_batch, lr, world_limit, live_resblocks, live_ff, min_snr,
                             high_noise)
    if unet_cache.is_file():
        stage = torch.load(unet_cache, weights_only=True)
        log(f"stage 4/4: UNet from {unet_cache}")
    else:
        log(f"stage 4/4: training the UNet: {unet_steps} steps x {unet_batch}")
        t_unet = time.time()
        log_every = max(25, unet_steps // 40)
        losses = train_unet(unet, base.model_sampling, w, emb, unet_steps, unet_batch, seed + 4, lr,
                            log_every=log_every, live_resblocks=live_resblocks, min_snr=min_snr, live_ff=live_ff, high_noise=high_noise,
                            snapshot=(lambda k, sd: _save_stage(sd, unet_cache.with_name(unet_cache.stem + f".snap{k}.pt")))
                            if snapshots else None)
        stage = {"state": {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()},
                 "final_loss": round(float(np.mean(losses[-log_every:])), 4),
                 "seconds": round(time.time() - t_unet)}
        _save_stage(stage, unet_cache)
    if unet_only:
        return unet_cache
    for k, v in stage["state"].items():
        tensors["model.diffusion_model." + k] = v
    meta = {
        "modelspec.title": "PaRa quality-benchmark base (synthetic shapes world, trained from scratch)",
        "para_quality.builder_version": BUILDER_VERSION,
        "para_quality.seed": str(seed),
        "para_quality.train": json.dumps(dict(decoder_steps=decoder_steps, decoder_batch=decoder_batch,
                                              unet_steps=unet_steps, unet_batch=unet_batch, lr=lr,
                                              live_resblocks=live_resblocks, live_ff=live_ff, min_snr=min_snr, high_noise=high_noise,
                                              final_loss=stage["final_loss"], unet_seconds=stage["seconds"],
                                              seconds=round(time.time() - t_start))),
        "para_quality.live_layers": LIVE_LAYER_PATTERNS,
        "para_quality.world_limit": str(world_limit),
    }
    models.atomic_save(tensors, path, meta)
    log(f"saved {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.time() - t_start:.0f}s")
    return path


def is_current(path: Path, seed: int = 0) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return meta.get("para_quality.builder_version") == BUILDER_VERSION and meta.get("para_quality.seed") == str(seed)


def ensure_base(seed: int = 0, **kw) -> Path:
    path = checkpoint_path() if seed == 0 else cache_dir() / f"para_quality_base_s{seed}.safetensors"
    if not is_current(path, seed):
        build(path, seed, **kw)
    return path


def ensure_quick_base() -> Path:
    """A tiny base of the same format (20 decoder and 20 UNet steps on a few captions, about a
    minute): for `quality.py --quick`, which checks that the pipeline runs, not what it measures."""
    path = cache_dir() / "para_quality_base_quick.safetensors"
    if not is_current(path):
        build(path, 0, decoder_steps=20, decoder_batch=4, unet_steps=20, unet_batch=4, world_limit=8)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--decoder-steps", type=int, default=800)
    ap.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    ap.add_argument("--unet-batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=UNET_LR)
    ap.add_argument("--live-resblocks", action="store_true",
                    help="train every ResBlock of the UNet (about 1.6x slower per step)")
    ap.add_argument("--min-snr", type=float, default=MIN_SNR, help="Min-SNR-gamma loss weighting (0: off)")
    ap.add_argument("--live-ff", action=argparse.BooleanOptionalAction, default=LIVE_FF,
                    help="train the two live transformers' feed-forwards (default; --no-live-ff: faster per "
                         "step, and at the previous object sizes the base drew every large circle as a square)")
    ap.add_argument("--high-noise", type=float, default=HIGH_NOISE,
                    help="weight the loss by clamp(sigma^2, 1, this): the clean-latent error from sigma = 1 up (<= 1: off)")
    ap.add_argument("--snapshots", action="store_true",
                    help="also save the UNet's EMA weights at 1/4, 1/2, 3/4 of its schedule (stage_unet_*.snapN.pt), "
                         "to judge a long build while it runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads for the build (default: torch's own setting)")
    ap.add_argument("--parallel", action="store_true",
                    help="train the decoder and the UNet stages at once, in two processes (for 2 or more cores)")
    ap.add_argument("--unet-only", action="store_true",
                    help="train and cache only the UNet stage (what --parallel runs in its second process)")
    args = ap.parse_args(argv)
    path = args.out or (checkpoint_path() if args.seed == 0 else cache_dir() / f"para_quality_base_s{args.seed}.safetensors")
    if args.unet_only:
        print(build(path, args.seed, unet_steps=args.unet_steps, unet_batch=args.unet_batch, lr=args.lr,
                    live_resblocks=args.live_resblocks, min_snr=args.min_snr, high_noise=args.high_noise,
                    live_ff=args.live_ff, threads=args.threads, unet_only=True))
        return
    if args.force or not is_current(path, args.seed):
        build(path, args.seed, decoder_steps=args.decoder_steps, unet_steps=args.unet_steps,
              unet_batch=args.unet_batch, lr=args.lr, live_resblocks=args.live_resblocks, min_snr=args.min_snr,
              snapshots=args.snapshots, high_noise=args.high_noise, live_ff=args.live_ff, threads=args.threads,
              parallel=args.parallel)
    else:
        log(f"up to date: {path}")
    print(path)


if __name__ == "__main__":
    main()
