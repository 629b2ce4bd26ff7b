"""Small shared builders for the para_core tests: dense references and synthetic files.

No ComfyUI here. The dense references form the out x out projector Q Q^T explicitly (float64),
which the library never does, so they check the library's factored formulas independently.
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file

from para_core import ParaState, build_metadata, save_para

REPO_ROOT = Path(__file__).resolve().parent.parent


def dense_projector(B: torch.Tensor) -> torch.Tensor:
    """Q Q^T (out x out, float64) for the column space of B."""
    Q, _ = torch.linalg.qr(B.double(), mode="reduced")
    return Q @ Q.t()


def dense_reduce(W0: torch.Tensor, B: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """(I - s Q Q^T) W0 as a float64 tensor shaped like W0 (paper eq. 3, dense)."""
    W = W0.double().reshape(W0.shape[0], -1)
    P = dense_projector(B)
    return ((torch.eye(W.shape[0], dtype=torch.float64) - strength * P) @ W).reshape(W0.shape)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=generator(seed)).to(dtype)


# A tiny SD1.5-like checkpoint: LDM names, context 768 so family() says SD15. Shapes are small.
CKPT_LAYERS = {
    "input_blocks.0.0": (16, 4, 3, 3),
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q": (16, 16),
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k": (16, 768),
    "middle_block.0.emb_layers.1": (32, 64),
    "middle_block.2.out_layers.3": (32, 32, 3, 3),
    "middle_block.2.skip_connection": (32, 16, 1, 1),
}
CKPT_DTYPES = {  # a real checkpoint mixes dtypes less, but every weight must keep its own
    "middle_block.2.out_layers.3": torch.float16,
    "middle_block.2.skip_connection": torch.bfloat16,
}
PARA_LAYERS = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "middle_block.0.emb_layers.1",
               "middle_block.2.out_layers.3", "middle_block.2.skip_connection"]


def make_checkpoint(path, layout: str = "checkpoint", seed: int = 0, metadata=None) -> dict:
    """Write a fake SD-style checkpoint; returns the tensors written ({key: tensor}).

    layout: "checkpoint" (model.diffusion_model.* plus cond_stage_model.*, first_stage_model.*
    and alphas_cumprod), "diffusion_model" (diffusion_model.*) or "bare" (module keys only).
    """
    prefix = {"checkpoint": "model.diffusion_model.", "diffusion_model": "diffusion_model.", "bare": ""}[layout]
    g = generator(seed)
    tensors = {}
    for i, (path_, shape) in enumerate(CKPT_LAYERS.items()):
        dtype = CKPT_DTYPES.get(path_, torch.float32)
        tensors[f"{prefix}{path_}.weight"] = (torch.randn(*shape, generator=g) * 0.1).to(dtype)
        tensors[f"{prefix}{path_}.bias"] = torch.randn(shape[0], generator=g).to(dtype)
    tensors[f"{prefix}middle_block.2.in_layers.0.weight"] = torch.ones(32)  # a norm: 1-D, never a layer
    if layout == "checkpoint":
        tensors["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"] = torch.randn(50, 8, generator=g).half()
        tensors["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g)
        tensors["alphas_cumprod"] = torch.linspace(1, 0, 20)
    save_file(tensors, os.fspath(path), metadata=metadata or {"modelspec.title": "tiny test checkpoint"})
    return tensors


def make_subject(layers=None, rank: int = 2, seed: int = 1, shapes=None, prefix: str = "diffusion_model.",
                 base_fingerprint: str = "", base_arch: str = "SD15") -> ParaState:
    """A subject ParaState with random B for ``layers`` (default PARA_LAYERS of the fake checkpoint)."""
    layers = PARA_LAYERS if layers is None else layers
    shapes = CKPT_LAYERS if shapes is None else shapes
    g = generator(seed)
    B = {prefix + l: torch.randn(shapes[l][0], rank, generator=g) for l in layers}
    md = build_metadata("subject", rank=rank, ranks={k: rank for k in B}, layers="noxattn", base_arch=base_arch,
                        base_fingerprint=base_fingerprint, title=f"subject {seed}",
                        train={"steps": 10, "lr": 1e-3, "optimizer": "AdamW", "batch_size": 1, "seed": seed,
                               "resolution": 512, "dtype": "fp32", "trigger_words": "sks dog", "captions": 3})
    return ParaState(kind="subject", B=B, metadata=md)


def save_subject(path, **kw) -> ParaState:
    state = make_subject(**kw)
    save_para(state, os.fspath(path))
    return state


# A process that starts an atomic write (para_core.write.atomic_write) and hangs mid-write, for a
# test to SIGKILL: argv = pack root, folder, file name; it prints "writing" when the temporary
# file is on disk.
KILL_MID_WRITE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from para_core.write import atomic_write
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
        print("writing", flush=True)
        time.sleep(60)
    atomic_write(os.path.join(sys.argv[2], sys.argv[3]), write)
""")


def comfy_quant(fmt: str, **extra) -> torch.Tensor:
    """The comfy_quant tensor ComfyUI 0.3x stores beside a quantized weight (its format as JSON bytes)."""
    return torch.tensor(list(json.dumps({"format": fmt, **extra}).encode()), dtype=torch.uint8)


def quantize_fp8(w: torch.Tensor):
    """``w`` as float8_e4m3fn with one scale (weight, weight_scale), as ComfyUI's fp8 checkpoints store it."""
    scale = w.abs().max() / 448.0
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())
