"""PaRa Trainer takes its training data the ways ComfyUI makes it: a latent
batch (VAE Encode, ComfyUI 0.3.64's dataset node), or the lists of the current dataset nodes
(MakeTrainingDataset: one latent and one conditioning per image, sizes may differ;
ResolutionBucket: one batch and one list of conditionings per size). The node declares
is_input_list, so through the server every input arrives as a list; in-process here the calls
use those list shapes, and the server tests run the real dataset nodes."""
import math

import pytest
import torch

from harness import models
from pack_helpers import trainer_settings

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]

BASE = trainer_settings(steps=3, filename_prefix="datasets")


@pytest.fixture(scope="module")
def trainer(mods):
    return mods.trainer


@pytest.fixture
def model(comfy_in_process):
    with torch.inference_mode():
        return models.make_tiny_model(seed=0)


def latent(h, w, seed, n=1):
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def cond(seed):
    """One conditioning entry [tensor, {}] (a CONDITIONING is a list of these)."""
    return models.random_conditioning(seed)[0]


def as_lists(**settings):
    """The settings as the server hands them to an is_input_list node: lists of one."""
    return {k: [v] for k, v in settings.items()}


def train(trainer, model, latents, positive, listed=True, **kw):
    settings = dict(BASE, **kw)
    inputs = dict(as_lists(model=model, **settings) if listed else dict(model=model, **settings))
    with torch.inference_mode():
        out = trainer.PaRaTrainer.execute(latents=latents, positive=positive, **inputs)
    _, para, loss, steps = out.args[:4]
    return para, loss["loss"], steps


def same_B(a, b):
    return a.layers == b.layers and all(torch.equal(a.B[l], b.B[l]) for l in a.layers)


def test_the_schema_takes_input_lists_on_this_comfyui(trainer):
    schema = trainer.PaRaTrainer.define_schema()
    assert schema.is_input_list
    assert trainer.PaRaTrainer.INPUT_IS_LIST  # what the executor of every version reads


def test_a_latent_batch_as_the_server_hands_it_equals_the_plain_call(trainer, model):
    """0.3.64 / VAE Encode: [ {samples: (N, C, H, W)} ] with [ CONDITIONING of N entries ]."""
    lat = {"samples": torch.cat([latent(8, 8, 1), latent(8, 8, 2)])}
    pos = [cond(1), cond(2)]
    listed = train(trainer, model, [lat], [pos], batch_size=2)
    plain = train(trainer, model, lat, pos, listed=False, batch_size=2)
    assert same_B(listed[0], plain[0]) and listed[1] == plain[1]


def test_one_latent_per_image_equals_the_same_images_as_one_batch(trainer, model):
    """MakeTrainingDataset: [ {samples: (1, C, H, W)} per image ] with [ CONDITIONING per image ]."""
    imgs, conds = [latent(8, 8, s) for s in (1, 2, 3)], [cond(s) for s in (1, 2, 3)]
    per_image = train(trainer, model, [{"samples": x} for x in imgs], [[c] for c in conds], batch_size=2)
    batch = train(trainer, model, [{"samples": torch.cat(imgs)}], [conds], batch_size=2)
    assert same_B(per_image[0], batch[0]) and per_image[1] == batch[1]
    assert per_image[0].metadata["para.train"] == batch[0].metadata["para.train"]


def test_one_conditioning_for_a_list_of_latents_is_used_for_every_image(trainer, model):
    imgs, c = [latent(8, 8, s) for s in (1, 2)], cond(5)
    shared = train(trainer, model, [{"samples": x} for x in imgs], [[c]])
    repeated = train(trainer, model, [{"samples": torch.cat(imgs)}], [[c]])
    assert same_B(shared[0], repeated[0])


def test_images_of_different_sizes_train_in_one_run(trainer, model):
    lats = [{"samples": latent(8, 8, 1)}, {"samples": latent(8, 12, 2)}, {"samples": latent(12, 8, 3)}]
    para, loss, steps = train(trainer, model, lats, [[cond(s)] for s in (1, 2, 3)], batch_size=3, steps=3)
    assert steps == 3 and len(loss) == 3 and all(math.isfinite(v) for v in loss)
    import json
    train_md = json.loads(para.metadata["para.train"])
    assert train_md["images"] == 3 and train_md["resolution"] == "64x64, 64x96, 96x64"
    # the same images in the same order give the same run: the data fingerprint is deterministic
    again = train(trainer, model, lats, [[cond(s)] for s in (1, 2, 3)], batch_size=3, steps=3)
    assert same_B(para, again[0])


def test_mixed_sizes_loss_is_the_mean_over_every_latent_element(trainer, model):
    """A step over images of two sizes is one loss: the element-mean over both (what a batch of
    one size gives when the sizes agree)."""
    lats = [{"samples": latent(8, 8, 1)}, {"samples": latent(8, 16, 2)}]
    _, both, _ = train(trainer, model, lats, [[cond(1)]], batch_size=2, steps=1, learning_rate=1e-7)
    assert len(both) == 1 and math.isfinite(both[0]) and both[0] > 0


def test_resolution_buckets_equal_the_same_images_per_image(trainer, model):
    """ResolutionBucket: [ {samples: (Bk, C, Hk, Wk)} per size ] with [ [cond per image] per size ]."""
    a1, a2, b1 = latent(8, 8, 1), latent(8, 8, 2), latent(8, 12, 3)
    c1, c2, c3 = cond(1), cond(2), cond(3)
    buckets = train(trainer, model, [{"samples": torch.cat([a1, a2])}, {"samples": b1}], [[c1, c2], [c3]],
                    batch_size=3)
    per_image = train(trainer, model, [{"samples": x} for x in (a1, a2, b1)], [[c1], [c2], [c3]], batch_size=3)
    assert same_B(buckets[0], per_image[0]) and buckets[1] == per_image[1]


@pytest.mark.parametrize("latents, positive, expected", [
    ([{"samples": latent(8, 8, 1)}] * 3, [[cond(1)]] * 2, "input 'positive' is a list of 2 conditionings"),
    ([{"samples": latent(8, 8, 1, n=2)}], [[cond(1)] * 3], "has 3 conditionings but the latents it goes with have 2"),
    ([{"samples": latent(8, 8, 1)}, {"samples": torch.zeros(0, 4, 8, 8)}], [[cond(1)]], "input 'latents' item 2 of 2"),
    ([], [[cond(1)]], "input 'latents' holds no latents"),
    ([{"samples": latent(8, 8, 1)}], [[]], "input 'positive' holds no conditioning"),
], ids=["list-lengths", "per-image-count", "empty-item", "no-latents", "no-conditioning"])
def test_training_data_that_does_not_pair_up_is_an_error_naming_the_input(trainer, model, latents, positive,
                                                                          expected):
    with pytest.raises(trainer.ParaError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        train(trainer, model, latents, positive)


def test_a_list_of_several_values_for_a_setting_is_an_error(trainer, model):
    inputs = dict(as_lists(model=model, **BASE), rank=[2, 4])
    with pytest.raises(trainer.ParaError, match="input 'rank' got a list of 2 values"):
        with torch.inference_mode():
            trainer.PaRaTrainer.execute(latents=[{"samples": latent(8, 8, 1)}], positive=[[cond(1)]], **inputs)


# ------------------------------------------------------------------------- through the server

def write_images(folder, sizes, word="sks"):
    """PNG images of the given (width, height) with a caption file each; real files, since
    ComfyUI 0.33 refuses input files that link outside input/."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (40 * i % 255, 120, 200)).save(folder / f"{word}_{i:02d}.png")
        (folder / f"{word}_{i:02d}.txt").write_text(f"a photo of {word} number {i}\n")


def dataset_graph(folder, bucket: bool, prefix: str, ckpt=models.SD15_CHECKPOINT_NAME):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}},
        "3": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["2", 0], "vae": ["1", 2], "clip": ["1", 1],
                                                              "texts": ["2", 1]}},
        "5": {"class_type": "PaRaTrainer", "inputs": dict(BASE, model=["1", 0], latents=["3", 0], positive=["3", 1],
                                                          steps=2, batch_size=3, save_every=2, filename_prefix=prefix,
                                                          learning_rate=1e-4, rank=1)},
    }
    if bucket:
        g["4"] = {"class_type": "ResolutionBucket", "inputs": {"latents": ["3", 0], "conditioning": ["3", 1]}}
        g["5"]["inputs"].update(latents=["4", 0], positive=["4", 1])
    return g


@pytest.mark.parametrize("bucket", [False, True], ids=["per-image", "resolution-bucket"])
def test_server_trains_on_dataset_nodes_with_images_of_two_sizes(comfy_server, comfyui_version, bucket):
    info = comfy_server.client.object_info()
    missing = [n for n in ("LoadImageTextDataSetFromFolder", "MakeTrainingDataset", "ResolutionBucket") if n not in info]
    if missing:
        pytest.skip(f"ComfyUI {comfyui_version} has no {', '.join(missing)} (added after 0.3.64)")
    write_images(comfy_server.input_dir / "mixed_sizes", [(64, 64), (96, 64), (64, 64)])
    prefix = f"datasets_{'bucket' if bucket else 'list'}"
    comfy_server.run(dataset_graph("mixed_sizes", bucket, prefix), timeout=600)
    import json
    from safetensors import safe_open
    (saved,) = sorted((comfy_server.models_dir / "para").glob(f"{prefix}_*_step000002.safetensors"))
    with safe_open(str(saved), "pt") as f:
        train_md = json.loads(f.metadata()["para.train"])
    assert train_md["images"] == 3 and train_md["captions"] == 3
    assert train_md["resolution"] == "64x64, 96x64" and train_md["steps"] == 2
