"""Benchmark: one PaRa training step vs one step of ComfyUI's own LoRA training, in the same run.

Builds the full SD1.5 UNet shape (random weights, no download), or with --family a model that
ComfyUI detects as SDXL / SD2-v / SD3 / Flux / Lumina 2 (harness/families.py; --size real for the
released shape, conditioning of the family's shape made in-process), and trains, on the same layers
(a preset, default noxattn) at the same rank, through the same loop (nodes/training_loop.py: ComfyUI's
Guider_Basic, the model's own model_sampling, AdamW):
- PaRa: the PaRa Trainer's path (B per layer, activation-side forward, batched QR per step);
- LoRA: ComfyUI's training adapter (comfy.weight_adapter LoRA ``create_train``) installed with
  ``ModelPatcher.add_weight_wrapper``, exactly as TrainLoraNode does for each layer.
- frozen: the floor, the same step with the frozen model and no adapter; its only trainable
  tensor is one scalar added to the model's input, so the backward pass computes the activation
  gradients every adapter needs and no weight gradient.
The three alternate (round robin) so drift in machine load hits all alike, after one unmeasured
warm-up round (the first method in a fresh process is slower for several steps otherwise). Prints absolute
figures and, last: RESULT step_time_ratio=<PaRa/LoRA> peak_mem_ratio=<PaRa/LoRA>
trainable_params_ratio=<PaRa/LoRA> overhead_vs_frozen=<PaRa/frozen step time>. Peak memory is the whole process's (weights included):
sampled RSS on the CPU, the CUDA allocator's high-water mark on a GPU.

    python bench/train.py [--family sd15|sdxl|sd2v|sd3|flux|lumina2] [--size test|real]
                          [--device cpu|cuda] [--rank 4] [--preset noxattn] [--latent 32]
                          [--batch 1] [--dtype bf16|fp16|fp32] [--steps 3] [--warmup 2] [--rounds 3]
                          [--gradient-checkpointing] [--weight-side]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root makes harness/ and bench/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.apply import PeakMemory, add_family_args, family_patcher, release_memory  # noqa: E402  (shared with apply)


class LoraWrappers:
    """ComfyUI's LoRA training adapters, installed as weight wrappers (TrainLoraNode's way):
    nothing to install per step, the ModelPatcher applies them in every layer's forward."""

    def __init__(self, adapters):
        self.adapters = adapters

    def parameters(self):
        return [p for a in self.adapters.values() for p in a.parameters() if p.requires_grad]

    def prepare_step(self):
        pass

    def install(self):
        pass

    def remove(self):
        pass


class FrozenFloor:
    """No adapter: one trainable scalar added to the diffusion model's input, so that the step
    runs the same forward and backward through the frozen model (activation gradients only)."""

    def __init__(self, diffusion_model, device):
        import torch
        self.root = diffusion_model
        self.delta = torch.nn.Parameter(torch.zeros((), device=device))
        self._handle = None

    def parameters(self):
        return [self.delta]

    def prepare_step(self):
        pass

    def install(self):
        def shift(module, args, kwargs):
            return (args[0] + self.delta.to(args[0].dtype),) + tuple(args[1:]), kwargs
        self._handle = self.root.register_forward_pre_hook(shift, with_kwargs=True)

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--preset", default="noxattn")
    ap.add_argument("--latent", type=int, default=None, help="latent size (default 32 = 256 px for sd15, 16 for "
                                                             "the other families)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                    help="training dtype, the weights are stored in it too (default: bf16 on a GPU, fp32 on the "
                         "CPU, where bf16 is emulated unless it has AVX512-BF16/AMX)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per method and round")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per method and round (the first steps "
                    "after a method starts pay the allocator's page faults)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--weight-side", action="store_true",
                    help="also time PaRa forced onto the weight side (W' = W0 - Q Q^T W0 per step), to check the "
                         "trainer's choice of the activation side")
    add_family_args(ap)
    args = ap.parse_args(argv)
    args.latent = args.latent or (32 if args.family == "sd15" else 16)

    from harness import comfyui
    comfyui.configure_comfy(device=args.device, base_directory=tempfile.mkdtemp(prefix="para-bench-train-"))
    comfyui.setup_comfy()
    import torch
    import comfy.model_management as mm
    from comfy.weight_adapter import adapter_maps
    pack = comfyui.import_pack()
    import importlib
    importlib.import_module(pack.__name__ + ".nodes").setup()
    core = importlib.import_module(pack.__name__ + ".para_core")
    patching = importlib.import_module(pack.__name__ + ".nodes.patching")
    training = importlib.import_module(pack.__name__ + ".nodes.training_loop")
    para_adapter = importlib.import_module(pack.__name__ + ".nodes.adapters.para")
    trainer = importlib.import_module(pack.__name__ + ".nodes.trainer_node")
    ptrain = importlib.import_module(pack.__name__ + ".para_core.functional.projection")

    device = mm.get_torch_device()
    args.dtype = args.dtype or ("fp32" if device.type == "cpu" else "bf16")
    dtype = training.TRAINING_DTYPES[args.dtype]
    model, family, positive, channels = family_patcher(args.family, args.size, dtype, device, args.dtype)

    shapes = patching.layer_shapes(model)
    names = trainer.choose_layers(shapes, args.preset, "layers", family)
    modules = trainer.layer_modules(model, names, "layers")
    ranks = trainer.choose_ranks(names, shapes, args.rank, core.RankCap.REFERENCE)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch, channels, args.latent, args.latent, generator=gen)
    settings = training.TrainSettings(steps=args.warmup + args.steps, learning_rate=1e-4, optimizer="AdamW",
                                      batch_size=args.batch, seed=0, dtype=args.dtype,
                                      gradient_checkpointing=args.gradient_checkpointing)

    def para_run(side="auto"):
        with torch.inference_mode(False):
            g = training.generator_for(0, "init")
            B = {l: torch.nn.Parameter(ptrain.init_B(patching.original_weight(model, l), ranks[l], "orthogonal", g)
                                       .to(device)) for l in names}
        return model, para_adapter.ParaForward(modules, B, side=side)

    def lora_run():
        mp = model.clone()
        adapters = {}
        with torch.inference_mode(False):
            torch.manual_seed(0)
            for l in names:
                w = patching.original_weight(model, l)
                adapters[l] = adapter_maps["LoRA"].create_train(w, rank=args.rank, alpha=1.0).to(device)
                mp.add_weight_wrapper(l + ".weight", adapters[l])
        return mp, LoraWrappers(adapters)

    def frozen_run():
        return model, FrozenFloor(model.model.diffusion_model, device)

    methods = {"PaRa": para_run, "LoRA": lora_run, "frozen": frozen_run}
    if args.weight_side:
        methods["PaRa weight side"] = lambda: para_run("weight")
    times = {m: [] for m in methods}
    peaks = {m: [] for m in methods}
    overheads = {m: [] for m in methods}
    params = {}
    losses = {}
    warm = dataclasses.replace(settings, steps=args.warmup)
    for r in range(-1, args.rounds):  # round 0 (printed as such) only warms the process up: the first
        for name, make in methods.items():  # method to run in a fresh process pays its page faults
            mp, adapter = make()
            params[name] = sum(p.numel() for p in adapter.parameters())
            with PeakMemory(device) as mem:
                run = training.TrainingRun(mp, latents, positive, adapter, warm if r < 0 else settings)
                run.run()
            if r < 0:
                print(f"warm-up round {name}: steps {', '.join(f'{t:.3f}' for t in run.step_times)} s", flush=True)
                del run, adapter, mp
                mm.unload_all_models()
                release_memory(device)
                continue
            times[name] += run.step_times[args.warmup:]
            peaks[name].append(mem.peak)
            overheads[name].append(mem.peak - mem.start)
            losses[name] = run.losses
            print(f"round {r + 1} {name}: steps {', '.join(f'{t:.3f}' for t in run.step_times)} s, "
                  f"peak {mem.peak:.0f} MiB (+{mem.peak - mem.start:.0f} over the {mem.start:.0f} MiB before)", flush=True)
            del run, adapter, mp
            mm.unload_all_models()
            release_memory(device)

    res = {m: (statistics.median(times[m]), max(peaks[m]), max(overheads[m])) for m in methods}
    print(f"setup: {args.family} ({family}), {len(names)} layers ({args.preset}), rank {args.rank} (PaRa capped per layer: "
          f"{trainer.rank_summary(ranks)}), latent {args.latent}x{args.latent} ({args.latent * 8} px), batch "
          f"{args.batch}, {args.dtype}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"{args.rounds} rounds x {args.steps} measured steps")
    for m in methods:
        t, peak, over = res[m]
        print(f"{m:16s} step {t * 1000:9.1f} ms (median; min {min(times[m]) * 1000:.1f}, max {max(times[m]) * 1000:.1f}, "
              f"{len(times[m])} steps)   peak memory {peak:9.1f} MiB (+{over:.1f} MiB for training)   "
              f"trainable params {params[m]:,}   final loss {losses[m][-1]:.4f}")
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    (pt, pp, _), (lt, lp, _) = res["PaRa"], res["LoRA"]
    ft = res["frozen"][0]
    # per round: the methods ran back to back, so each round's ratio sees one load level
    per_round = [statistics.median(times["PaRa"][i * args.steps:(i + 1) * args.steps])
                 / statistics.median(times["frozen"][i * args.steps:(i + 1) * args.steps]) for i in range(args.rounds)]
    print(f"overhead_vs_frozen per round: {', '.join(f'{r:.3f}' for r in per_round)}")
    print(f"RESULT step_time_ratio={pt / lt:.3f} peak_mem_ratio={pp / lp:.3f} "
          f"trainable_params_ratio={params['PaRa'] / params['LoRA']:.3f} overhead_vs_frozen={pt / ft:.3f} "
          f"overhead_vs_frozen_min={min(per_round):.3f} overhead_vs_frozen_max={max(per_round):.3f}")


if __name__ == "__main__":
    main()
