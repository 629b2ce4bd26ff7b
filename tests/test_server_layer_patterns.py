"""Layer patterns through the real ComfyUI server: a hostile custom_layers pattern (catastrophic
backtracking, 100,000 patterns, 200 slow ones) is refused with a clear error naming the input,
and the server keeps answering /system_stats within a second while it is matched."""
import threading
import time

import pytest

from harness import models

pytestmark = [pytest.mark.comfyui, pytest.mark.server]

# A real custom_layers pattern: 25 s of backtracking in `re`, /system_stats and /interrupt waited ~12 s.
HOSTILE = r"re:input_blocks\.1\.1\.transfor([a-z_.0-9]+)+!"
# 100,000 patterns (1.8 MB): 66-70 s before the first step, +2.4 GB, /system_stats up to 2.1 s.
MANY = ",".join(f"*blocks.{i}.attn{i % 7}.to_q" for i in range(100_000))
# Patterns that backtrack on every real layer path (regex finds no shortcut) until their budget is spent.
SLOW = ",".join([r"re:(?:[a-z._0-9]|[a-z])*[A-Z]"] * 200)


@pytest.fixture(scope="module")
def train_image(comfy_server):
    from PIL import Image
    img = Image.new("RGB", (64, 64), (90, 140, 200))
    img.save(comfy_server.input_dir / "hardening.png")
    return "hardening.png"


def pattern_graph(image, pattern):
    g = models.txt2img_graph(save="image", prefix="hostile", steps=1)
    g["load"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
    g["train"] = {"class_type": "PaRaTrainer", "inputs": dict(
        model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=1, layers="noxattn", rank_cap="none",
        steps=1, learning_rate=1e-3, optimizer="AdamW", batch_size=1, seed=0, training_dtype="fp32",
        gradient_checkpointing=False, init="orthogonal", save_every=0, filename_prefix="hostile",
        resume_from="[none]", custom_layers=pattern, trigger_words="")}
    g["sampler"]["inputs"]["model"] = ["train", 0]
    return g


@pytest.mark.parametrize("pattern, says", [(HOSTILE, "selects no layer"), (MANY, "too long"), (SLOW, "takes too long")],
                         ids=["backtracking", "100000-patterns", "200-slow-patterns"])
def test_a_hostile_layer_pattern_never_stalls_the_server(comfy_server, train_image, pattern, says):
    # Warm-up with a harmless pattern: the first load of the checkpoint stalls a cold server by
    # itself (~1 s on 0.33 here); ComfyUI caches it, so the measured prompt runs only the trainer.
    comfy_server.wait(comfy_server.client.queue(pattern_graph(train_image, "*.no_such_layer")), timeout=300)
    # After a prompt ComfyUI runs gc.collect() (at most every 10 s), holding the GIL for a moment
    # that has nothing to do with patterns (1.6 s on 0.33 after a long test session): let it pass.
    time.sleep(1.0)
    for _ in range(3):
        comfy_server.client.get("/system_stats", timeout=60)
    g = pattern_graph(train_image, pattern)
    latencies, done = [], threading.Event()

    def poll():
        while not done.is_set():
            t0 = time.perf_counter()
            comfy_server.client.get("/system_stats", timeout=60)
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t0 = time.perf_counter()
    try:
        entry = comfy_server.wait(comfy_server.client.queue(g), timeout=300)
        took = time.perf_counter() - t0
    finally:
        done.set()
        poller.join(timeout=60)
    message = entry.message or ""
    assert "custom_layers" in message and says in message, message[:500]
    assert latencies and max(latencies) < 1.0, f"/system_stats took up to {max(latencies):.2f} s"
    assert took < 10, f"the prompt took {took:.1f} s"  # backtracking took minutes on these paths
