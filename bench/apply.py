"""Benchmark: applying a PaRa adapter vs ComfyUI's own LoRA path, in the same run.

Builds the full SD1.5 UNet shape (random weights, no download) or, with --family, a model that
ComfyUI detects as SDXL / SD2-v / SD3 / Flux / Lumina 2 (harness/families.py; --size real for the
released shape), makes a rank-r PaRa subject on a layer preset, exports it to the exact equivalent LoRA, and times ComfyUI patching the model
with each (clone + add_patches + load_models_gpu, i.e. the work KSampler triggers), plus the
stock "Load LoRA" path reading the PaRa file directly. Prints absolute figures and, last:
RESULT apply_time_ratio=<PaRa/LoRA, medians> peak_mem_ratio=<PaRa/LoRA> file_size_ratio=<PaRa/LoRA>
       apply_time_ratio_min=<lowest per-round ratio> apply_time_ratio_max=<highest>

    python bench/apply.py [--family sd15|sdxl|sd2v|sd3|flux|lumina2] [--size test|real] [--rank 4]
                          [--preset noxattn] [--dtype fp16] [--device cpu|cuda] [--repeats 5]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repo root makes harness/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SD15_UNET = dict(
    use_checkpoint=False, image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    context_dim=768, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_linear_in_transformer=False, use_temporal_resblock=False, use_temporal_attention=False,
)


def rss_mb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def release_memory(device):
    """Give freed memory back (CPU: glibc keeps freed arenas; CUDA: the caching allocator) so one
    method's peak does not carry over into the next one's measurement."""
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


class PeakMemory:
    """Absolute peak of the process during a block, in MiB, and the level at its start."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import threading
        import torch
        release_memory(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated() / 2**20
        else:
            self.start = self.peak = rss_mb()
            self._stop = threading.Event()

            def watch():
                while not self._stop.is_set():
                    self.peak = max(self.peak, rss_mb())
                    time.sleep(0.002)
            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_mb())


FAMILIES = ("sd15", "sdxl", "sd2v", "sd3", "flux", "lumina2")


def add_family_args(ap, default_size="test"):
    ap.add_argument("--family", choices=FAMILIES, default="sd15",
                    help="model family: sd15 (the full SD1.5 UNet shape) or one of the families of harness/families.py")
    ap.add_argument("--size", choices=["test", "real"], default=default_size,
                    help="families other than sd15: 'test' = the small model ComfyUI detects as that family (cached "
                         "test file), 'real' = the released model's shape with random weights (needs the memory: "
                         "SDXL 2.6B, Flux 11.9B parameters)")


def family_patcher(family: str, size: str, dtype, device, label: str):
    """(ModelPatcher, ComfyUI family name, conditioning, latent channels) for a benchmark model:
    sd15 -> sd15_patcher; any other family through ComfyUI's own detection (comfy.sd), the test
    size from the cache or the released shape built with seeded random weights."""
    import torch
    if family == "sd15":
        gen = torch.Generator().manual_seed(0)
        return sd15_patcher(dtype, device, label), "SD15", [[torch.randn(1, 77, 768, generator=gen), {}]], 4
    import comfy.sd
    from harness import families as fm, models
    t0 = time.perf_counter()
    opts = {"dtype": dtype}
    if size == "test":
        mp = comfy.sd.load_diffusion_model(str(fm.cached(family)), model_options=opts)
    else:
        with torch.no_grad():
            module = models.init_weights_(_real_module(fm, family), 0)
            sd = {k: v.to(torch.float16) for k, v in module.state_dict().items()}
            del module
        mp = comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts)
        del sd
    if device.type != "cpu":
        mp.load_device = device
    n_params = sum(p.numel() for p in mp.model.diffusion_model.parameters())
    cls = type(mp.model.model_config).__name__
    print(f"model: {family} ({size} size, detected by ComfyUI as {cls}, {mp.model.model_type.name}), "
          f"{n_params / 1e6:.1f}M params, {label}, built/loaded in {time.perf_counter() - t0:.1f}s")
    return mp, cls, fm.conditioning(family), fm.family(family).latent_channels


def _real_module(fm, family):
    """The released model's shape on the CPU (float32), uninitialised."""
    import torch
    m = fm._module(family, real=True)
    return m.to_empty(device=torch.device("cpu")).float()


def sd15_patcher(dtype, device, label: str):
    """A ModelPatcher around ComfyUI's SD1.5 model in the full UNet shape (SD15_UNET), seeded
    weights; prints its size and build time (shared with bench/train.py)."""
    import torch
    import comfy.model_patcher
    from harness import models
    t0 = time.perf_counter()
    model = models.sd15_config(SD15_UNET, dtype).get_model({}, device=torch.device("cpu"))
    models.init_weights_(model.diffusion_model, 0)
    mp = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    n_params = sum(p.numel() for p in model.diffusion_model.parameters())
    print(f"model: SD1.5 UNet shape, {n_params / 1e6:.1f}M params, {label}, built in {time.perf_counter() - t0:.1f}s")
    return mp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--preset", default="noxattn")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    add_family_args(ap)
    args = ap.parse_args(argv)

    from harness import comfyui
    comfyui.setup_comfy(device=args.device)
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils
    pack = comfyui.import_pack()
    import importlib
    nodes_pkg = importlib.import_module(pack.__name__ + ".nodes")
    nodes_pkg.setup()
    core = importlib.import_module(pack.__name__ + ".para_core")
    patching = importlib.import_module(pack.__name__ + ".nodes.patching")

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    mp, family, _, _ = family_patcher(args.family, args.size, dtype, device, args.dtype)

    shapes = patching.layer_shapes(mp)
    layers = core.select_layers(shapes, args.preset, family)
    ranks = {l: core.effective_rank(args.rank, shapes[l]) for l in layers}
    g = torch.Generator().manual_seed(0)
    state = core.ParaState(B={l: torch.randn(shapes[l][0], ranks[l], generator=g) for l in layers},
                           metadata=core.build_metadata("subject", rank=args.rank, layers=args.preset, base_arch=family,
                                                        base_fingerprint=patching.model_fingerprint(mp, layers)))
    tmp = Path(tempfile.mkdtemp(prefix="para-bench-"))
    para_path, lora_path = tmp / "subject.safetensors", tmp / "lora.safetensors"
    core.save_para(state, str(para_path), dtype=torch.float16)
    lora = core.export_lora(state, lambda l: patching.original_weight(mp, l), 1.0, torch.float16)
    core.atomic_save_safetensors(lora, str(lora_path), {})
    para_size, lora_size = para_path.stat().st_size, lora_path.stat().st_size
    para_params = state.num_params()
    lora_params = sum(v.numel() for k, v in lora.items() if not k.endswith(".alpha"))
    print(f"adapter: {len(layers)} layers ({args.preset}), rank {args.rank} (capped per layer, max {max(ranks.values())})")
    print(f"file size: PaRa {para_size / 2**20:.2f} MiB ({para_params} params) vs LoRA {lora_size / 2**20:.2f} MiB "
          f"({lora_params} params), fp16")

    para_sd = comfy.utils.load_torch_file(str(para_path), safe_load=True)
    lora_sd = comfy.utils.load_torch_file(str(lora_path), safe_load=True)

    def via_para_nodes():
        return patching.apply_para(mp, core.load_para(str(para_path)), 1.0)

    def via_stock_lora():
        return comfy.sd.load_lora_for_models(mp, None, lora_sd, 1.0, 0)[0]

    def via_stock_loader_para_file():
        return comfy.sd.load_lora_for_models(mp, None, para_sd, 1.0, 0)[0]

    def measure_once(make):
        with torch.no_grad(), PeakMemory(device) as pk:
            t = time.perf_counter()
            m = make()
            mm.load_models_gpu([m], force_full_load=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t
        m.unpatch_model(device_to=torch.device("cpu"))
        mm.unload_all_models()
        del m
        gc.collect()
        return elapsed, pk.peak - pk.start

    paths = (("PaRa (PaRa Loader)", via_para_nodes), ("LoRA (stock Load LoRA, exported file)", via_stock_lora),
             ("PaRa file via stock Load LoRA", via_stock_loader_para_file))
    samples = {name: [] for name, _ in paths}
    for rep in range(args.repeats + 1):  # round robin, so drift in machine load hits every path alike
        for name, fn in paths:
            t, mem = measure_once(fn)
            if rep:  # the first round warms up
                samples[name].append((t, mem))
    results = {}
    for name, _ in paths:
        ts = [x[0] for x in samples[name]]
        t = statistics.median(ts)
        mem = max(x[1] for x in samples[name])
        results[name] = (t, mem)
        print(f"{name:42s} patch time {t * 1000:8.1f} ms (min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f}, "
              f"{len(ts)} rounds)   peak extra memory {mem:8.1f} MiB")
    pt, pm = results["PaRa (PaRa Loader)"]
    lt, lm = results["LoRA (stock Load LoRA, exported file)"]
    # per-round ratios (each round times both paths back to back): their spread says how far load drift moved it
    rounds = [p[0] / l[0] for p, l in zip(samples["PaRa (PaRa Loader)"], samples["LoRA (stock Load LoRA, exported file)"])]
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"per-round apply time ratio: min {min(rounds):.3f}, median {statistics.median(rounds):.3f}, max {max(rounds):.3f}")
    print(f"RESULT apply_time_ratio={pt / lt:.3f} peak_mem_ratio={(pm / lm) if lm > 0 else float('nan'):.3f} "
          f"file_size_ratio={para_size / lora_size:.3f} apply_time_ratio_min={min(rounds):.3f} "
          f"apply_time_ratio_max={max(rounds):.3f}")


if __name__ == "__main__":
    main()
