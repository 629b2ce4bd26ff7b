"""harness.models: the test models are deterministic, initialised, and what ComfyUI's loaders expect."""
from harness import models


def test_tiny_model_samples_deterministically(tiny_model, tiny_model_factory):
    import torch
    pos, neg = models.random_conditioning(1), models.random_conditioning(2)
    assert pos[0][0].shape == (1, 77, models.TINY_CONTEXT_DIM)
    a = models.sample_latent(tiny_model, pos, neg, seed=3, steps=2, cfg=2.0)
    b = models.sample_latent(tiny_model_factory(seed=0), pos, neg, seed=3, steps=2, cfg=2.0)
    c = models.sample_latent(tiny_model_factory(seed=1), pos, neg, seed=3, steps=2, cfg=2.0)
    assert a.shape == (1, 4, 8, 8)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tiny_model_is_on_cpu_with_initialised_weights(tiny_model):
    import torch
    sd = tiny_model.model.diffusion_model.state_dict()
    assert tiny_model.load_device == torch.device("cpu")
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (32, 64)
    assert torch.count_nonzero(sd["out.2.bias"]) == 0


def test_checkpoint_loads_as_sd15_and_samples(sd15_checkpoint):
    import torch
    import nodes
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint.name)
    assert type(model.model.model_config).__name__ == "SD15"
    assert model.model.model_type.name == "EPS"
    (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    (neg,) = nodes.CLIPTextEncode().encode(clip, "")
    assert pos[0][0].shape == (1, 77, 768)
    (latent,) = nodes.EmptyLatentImage().generate(64, 64, 1)
    (out,) = nodes.KSampler().sample(model, 0, 2, 2.0, "euler", "normal", pos, neg, latent)
    (image,) = nodes.VAEDecode().decode(vae, out)
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(out["samples"]).all() and torch.isfinite(image).all()


def test_models_are_cached_atomically_with_their_builder_metadata(tmp_path, monkeypatch, comfy_in_process):
    """The builders write through atomic_save() and decide from cached_metadata() whether a cached
    file is current (missing or unreadable: None, so it is rebuilt)."""
    import torch
    monkeypatch.setenv("PARA_TEST_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    path = tmp_path / "m.safetensors"
    assert models.cached_metadata(path) is None
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    assert models.cached_metadata(tmp_path / "broken.safetensors") is None
    models.atomic_save({"x": torch.zeros(1)}, path, {"para_test.builder_version": "0"})
    assert models.cached_metadata(path) == {"para_test.builder_version": "0"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "m.safetensors"], \
        "no temporary file is left"
