"""The quality benchmark's parts (bench/): the synthetic world, the judges, the base model's
format, and the whole pipeline end to end at tiny settings.

The numbers of the real benchmark come from `python bench/quality.py`; these tests only show
that the machinery is deterministic, that the judges are accurate on ground truth, and that
every stage runs through ComfyUI (skipped when ComfyUI is absent)."""
import numpy as np
import pytest

pytest.importorskip("scipy", reason="the benchmark's judges need scipy (ComfyUI installs it; or pip install scipy)")
pytest.importorskip("PIL", reason="the benchmark's world draws with Pillow (ComfyUI installs it; or pip install pillow)")

from bench import judges, world  # noqa: E402

# What bench/judges.py states about itself (see the benchmark's judges table).
JUDGE_ACCURACY = {"background": 0.98, "colour": 0.97, "size": 0.95, "shape": 0.95, "count": 0.95}


def test_world_is_deterministic():
    a, b = world.BaseWorld(0), world.BaseWorld(0)
    assert a.captions() == b.captions()
    for i in (0, 1, 57):
        assert a.sample(i) == b.sample(i)
        assert np.array_equal(world.render(a.sample(i)), world.render(b.sample(i)))
    assert world.BaseWorld(1).captions() != a.captions()


def test_held_out_captions_never_in_training():
    w = world.BaseWorld(0)
    train = set(w.captions())
    assert w.held_out
    import random
    for combo in w.held_out:
        assert world.scene_from_combo(combo, random.Random(0)).caption() not in train
    # the base world never shows the novel shapes
    assert not any(s in c for c in train for s in world.NOVEL_SHAPES)


def test_base_world_keeps_its_layout_and_the_judges_world_does_not():
    """The base model's scenes sit at the layout's places (one object: the centre; two: top-left,
    bottom-right), jittered by at most LAYOUT_JITTER; the autoencoder's and judges' scenes
    (random_scene) put objects anywhere."""
    import random
    w, j = world.BaseWorld(0), world.LAYOUT_JITTER
    singles = pairs = 0
    for i in range(200):
        objs = w.sample(i).objects
        centres = [(0.5, 0.5)] if len(objs) == 1 else list(world.PAIR_CENTRES)
        for o, (x, y) in zip(objs, centres):
            assert abs(o.cx - x) <= j and abs(o.cy - y) <= j, (i, o)
        singles += len(objs) == 1
        pairs += len(objs) == 2
    assert singles and pairs
    # two small objects at the pair places never touch
    pair = w.sample(next(i for i in range(200) if len(w.sample(i).objects) == 2))
    assert len(judges.object_masks(world.render(pair))) == 2
    rng = random.Random(3)
    xs = [world.random_scene(rng).objects[0].cx for _ in range(100)]
    assert max(xs) - min(xs) > 0.3


def test_render_matches_caption_attributes():
    scene = world.Scene((world.Obj("square", "red", "large", 0.5, 0.5),), "blue")
    img = world.render(scene)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert tuple(img[32, 32]) == world.OBJECT_COLOURS["red"]
    assert tuple(img[1, 1]) == world.BACKGROUNDS["blue"]
    assert scene.caption() == "a large red square on a blue background"
    assert scene.caption({"square": "sks"}) == "a large red sks on a blue background"


def test_latent_is_the_8x8_colour_mean():
    scene = world.Scene((world.Obj("circle", "green", "small", 0.3, 0.3),), "white")
    z = world.encode(world.render(scene)[None])
    assert z.shape == (1, 4, 8, 8)
    white = world.LATENT_GAIN * (np.array(world.BACKGROUNDS["white"]) / 255 - 0.5)
    assert np.allclose(z[0, :3, 7, 7], white, atol=1e-5)


@pytest.fixture(scope="module")
def trained_judges():
    return judges.Judges.build(n=400, seed=11)


def test_judges_reach_their_stated_accuracy_on_ground_truth(trained_judges):
    acc = trained_judges.validate(n=150, seed=12)
    for key, floor in JUDGE_ACCURACY.items():
        assert acc[f"gt_{key}"] >= floor, (key, acc)


def test_judges_read_a_known_scene(trained_judges):
    scene = world.Scene((world.Obj("bar", "yellow", "large", 0.5, 0.5),), "gray")
    d = trained_judges.describe(world.render(scene))
    assert d["background"] == "gray"
    (o,) = d["objects"]
    assert (o.shape, o.colour, o.size) == ("bar", "yellow", "large")
    assert abs(o.cx - 0.5) < 0.05 and abs(o.cy - 0.5) < 0.08


@pytest.mark.parametrize("size", ["large", "small"])
def test_instance_judge_tells_the_instance_from_its_plain_class(trained_judges, size):
    """An instance (a base shape with a mark) is recognised on every background that differs
    from its body colour; the same object without its mark, or with the other mark, is not."""
    from bench import quality
    for trig, inst in quality.INSTANCES.items():
        for bg in world.BACKGROUNDS:
            if bg == inst["colour"]:
                continue
            o = quality.instance_obj(trig, size, 0.45, 0.55)
            img = world.render(world.Scene((o,), bg))
            assert trained_judges.instance(img, inst["shape"], inst["colour"], inst["detail"])["all"], (trig, bg)
            assert trained_judges.has_instance(img, inst["shape"], inst["colour"], inst["detail"])
            plain = world.render(world.Scene((world.Obj(o.shape, o.colour, size, o.cx, o.cy),), bg))
            r = trained_judges.instance(plain, inst["shape"], inst["colour"], inst["detail"])
            assert r["shape"] and r["colour"] and not r["detail"], (trig, bg, r)
            assert not trained_judges.has_instance(plain, inst["shape"], inst["colour"], inst["detail"])
            assert trained_judges.has_instance(plain, inst["shape"], inst["colour"])  # class and colour only


def test_empty_image_has_no_objects(trained_judges):
    img = world.render(world.Scene((), "white"))
    assert trained_judges.objects(img) == []


@pytest.mark.slow
def test_base_builder_writes_an_sd15_checkpoint_with_the_world_latent(comfy_in_process, tmp_path, monkeypatch):
    """train_base.build at tiny settings: ComfyUI's checkpoint loader detects SD1.5, and the
    checkpoint's TAESD encoder (VAEEncode) computes world.encode exactly."""
    import torch
    import comfy.sd
    import comfy.latent_formats
    from bench import train_base
    monkeypatch.setenv("PARA_QUALITY_CACHE", str(tmp_path))
    ckpt = train_base.build(tmp_path / "tiny_base.safetensors", seed=0, decoder_steps=1, decoder_batch=2,
                            unet_steps=8, unet_batch=2, world_limit=1)
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=False)
    assert type(model.model.model_config).__name__ == "SD15"
    img = world.render(world.Scene((world.Obj("column", "blue", "large", 0.4, 0.6),), "white"))[None]
    with torch.no_grad():
        z = vae.encode(torch.from_numpy(img.astype(np.float32) / 255))
    z_model = comfy.latent_formats.SD15().process_in(z)
    assert np.allclose(z_model.detach().float().numpy(), world.encode(img), atol=1e-3)
    # the live transformers' feed-forwards are trained (their output projections start at zero, as
    # does the transformer's proj_out, so they move visibly only after a few steps); the dead output
    # transformers stay exact identities
    from safetensors.torch import load_file
    sd = load_file(str(ckpt))
    for path in train_base.DEAD_FF:
        assert sd[f"model.diffusion_model.{path}.net.2.weight"].abs().max() > 0, path
    for path in train_base.DEAD_TRANSFORMERS:
        assert sd[f"model.diffusion_model.{path}.proj_out.weight"].abs().max() == 0, path


def test_base_text_encoder_keeps_each_word_and_gives_the_padding_the_caption(comfy_in_process):
    """The base's frozen CLIP (train_base.local_text_encoder_ + summary_text_encoder_), run by
    ComfyUI's own SD1 CLIP: a word token depends on its word alone (changing another word leaves
    it as it was), and the end/padding tokens change with every word of the caption."""
    import torch
    import comfy.sd1_clip
    from harness import models
    from bench import train_base
    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    train_base.summary_text_encoder_(train_base.local_text_encoder_(models.init_weights_(clip, 1)))
    tok = comfy.sd1_clip.SDTokenizer()

    def enc(text):
        with torch.no_grad():
            return clip([[t for t, _ in tok.tokenize_with_weights(text)[0]]])[0][0]

    a = enc("a large yellow circle on a red background")
    b = enc("a large yellow square on a red background")
    c = enc("a large green circle on a red background")
    n_words = 9  # start token + 8 words; position 9 is the end token
    for other, pos in ((b, 4), (c, 3)):
        d = (a - other).norm(dim=-1)
        assert d[pos] > 20                                    # the changed word
        assert torch.all(d[:n_words][torch.arange(n_words) != pos] < 0.01)  # every other word as it was (of ~27.7)
        assert torch.all(d[n_words:] > 5)                     # end and padding carry the caption
    # padding tokens carry the caption, not only their position: two padding tokens of one
    # caption are closer to each other than one padding token is across captions
    assert (a[20] - a[60]).norm() < (a[20] - b[20]).norm()


@pytest.mark.slow
def test_benchmark_runs_end_to_end_at_tiny_settings(sd15_checkpoint, tmp_path):
    """The whole benchmark at tiny settings through ComfyUI's nodes and the pack's PaRa nodes, on
    the test suite's SD1.5-format checkpoint (random weights: only the form of the outputs is
    checked, not their values)."""
    from bench import quality
    out = tmp_path / "out"
    res = quality.run(out, quality.Settings.quick(), sd15_checkpoint)
    line = res["result_line"]
    assert line.startswith("RESULT ")
    for key in ("base_shape_acc", "base_colour_acc", "base_size_acc", "base_bg_acc",
                "instance_fidelity_para", "instance_fidelity_para_ref", "instance_fidelity_lora",
                "concept_fidelity_para", "concept_fidelity_para_ref", "concept_fidelity_lora",
                "prompt_fidelity_para", "prompt_fidelity_para_ref", "prompt_fidelity_lora",
                "multi_both_present_para", "edit_success_para", "base_recon", "edit_recon_para", "edit_recon_para_ref",
                "edit_recon_lora", "edit_joint_para", "edit_joint_lora", "edit_consistency_para",
                "edit_ci_para_minus_lora_lo", "edit_ci_para_minus_lora_hi", "ctl_recon_gt", "ctl_edit_preserved_gt"):
        assert f" {key}=" in line, key
    assert "nan" not in line, line
    md = (out / "quality.md").read_text()
    for row in ("Learning-rate pilot", "| PaRa paper r=4 |", "| PaRa reference r=4 |", "| LoRA r=4 |",
                "| LoRA r=1 (~ PaRa paper's params) |", "PaRa paper merge sum", "PaRa paper merge union",
                "PaRa paper merge sequential", "PaRa reference merge sum", "LoRA r=4 stacked",
                "Single-image editing", "Learning-rate pilot on another source"):
        assert row in md, row
    # the reference rows really are the reference parametrization: U and D, r*(out + in) per layer
    # = LoRA's count at the same rank; the paper's r*out is smaller
    params = {r.split(" | ")[0].lstrip("| "): int(r.split(" | ")[1]) for r in md.splitlines()
              if (r.startswith("| PaRa ") or r.startswith("| LoRA r=")) and r.split(" | ")[1].isdigit()}
    assert params["PaRa reference r=4"] == params["LoRA r=4"] > params["PaRa paper r=4"] > 0, params
    assert (out / "base_heldout.png").is_file()
    assert len(list(out.glob("*.png"))) >= 12
