"""PaRa Trainer's training previews: one image every N steps, sampled with the model being
trained, without changing the training."""
import time

import pytest
import torch

from harness import models
from pack_helpers import trainer_settings

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]

BASE = trainer_settings(rank=4, steps=4, filename_prefix="test_previews")


def train(mods, **kw):
    with torch.inference_mode():
        model = models.make_tiny_model(seed=0)
        lat = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
        positive = models.random_conditioning(1)
        return mods.trainer.PaRaTrainer.execute(model=model, latents=lat, positive=positive, **dict(BASE, **kw))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_previews_leave_B_bit_identical(mods, checkpointing):
    off = train(mods, gradient_checkpointing=checkpointing)
    on = train(mods, gradient_checkpointing=checkpointing, preview_every=2, preview_steps=3, preview_cfg=3.0)
    b_off, b_on = off.args[1], on.args[1]
    assert b_off.layers == b_on.layers
    assert all(torch.equal(b_off.B[l], b_on.B[l]) for l in b_off.layers)
    assert off.args[2]["loss"] == on.args[2]["loss"]
    images = on.args[4]
    assert images.shape[0] == 2 and images.shape[-1] == 3 and images.dtype == torch.float32  # steps 2 and 4
    assert off.args[4].shape[0] == 0
    shown = on.ui.as_dict()
    assert len(shown["images"]) == 2 and "2 preview(s)" in shown["text"][0]


def test_previews_show_the_model_being_trained(mods):
    """The preview at step N is what sampling the trained adapter at step N gives: with a large
    learning rate the two previews differ, and the last one equals a plain sample of the result."""
    out = train(mods, preview_every=2, preview_steps=3, preview_cfg=1.0, learning_rate=0.5)
    first, last = out.args[4]
    assert float((first - last).abs().max()) > 0.05
    import comfy.samplers
    trained = out.args[0]
    positive = models.random_conditioning(1)
    guider = comfy.samplers.CFGGuider(trained)
    guider.set_conds(positive, mods.previews.zeroed(positive))
    guider.set_cfg(1.0)
    sigmas = comfy.samplers.calculate_sigmas(trained.get_model_object("model_sampling"), "normal", 3)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    plain = mods.previews.latent_rgb(trained.model.latent_format, latent.float())
    # the same image up to the float rounding of the training forward vs the patched weights (8-bit previews)
    assert float((plain - last).abs().max()) <= 2 / 255 < float((plain - first).abs().max())


def test_previews_are_sent_live_through_the_progress_bar(mods, monkeypatch):
    import comfy.utils
    seen = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None, **kw: seen.append((value, preview)))
    train(mods, preview_every=2, preview_steps=2)
    previews = [(v, p) for v, p in seen if p is not None]
    assert [v for v, _ in previews] == [2, 4]
    fmt, image, size = previews[0][1]
    assert fmt == "JPEG" and image.size == (8, 8)


def test_preview_cost_is_reported_apart_from_the_step_times(mods, capsys):
    t0 = time.perf_counter()
    out = train(mods, steps=4, preview_every=4, preview_steps=4)
    total = time.perf_counter() - t0
    text = out.ui.as_dict()["text"][0]
    assert "1 preview(s)" in text and "not counted in the step times" in text
    print(f"\n{text} (whole run {total:.2f} s)")


@pytest.fixture(scope="module")
def train_image(comfy_server):
    from PIL import Image
    img = Image.new("RGB", (64, 64))
    img.putdata([((x * 4) % 256, (y * 4) % 256, 128) for y in range(64) for x in range(64)])
    img.save(comfy_server.input_dir / "para_preview_train.png")
    return "para_preview_train.png"


def _graph(image, prefix, **previews):
    g = models.txt2img_graph(save="latent", prefix=prefix, steps=1)
    g["load"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
    g["train"] = {"class_type": "PaRaTrainer", "inputs": dict(
        BASE, model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=2, rank_cap="reference",
        learning_rate=1e-2, filename_prefix=prefix, custom_layers="", trigger_words="", **previews)}
    g["save_para"] = {"class_type": "PaRaSave", "inputs": {"para": ["train", 1], "filename_prefix": prefix,
                                                          "dtype": "fp32"}}
    if previews:
        g["save_previews"] = {"class_type": "SaveImage", "inputs": {"images": ["train", 4], "filename_prefix": prefix}}
    g["sampler"]["inputs"]["model"] = ["train", 0]
    return g


@pytest.mark.server
def test_server_previews_appear_every_n_steps_without_changing_B(comfy_server, train_image):
    from safetensors.torch import load_file
    with comfy_server.client.listen() as ws:
        on = comfy_server.run(_graph(train_image, "prev_on", preview_every=2, preview_steps=2,
                                     preview_vae=["ckpt", 2], preview_seed=3), timeout=300)
        jpegs = [m for m in ws.of_type("preview_image") if m["image"][:3] == b"\xff\xd8\xff"]
    off = comfy_server.run(_graph(train_image, "prev_off"), timeout=300)
    assert len(jpegs) >= 2, "no live preview image reached the node"  # steps 2 and 4 (the final sample adds its own)
    assert all(m.get("node") in (None, "train") for m in jpegs)
    saved = comfy_server.output_files(on, "images")
    assert len([p for p in saved if p.name.startswith("prev_on")]) == 2
    from PIL import Image
    assert Image.open(saved[0]).size == (64, 64)  # decoded with the VAE, at the training size
    para = sorted((comfy_server.models_dir / "para").glob("prev_on_*.safetensors"))[-1]
    para_off = sorted((comfy_server.models_dir / "para").glob("prev_off_*.safetensors"))[-1]
    a, b = load_file(str(para)), load_file(str(para_off))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    times = [l for l in comfy_server.log_text().splitlines() if "PaRa: preview at step" in l]
    assert len(times) >= 2
    print("\n" + "\n".join(times[-2:]))
