"""PaRa Trainer (nodes/trainer_node.py, training_loop.py): in-process on a tiny model with real ComfyUI classes, run under
torch.inference_mode() like the server runs nodes, then through the real server."""
import json
import math
import os
import re

import pytest
import torch

from harness import models
from pack_helpers import trainer_settings

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]

BASE = trainer_settings(rank=4, steps=4)


@pytest.fixture
def model(comfy_in_process):
    # Built under inference mode, as a checkpoint loaded by a node in the server is.
    with torch.inference_mode():
        return models.make_tiny_model(seed=0)


def latents(n=1, seed=0):
    return {"samples": torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))}


def train(mods, model, lat=None, positive=None, **kw):
    lat = latents() if lat is None else lat
    positive = models.random_conditioning(1) if positive is None else positive
    with torch.inference_mode():  # as the server runs every node
        out = mods.trainer.PaRaTrainer.execute(model=model, latents=lat, positive=positive, **dict(BASE, **kw))
    return out.args[:4]  # (MODEL, PARA, {"loss": [...]}, steps); [4] is the previews


def para_dir():
    import folder_paths
    return folder_paths.get_folder_paths("para")[0]


def checkpoints(prefix):
    """This prefix's checkpoints, <prefix>_<run>_step<N>.safetensors: exactly, so another test's
    prefix that starts with this one (test_dynamic_vram's oom_<form>) is not counted."""
    pattern = re.compile(re.escape(prefix) + r"_\d{5}_step\d{6}\.safetensors")
    return sorted(f for f in os.listdir(para_dir()) if pattern.fullmatch(f))


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


def fixed_loss(mods, model, lat, positive, n=16):
    """The training loss on fixed noise and an even spread of timesteps: comparable across runs."""
    import comfy.model_management as mm
    with torch.no_grad():
        mm.load_models_gpu([model], force_full_load=True)
        base = model.model
        ms = base.model_sampling
        x = base.process_latent_in(lat["samples"])
        cond = positive[0][0].expand(x.shape[0], -1, -1)
        g = torch.Generator().manual_seed(123)
        total = 0.0
        for i in range(n):
            sigma = torch.full((x.shape[0],), float(ms.percent_to_sigma((i + 0.5) / n)))
            xt = ms.noise_scaling(sigma, torch.randn(x.shape, generator=g), x, False)
            den = base.apply_model(xt, sigma, c_crossattn=cond)
            total += mods.training.diffusion_loss_sum(ms, den, x, sigma).item() / x.numel()
    return total / n


# ------------------------------------------------------------------------- training works

def test_loss_falls_on_a_fixed_target(mods, model):
    lat, pos = latents(1, seed=3), models.random_conditioning(1)
    before = fixed_loss(mods, model, lat, pos)
    out_model, para, loss, steps = train(mods, model, lat, pos, steps=40, learning_rate=2e-2)
    after = fixed_loss(mods, out_model, lat, pos)
    assert steps == 40 and len(loss["loss"]) == 40 and all(math.isfinite(v) for v in loss["loss"])
    print(f"fixed-target loss {before:.4f} -> {after:.4f}")
    assert after < 0.85 * before, (before, after)


def test_only_B_changes_and_the_model_is_left_as_found(mods, model):
    assert all(p.is_inference() for p in model.model.parameters())  # as loaded by a node in the server
    before = snapshot(model)
    modules = dict(model.model.named_modules())
    out_model, para, _, _ = train(mods, model, steps=3)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items()), "base weights changed"
    assert not model.patches and "forward" not in vars(modules["diffusion_model.input_blocks.1.0.in_layers.2"])
    assert not any("forward" in vars(m) for m in modules.values()), "a forward override was left behind"
    init = mods.training.generator_for(0, "init")
    B0 = mods.projection.init_B(before[para.layers[0] + ".weight"], 4, "orthogonal", init)
    assert not torch.equal(para.B[para.layers[0]], B0), "B did not train"
    assert all(b.dtype == torch.float32 and not b.requires_grad for b in para.B.values())


def test_patched_weights_equal_the_core_reduction_of_the_trained_B(mods, model):
    base = snapshot(model)
    out_model, para, _, _ = train(mods, model, steps=3)
    import comfy.model_management as mm
    with torch.no_grad():
        mm.load_models_gpu([out_model], force_full_load=True)
    after = snapshot(out_model)
    out_model.unpatch_model()
    for l in para.layers:
        Q = mods.core.basis(para.B[l])
        ref = mods.projection.reduce_weight(base[l + ".weight"], Q, Q)
        torch.testing.assert_close(after[l + ".weight"], ref, rtol=1e-5, atol=1e-6)
    for k, v in base.items():
        if k[: -len(".weight")] not in para.B:
            assert torch.equal(after[k], v), k


def test_training_forward_equals_the_patched_model(mods, model):
    """What the loop trains (activation side on W0) is what the patched model computes."""
    out_model, para, _, _ = train(mods, model, steps=2)
    import comfy.model_management as mm
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma, ctx = torch.tensor([2.0, 0.5]), models.random_conditioning(2)[0][0].expand(2, -1, -1)
    with torch.no_grad():
        mm.load_models_gpu([out_model], force_full_load=True)
        patched = out_model.model.apply_model(x, sigma, c_crossattn=ctx)
        out_model.unpatch_model()
        mm.load_models_gpu([model], force_full_load=True)
        mods_ = {l: dict(model.model.named_modules())[l] for l in para.layers}
        fwd = mods.para.ParaForward(mods_, {l: torch.nn.Parameter(b) for l, b in para.B.items()})
        fwd.install()
        try:
            with torch.enable_grad():  # training: the activation side everywhere
                fwd.prepare_step()
                trained = model.model.apply_model(x, sigma, c_crossattn=ctx).detach()
            training_sides = set(fwd.sides.values())
            fwd.prepare_step()  # no grad: each layer's cheaper forward-only side
            inference = model.model.apply_model(x, sigma, c_crossattn=ctx)
        finally:
            fwd.remove()
    assert training_sides == {"activation"} and set(fwd.sides.values()) == {"activation", "weight"}
    torch.testing.assert_close(trained, patched, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inference, patched, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_B(mods, model):
    _, plain, _, _ = train(mods, model, steps=3, filename_prefix="gc_off")
    _, ckpt, _, _ = train(mods, model, steps=3, filename_prefix="gc_on", gradient_checkpointing=True)
    for l in plain.layers:
        torch.testing.assert_close(ckpt.B[l], plain.B[l], rtol=1e-5, atol=1e-6)
    assert not any("forward" in vars(m) for m in model.model.modules())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_training_keeps_B_in_float32(mods, model, dtype):
    _, para, loss, _ = train(mods, model, steps=3, training_dtype=dtype)
    assert all(math.isfinite(v) for v in loss["loss"])
    assert all(b.dtype == torch.float32 and torch.isfinite(b).all() for b in para.B.values())
    assert json.loads(para.metadata["para.train"])["dtype"] == dtype


def test_one_caption_per_image(mods, model):
    pos = models.random_conditioning(1) + models.random_conditioning(2)
    _, para, loss, _ = train(mods, model, latents(2), pos, steps=2, batch_size=2)
    assert len(loss["loss"]) == 2 and all(math.isfinite(v) for v in loss["loss"])
    assert json.loads(para.metadata["para.train"])["captions"] == 2


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_loss_is_the_mse_of_the_models_own_prediction(mods, comfy_in_process, kind):
    """From ComfyUI's sampling object alone: eps error for eps models (SD1.5, SDXL), v error for
    v-prediction (SD2 768), velocity error (noise - x0) for flow models (SD3, Flux)."""
    import comfy.model_sampling as cms
    base, pred = {"eps": (cms.ModelSamplingDiscrete, cms.EPS), "v": (cms.ModelSamplingDiscrete, cms.V_PREDICTION),
                  "flow": (cms.ModelSamplingDiscreteFlow, cms.CONST)}[kind]
    ms = type("MS", (base, pred), {})()
    mods.training.check_trainable(ms)
    g = torch.Generator().manual_seed(0)
    x0, noise, delta = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([float(ms.percent_to_sigma(p)) for p in (0.1, 0.5, 0.9)])
    xt = ms.noise_scaling(sigma, noise.clone(), x0, False)
    s = sigma.view(-1, 1, 1, 1)
    target = {"eps": noise, "v": (noise - s * x0) / (1 + s ** 2).sqrt(), "flow": noise - x0}[kind]
    denoised = ms.calculate_denoised(sigma, target + delta, xt)
    loss = mods.training.diffusion_loss_sum(ms, denoised, x0, sigma)
    torch.testing.assert_close(loss, delta.square().sum(), rtol=1e-4, atol=1e-3)


def test_a_sampling_object_without_a_training_target_is_a_clear_error(mods):
    with pytest.raises(mods.core.ParaError, match="cannot"):
        mods.training.check_trainable(object())


# ------------------------------------------------------------------------- checkpoints and resume

def test_checkpoints_are_valid_para_files_with_metadata_and_trainer_state(mods, model):
    _, para, loss, _ = train(mods, model, steps=4, save_every=2, filename_prefix="meta",
                             trigger_words="sks dog", learning_rate=1e-3)
    files = checkpoints("meta")
    assert files == ["meta_00001_step000002.safetensors", "meta_00001_step000004.safetensors"]
    fp = mods.patching.model_fingerprint(model, para.layers)
    for name, step in zip(files, (2, 4)):
        path = os.path.join(para_dir(), name)
        st = mods.core.load_para(path)
        train_md = json.loads(st.metadata["para.train"])
        assert train_md["steps"] == step and train_md["total_steps"] == 4
        assert train_md["lr"] == 1e-3 and train_md["optimizer"] == "AdamW" and train_md["batch_size"] == 1
        assert train_md["seed"] == 0 and train_md["resolution"] == "64x64" and train_md["dtype"] == "fp32"
        assert train_md["trigger_words"] == "sks dog" and train_md["captions"] == 1 and train_md["images"] == 1
        assert train_md["final_loss"] == loss["loss"][step - 1]
        assert st.metadata["modelspec.trigger_phrase"] == "sks dog"
        assert st.metadata["para.layers"] == "noxattn"
        assert st.metadata["para.base_arch"] == mods.patching.model_family(model)
        assert st.metadata["para.base_fingerprint"] == fp
        assert json.loads(st.metadata["para.ranks"]) == {l: 4 for l in para.layers}
        state = mods.core.trainer_state.load_trainer_state(mods.core.trainer_state.trainer_state_path(path))
        assert state["step"] == step and state["loss_history"] == loss["loss"][:step]
    last = mods.core.load_para(os.path.join(para_dir(), files[-1]))
    assert all(torch.equal(last.B[l], para.B[l]) for l in para.layers)
    assert json.loads(para.metadata["para.train"])["steps"] == 4


def test_resume_from_a_checkpoint_equals_training_in_one_go(mods, model):
    _, whole, loss, _ = train(mods, model, latents(2), steps=6, save_every=3, batch_size=1, filename_prefix="whole")
    mid = checkpoints("whole")[0]
    assert mid.endswith("_step000003.safetensors")
    _, resumed, loss2, steps = train(mods, model, latents(2), steps=6, resume_from=mid, filename_prefix="resumed")
    assert steps == 6
    assert loss2["loss"] == pytest.approx(loss["loss"], rel=1e-6, abs=1e-7)
    for l in whole.layers:
        torch.testing.assert_close(resumed.B[l], whole.B[l], rtol=1e-6, atol=1e-7)
    assert json.loads(resumed.metadata["para.train"])["resumed_from"] == mid


def test_a_para_file_alone_warm_starts_B(mods, model):
    _, first, _, _ = train(mods, model, steps=2, save_every=2, filename_prefix="warm_src")
    name = checkpoints("warm_src")[0]
    import shutil
    shutil.copy(os.path.join(para_dir(), name), os.path.join(para_dir(), "warm_only.safetensors"))
    _, warm, loss, steps = train(mods, model, steps=1, learning_rate=1e-7, resume_from="warm_only.safetensors",
                                 filename_prefix="warm_dst")
    assert steps == 1 and len(loss["loss"]) == 1
    for l in first.layers:  # a tiny step from the file's B, not from a fresh init
        torch.testing.assert_close(warm.B[l], first.B[l], rtol=0, atol=1e-5)
    assert json.loads(warm.metadata["para.train"])["warm_start_from"] == "warm_only.safetensors"


# ------------------------------------------------------------------------- stopping

def test_cancel_mid_run_saves_the_last_step_and_raises_comfyui_interrupt(mods, model, monkeypatch):
    import comfy.model_management as mm
    real, calls = mods.para.basis_batched, []

    # The Cancel button, pressed during step 4 (Q is computed once at the start of each step).
    # Not from a progress-bar hook: ComfyUI 0.33 throttles those (at most one per 100 ms), so on
    # fast steps the hook never sees step 3 and a test keyed on it never cancels.
    def basis_batched(B):
        calls.append(1)
        if len(calls) == 4:
            mm.interrupt_current_processing(True)
        return real(B)

    monkeypatch.setattr(mods.para, "basis_batched", basis_batched)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(mods, model, steps=50, filename_prefix="cancel")
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 4  # it stopped in step 4, not later
    assert checkpoints("cancel") == ["cancel_00001_step000003.safetensors"]
    path = os.path.join(para_dir(), checkpoints("cancel")[0])
    st = mods.core.load_para(path)
    md = json.loads(st.metadata["para.train"])
    assert md["steps"] == 3 and md["stopped"] == "interrupted"
    assert mods.core.trainer_state.load_trainer_state(mods.core.trainer_state.trainer_state_path(path))["step"] == 3
    assert not any("forward" in vars(m) for m in model.model.modules())


def test_nan_loss_stops_with_the_last_good_checkpoint(mods, model):
    # Image 1's caption embedding is broken; the first epoch's order decides when it is drawn.
    seed = next(s for s in range(50) if mods.training.batch_indices(s, 0, 2, 1) == [0])
    assert mods.training.batch_indices(seed, 1, 2, 1) == [1]
    pos = models.random_conditioning(1) + [[torch.full((1, 77, models.TINY_CONTEXT_DIM), float("nan")), {}]]
    with pytest.raises(mods.core.ParaError, match="NaN/Inf at step 2") as err:
        train(mods, model, latents(2), pos, steps=10, seed=seed, filename_prefix="nan")
    assert checkpoints("nan") == ["nan_00001_step000001.safetensors"]
    assert "nan_00001_step000001.safetensors" in str(err.value)
    st = mods.core.load_para(os.path.join(para_dir(), checkpoints("nan")[0]))  # load_para rejects NaN B
    assert json.loads(st.metadata["para.train"])["steps"] == 1


def test_out_of_memory_keeps_the_last_step_and_says_what_to_lower(mods, model, monkeypatch):
    real, calls = mods.para.basis_batched, []

    def basis_batched(B):  # the allocator gives up at the third step (no GPU to exhaust here)
        calls.append(1)
        if len(calls) == 3:
            raise mods.training.OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(B)

    monkeypatch.setattr(mods.para, "basis_batched", basis_batched)
    with pytest.raises(mods.core.ParaError, match="out of memory") as err:
        train(mods, model, steps=10, filename_prefix="oom")
    for advice in ("batch_size", "gradient_checkpointing", "rank"):
        assert advice in str(err.value)
    assert checkpoints("oom") == ["oom_00001_step000002.safetensors"]


# ------------------------------------------------------------------------- invalid inputs

@pytest.mark.parametrize("case, changes, input_name", [
    ("empty latents", {"lat": {"samples": torch.zeros(0, 4, 8, 8)}}, "latents"),
    ("wrong latent channels", {"lat": {"samples": torch.zeros(1, 16, 8, 8)}}, "latents"),
    ("NaN latent", {"lat": {"samples": torch.full((1, 4, 8, 8), float("nan"))}}, "latents"),
    ("3 images, 2 captions", {"lat": latents(3), "positive": models.random_conditioning(1) * 2}, "positive"),
    ("rank 0", {"rank": 0}, "rank"),
    ("rank above the layer size", {"rank": 1000}, "rank"),
    ("steps 0", {"steps": 0}, "steps"),
    ("learning rate 0", {"learning_rate": 0.0}, "learning_rate"),
    ("learning rate inf", {"learning_rate": float("inf")}, "learning_rate"),
    ("bad regex", {"custom_layers": "re:attn1.(to_q"}, "custom_layers"),
    ("pattern selecting nothing", {"custom_layers": "*.no_such_layer"}, "custom_layers"),
    ("missing resume file", {"resume_from": "nope.safetensors"}, "resume_from"),
    ("prefix outside models/para", {"filename_prefix": "../../escape"}, "filename_prefix"),
])
def test_invalid_input_is_an_error_naming_it(mods, model, case, changes, input_name):
    changes = dict(changes)
    lat, pos = changes.pop("lat", None), changes.pop("positive", None)
    with pytest.raises(mods.core.ParaError, match=f"input '{input_name}'"):
        train(mods, model, lat, pos, **changes)


def test_loss_output_plots_with_comfyui_loss_graph(mods, model, comfy_base_dir):
    from comfy_extras.nodes_train import LossGraphNode
    import folder_paths
    os.makedirs(folder_paths.get_temp_directory(), exist_ok=True)  # the server makes it at start
    _, _, loss, _ = train(mods, model, steps=3)
    if hasattr(LossGraphNode, "plot_loss"):  # ComfyUI 0.3.64: V1 node
        image = LossGraphNode().plot_loss(loss, "para_loss_test")["ui"]["images"][0]
    else:  # 0.3x: V3 node, its classmethod execute returns a NodeOutput with a preview
        image = LossGraphNode.execute(loss, "para_loss_test").ui.as_dict()["images"][0]
    assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), image["filename"]))


# ------------------------------------------------------------------------- through the server

def _train_graph(image, steps, save_every, prefix, lr=1e-3):
    g = models.txt2img_graph(save="image", prefix=prefix, steps=2)
    g["load"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}}
    g["train"] = {"class_type": "PaRaTrainer", "inputs": dict(
        BASE, model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=2, rank_cap="reference",
        steps=steps, learning_rate=lr, save_every=save_every, filename_prefix=prefix, custom_layers="",
        trigger_words="sks")}
    g["sampler"]["inputs"]["model"] = ["train", 0]
    return g


@pytest.fixture(scope="module")
def train_image(comfy_server):
    from PIL import Image
    img = Image.new("RGB", (64, 64))
    img.putdata([((x * 4) % 256, (y * 4) % 256, 128) for y in range(64) for x in range(64)])
    img.save(comfy_server.input_dir / "para_train.png")
    return "para_train.png"


@pytest.mark.server
def test_server_trains_then_samples_with_progress_on_the_websocket(comfy_server, train_image):
    graph = _train_graph(train_image, steps=3, save_every=3, prefix="srv_train")
    with comfy_server.client.listen() as ws:
        prompt_id = comfy_server.client.queue(graph)
        entry = comfy_server.wait(prompt_id, timeout=300)
        assert entry.status == "success", entry.message
        ws.wait_for(lambda m: m.get("type") == "executing" and m.get("node") is None
                    and m.get("prompt_id") == prompt_id, timeout=10)
    progress = [p for p in ws.of_type("progress", prompt_id) if p.get("node") == "train"]
    assert [p["value"] for p in progress][-1] == 3 and progress[-1]["max"] == 3
    assert any("step 3/3" in m["text"] for m in ws.of_type("progress_text")), "the loss text did not reach the node"
    images = comfy_server.output_files(entry, "images")
    assert len(images) == 1 and images[0].is_file()
    assert (comfy_server.models_dir / "para" / "srv_train_00001_step000003.safetensors").is_file()
    assert (comfy_server.models_dir / "para" / "srv_train_00001_step000003.trainer.pt").is_file()


@pytest.mark.server
def test_server_interrupt_cancels_training_and_the_next_prompt_runs(comfy_server, train_image):
    graph = _train_graph(train_image, steps=100_000, save_every=0, prefix="srv_cancel")
    with comfy_server.client.listen() as ws:
        prompt_id = comfy_server.client.queue(graph)
        ws.wait_for(lambda m: m.get("type") == "progress" and m.get("node") == "train"
                    and m.get("value", 0) >= 2, timeout=300)
        comfy_server.client.interrupt()
        entry = comfy_server.wait(prompt_id, timeout=120)
    assert entry.error_details["event"] == "execution_interrupted"
    saved = sorted((comfy_server.models_dir / "para").glob("srv_cancel_*_step*.safetensors"))
    assert len(saved) == 1 and int(saved[0].stem.rsplit("step", 1)[1]) >= 2
    after = comfy_server.run(_train_graph(train_image, steps=1, save_every=0, prefix="srv_after"), timeout=300)
    assert after.status == "success"
