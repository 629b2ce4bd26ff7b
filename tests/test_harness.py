"""Smoke tests of the test harness itself: ComfyUI found, models built, server driven."""

import os
from pathlib import Path

import pytest

import comfy_env


def test_find_comfyui_prefers_comfyui_path(tmp_path, monkeypatch):
    fake = tmp_path / "ComfyUI"
    (fake / "comfy").mkdir(parents=True)
    (fake / "main.py").write_text("")
    monkeypatch.setenv("COMFYUI_PATH", str(fake))
    assert comfy_env.find_comfyui() == fake.resolve()


def test_find_comfyui_ignores_a_folder_without_main_py(tmp_path, monkeypatch):
    (tmp_path / "comfy").mkdir()
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path))
    assert comfy_env.find_comfyui() != tmp_path.resolve()


def fake_comfyui(folder: Path, version: str | None = None) -> Path:
    (folder / "comfy").mkdir(parents=True)
    (folder / "main.py").write_text("")
    if version:
        (folder / "comfyui_version.py").write_text(f'__version__ = "{version}"\n')
    return folder


def test_comfyui_paths_lists_every_checkout_once_in_order(tmp_path, monkeypatch):
    a, b = fake_comfyui(tmp_path / "a", "0.3.64"), fake_comfyui(tmp_path / "b", "0.33.0")
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.setenv("COMFYUI_PATHS", os.pathsep.join([str(b), str(tmp_path / "missing"), str(a), str(b)]))
    roots = comfy_env.find_all_comfyui()
    assert roots[-2:] == [b.resolve(), a.resolve()] and len(set(roots)) == len(roots)
    assert [comfy_env.comfyui_version(r) for r in roots[-2:]] == ["0.33.0", "0.3.64"]


def test_comfyui_path_comes_before_comfyui_paths(tmp_path, monkeypatch):
    a, b = fake_comfyui(tmp_path / "a"), fake_comfyui(tmp_path / "b")
    monkeypatch.setenv("COMFYUI_PATH", str(b))
    monkeypatch.setenv("COMFYUI_PATHS", os.pathsep.join([str(a), str(b)]))
    assert comfy_env.find_comfyui() == b.resolve()
    assert comfy_env.find_all_comfyui()[-2:] == [b.resolve(), a.resolve()]


def test_default_paths_are_both_comfyui_versions(tmp_path, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    monkeypatch.delenv("COMFYUI_PATHS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    old, new = fake_comfyui(tmp_path / "ComfyUI", "0.3.64"), fake_comfyui(tmp_path / "ComfyUI-0.33", "0.33.0")
    assert comfy_env.find_all_comfyui()[-2:] == [old.resolve(), new.resolve()]


def test_comfyui_version_reads_the_checkout_without_importing_it(tmp_path):
    assert comfy_env.comfyui_version(fake_comfyui(tmp_path / "v", "0.33.0")) == "0.33.0"
    assert comfy_env.comfyui_version(fake_comfyui(tmp_path / "none")) == "unknown"
    assert comfy_env.version_tuple("0.33.0") > comfy_env.version_tuple("0.3.64")


def test_the_comfyui_under_test_is_the_one_imported(comfyui_path, comfyui_version, comfy_in_process):
    import comfyui_version as imported
    assert Path(imported.__file__).resolve().parent == comfyui_path
    assert imported.__version__ == comfyui_version


def test_tiny_model_samples_deterministically(tiny_model, tiny_model_factory):
    import torch
    pos, neg = comfy_env.random_conditioning(1), comfy_env.random_conditioning(2)
    assert pos[0][0].shape == (1, 77, comfy_env.TINY_CONTEXT_DIM)
    a = comfy_env.sample_latent(tiny_model, pos, neg, seed=3, steps=2, cfg=2.0)
    b = comfy_env.sample_latent(tiny_model_factory(seed=0), pos, neg, seed=3, steps=2, cfg=2.0)
    c = comfy_env.sample_latent(tiny_model_factory(seed=1), pos, neg, seed=3, steps=2, cfg=2.0)
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


def test_server_runs_txt2img_and_saves_an_image(comfy_server):
    entry = comfy_server.run(comfy_env.txt2img_graph(save="image", prefix="harness"))
    assert comfy_env.status_str(entry) == "success"
    images = comfy_server.output_files(entry, "images")
    assert len(images) == 1 and images[0].is_file() and images[0].suffix == ".png"


def test_server_saves_a_latent_that_loads_back(comfy_server, sd15_checkpoint):
    import torch
    import nodes
    entry = comfy_server.run(comfy_env.txt2img_graph(save="latent", prefix="harness", seed=5))
    files = comfy_server.output_files(entry, "latents")
    assert len(files) == 1 and files[0].parent.name == "latents" and files[0].suffix == ".latent"
    latent = comfy_env.load_latent(files[0])
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    # The server and this process compute the same thing from the same file.
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint.name)
    (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    (neg,) = nodes.CLIPTextEncode().encode(clip, "")
    here = comfy_env.sample_latent(model, pos, neg, seed=5, steps=2, cfg=2.0)
    torch.testing.assert_close(latent, here)


def test_server_reports_progress_on_the_websocket(comfy_server):
    graph = comfy_env.txt2img_graph(save="latent", prefix="harness_ws", seed=11, steps=3)
    with comfy_server.ws_messages() as ws:
        prompt_id = comfy_server.queue(graph)
        comfy_server.wait(prompt_id)
        ws.wait_for(lambda m: m.get("type") == "executing" and m["data"].get("node") is None
                    and m["data"].get("prompt_id") == prompt_id, timeout=10)
    progress = ws.of_type("progress", prompt_id)
    assert [p["value"] for p in progress if p.get("node") == "sampler"][-1] == 3


def test_server_rejects_an_invalid_graph_with_its_json_error(comfy_server):
    graph = comfy_env.txt2img_graph()
    graph["ckpt"]["inputs"]["ckpt_name"] = "missing.safetensors"
    with pytest.raises(comfy_env.PromptRejected) as err:
        comfy_server.queue(graph)
    assert "ckpt" in err.value.body["node_errors"]


def test_server_reports_an_execution_error_message(comfy_server):
    graph = comfy_env.txt2img_graph(save="latent", prefix="harness_err", width=64, height=64)
    # A batch index beyond the batch fails inside the node, after validation.
    graph["pick"] = {"class_type": "LatentFromBatch",
                     "inputs": {"samples": ["sampler", 0], "batch_index": 0, "length": 1}}
    graph["bad"] = {"class_type": "LatentUpscaleBy",
                    "inputs": {"samples": ["pick", 0], "upscale_method": "nearest-exact", "scale_by": 0.01}}
    graph["save_latent"]["inputs"]["samples"] = ["bad", 0]
    entry = comfy_server.run(graph, check=False)
    assert comfy_env.status_str(entry) == "error"
    assert comfy_server.error_message(entry)


def test_server_interrupt_stops_a_running_prompt(comfy_server):
    graph = comfy_env.txt2img_graph(save="latent", prefix="harness_cancel", seed=21, steps=500,
                                    width=128, height=128)
    with comfy_server.ws_messages() as ws:
        prompt_id = comfy_server.queue(graph)
        ws.wait_for(lambda m: m.get("type") == "progress" and m["data"].get("prompt_id") == prompt_id,
                    timeout=60)
        comfy_server.interrupt()
        entry = comfy_server.wait(prompt_id, timeout=60)
    assert comfy_env.status_str(entry) == "error"
    assert comfy_server.error_message(entry) == "interrupted"
    assert max(p["value"] for p in ws.of_type("progress", prompt_id)) < 500


def test_comfyuis_nodes_module_wins_over_the_packs_nodes_package(comfyui_path, comfy_in_process):
    """Tests put the pack's root first on sys.path (to import para_core); `import nodes` must
    still be ComfyUI's nodes.py, also when a test imports it for the first time after that."""
    import subprocess
    import sys
    code = (f"import sys; sys.path.insert(0, {str(comfy_env.PACK_ROOT / 'tests')!r}); import comfy_env; "
            f"comfy_env.configure_comfy({str(comfyui_path)!r}); "
            f"sys.path.insert(0, {str(comfy_env.PACK_ROOT)!r}); import nodes; print(nodes.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip().splitlines()[-1]) == comfyui_path / "nodes.py"
