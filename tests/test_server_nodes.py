"""PaRa nodes through the real ComfyUI HTTP server: the node list, loading, applying,
merging, saving and exporting through prompts, errors as ComfyUI reports them, and the pack's
start-up cleanup."""
import json
import math

import pytest
import torch

from harness import comfyui, models
from harness.server import ComfyServer, load_latent
from workflow_helpers import checkpoint_layers

pytestmark = [pytest.mark.comfyui, pytest.mark.server]

NODE_IDS = ["PaRaLoader", "PaRaLoad", "PaRaApply", "PaRaMerge", "PaRaSave", "PaRaExportLoRA", "PaRaTrainer"]


@pytest.fixture(scope="module")
def core():
    import para_core
    return para_core


@pytest.fixture(scope="module")
def para_files(comfy_server, sd15_checkpoint, core):
    """Two subject files made for the test checkpoint, a file for another model, a LoRA file
    and a corrupt file, all in the server's models/para."""
    from safetensors import safe_open
    shapes, weights = {}, {}
    with safe_open(str(sd15_checkpoint), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
                sl = f.get_slice(k)
                shp = tuple(sl.get_shape())
                if len(shp) >= 2:
                    layer = k[len("model."):-len(".weight")]
                    shapes[layer] = shp
                    weights[layer] = f.get_tensor(k)
    layers = core.select_layers(shapes, "noxattn")
    fp = core.fingerprint({l: weights[l] for l in layers})
    para_dir = comfy_server.models_dir / "para"
    names = {}
    for i, seed in enumerate((1, 2)):
        g = torch.Generator().manual_seed(seed)
        st = core.ParaState(B={l: torch.randn(shapes[l][0], 4, generator=g) for l in layers},
                            metadata=core.build_metadata("subject", rank=4, layers="noxattn", base_arch="SD15",
                                                         base_fingerprint=fp, title=f"subject{i}"))
        names[f"s{i}"] = f"subject{i}.safetensors"
        core.save_para(st, str(para_dir / names[f"s{i}"]))
    # another family: same names, other widths (e.g. a 640-wide model)
    g = torch.Generator().manual_seed(3)
    other = core.ParaState(B={l: torch.randn(shapes[l][0] * 2, 4, generator=g) for l in layers[:5]},
                           metadata=core.build_metadata("subject", rank=4, base_arch="SD15"))
    names["other"] = "other_family.safetensors"
    core.save_para(other, str(para_dir / names["other"]))
    from safetensors.torch import save_file
    names["lora"] = "actually_a_lora.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)},
              str(para_dir / names["lora"]))
    names["corrupt"] = "corrupt.safetensors"
    (para_dir / names["corrupt"]).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage")
    return names


def graph_with(model_node=None, extra=None, seed=7, prefix="t"):
    g = models.txt2img_graph(save="latent", seed=seed, prefix=prefix)
    if model_node is not None:
        g.update(extra or {})
        g["sampler"]["inputs"]["model"] = model_node
    return g


def run_latent(server, g):
    entry = server.run(g, timeout=180)
    (path,) = server.output_files(entry, "latents")
    return load_latent(path)


def test_object_info_lists_every_node_with_inputs(comfy_server):
    info = comfy_server.client.object_info()
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info; import failures: {comfy_server.import_failures()}"
        assert info[node_id]["category"] == "PaRa"
        assert info[node_id]["description"]
    req = info["PaRaLoader"]["input"]["required"]
    assert set(req) == {"model", "para_name", "strength"}
    assert req["strength"][1]["default"] == 1.0 and req["strength"][1]["min"] < 0 and "tooltip" in req["strength"][1]
    assert info["PaRaLoad"]["output"] == ["PARA"]
    merge = info["PaRaMerge"]["input"]
    mode = merge["required"]["mode"]
    options = mode[0] if isinstance(mode[0], list) else mode[1]["options"]  # V1 list or V3 "COMBO"
    assert options == ["sum", "union", "sequential"]
    assert {"para_1", "para_2"} <= set(merge["required"]) and "para_3" in merge["optional"]


def test_para_loader_changes_the_image_and_equals_the_exported_lora(comfy_server, para_files):
    base = run_latent(comfy_server, graph_with(prefix="base"))
    para = run_latent(comfy_server, graph_with(
        ["para", 0], {"para": {"class_type": "PaRaLoader", "inputs": {
            "model": ["ckpt", 0], "para_name": para_files["s0"], "strength": 1.0}}}, prefix="para"))
    assert (para - base).abs().max() > 1e-3, "PaRa did not change the output"
    export = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
        "load": {"class_type": "PaRaLoad", "inputs": {"para_name": para_files["s0"]}},
        "export": {"class_type": "PaRaExportLoRA", "inputs": {"model": ["ckpt", 0], "para": ["load", 0],
                                                              "filename_prefix": "exported", "strength": 1.0,
                                                              "dtype": "fp32"}},
    }
    comfy_server.run(export, timeout=180)
    loras = comfy_server.client.object_info()["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
    exported = [n for n in loras if n.startswith("exported")]
    assert exported, f"the exported LoRA is not in Load LoRA's list: {loras}"
    via_lora = run_latent(comfy_server, graph_with(
        ["lora", 0], {"lora": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "model": ["ckpt", 0], "lora_name": exported[-1], "strength_model": 1.0}}}, prefix="lora"))
    torch.testing.assert_close(via_lora, para, rtol=1e-3, atol=1e-3)


def test_stock_load_lora_reads_a_para_file(comfy_server, para_files):
    import shutil
    src = comfy_server.models_dir / "para" / para_files["s0"]
    shutil.copy(src, comfy_server.models_dir / "loras" / "para_as_lora.safetensors")
    para = run_latent(comfy_server, graph_with(
        ["para", 0], {"para": {"class_type": "PaRaLoader", "inputs": {
            "model": ["ckpt", 0], "para_name": para_files["s0"], "strength": 0.7}}}, prefix="p07"))
    stock = run_latent(comfy_server, graph_with(
        ["lora", 0], {"lora": {"class_type": "LoraLoader", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": "para_as_lora.safetensors",
            "strength_model": 0.7, "strength_clip": 1.0}}}, prefix="l07"))
    torch.testing.assert_close(stock, para, rtol=1e-4, atol=1e-4)


def test_merge_graph_runs_and_saves(comfy_server, para_files, core):
    g = graph_with(["apply", 0], {
        "a": {"class_type": "PaRaLoad", "inputs": {"para_name": para_files["s0"]}},
        "b": {"class_type": "PaRaLoad", "inputs": {"para_name": para_files["s1"]}},
        "merge": {"class_type": "PaRaMerge", "inputs": {"mode": "union", "para_1": ["a", 0], "strength_1": 1.0,
                                                        "para_2": ["b", 0], "strength_2": 0.5}},
        "apply": {"class_type": "PaRaApply", "inputs": {"model": ["ckpt", 0], "para": ["merge", 0], "strength": 1.0}},
        "save": {"class_type": "PaRaSave", "inputs": {"para": ["merge", 0], "filename_prefix": "merged", "dtype": "fp32"}},
    }, prefix="merge")
    latent = run_latent(comfy_server, g)
    assert torch.isfinite(latent).all()
    saved = sorted((comfy_server.models_dir / "para").glob("merged_*.safetensors"))
    assert saved
    st = core.load_para(str(saved[-1]))
    assert st.kind == "merged" and st.metadata["para.merge_mode"] == "union"


BAD = {
    "other family": ("other", r"layer diffusion_model\.\S+"),
    "lora file": ("lora", "LoRA"),
    "corrupt file": ("corrupt", "corrupt|not a safetensors|truncated"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_file_is_a_clear_error_and_the_server_goes_on(comfy_server, para_files, case):
    import re
    key, pattern = BAD[case]
    g = graph_with(["para", 0], {"para": {"class_type": "PaRaLoader", "inputs": {
        "model": ["ckpt", 0], "para_name": para_files[key], "strength": 1.0}}}, prefix="bad")
    entry = comfy_server.run(g, check=False, timeout=180)
    assert entry.status == "error"
    msg = entry.message
    assert para_files[key] in msg and re.search(pattern, msg), msg
    ok = comfy_server.run(graph_with(prefix="after_bad"), timeout=180)
    assert ok.status == "success"


def test_merge_of_different_families_is_an_error(comfy_server, para_files):
    g = graph_with(["apply", 0], {
        "a": {"class_type": "PaRaLoad", "inputs": {"para_name": para_files["s0"]}},
        "b": {"class_type": "PaRaLoad", "inputs": {"para_name": para_files["other"]}},
        "merge": {"class_type": "PaRaMerge", "inputs": {"mode": "sum", "para_1": ["a", 0], "strength_1": 1.0,
                                                        "para_2": ["b", 0], "strength_2": 1.0}},
        "apply": {"class_type": "PaRaApply", "inputs": {"model": ["ckpt", 0], "para": ["merge", 0], "strength": 1.0}},
    }, prefix="badmerge")
    entry = comfy_server.run(g, check=False, timeout=180)
    assert entry.status == "error"
    assert "different models" in entry.message


def test_nan_strength_is_a_clear_error(comfy_server, para_files):
    g = graph_with(["para", 0], {"para": {"class_type": "PaRaLoader", "inputs": {
        "model": ["ckpt", 0], "para_name": para_files["s0"], "strength": math.nan}}}, prefix="nan")
    entry = comfy_server.run(g, check=False, timeout=180)
    assert entry.status == "error", entry
    assert "strength" in entry.message
    assert comfy_server.run(graph_with(prefix="after_nan"), timeout=180).status == "success"


def test_a_file_rewritten_under_the_same_name_is_reloaded(comfy_server, para_files, core):
    import shutil
    para_dir = comfy_server.models_dir / "para"
    shutil.copy(para_dir / para_files["s0"], para_dir / "rewritten.safetensors")
    g = lambda p: graph_with(["para", 0], {"para": {"class_type": "PaRaLoader", "inputs": {
        "model": ["ckpt", 0], "para_name": "rewritten.safetensors", "strength": 1.0}}}, prefix=p)
    first = run_latent(comfy_server, g("rw1"))
    shutil.copy(para_dir / para_files["s1"], para_dir / "rewritten.safetensors")
    second = run_latent(comfy_server, g("rw2"))
    assert (first - second).abs().max() > 1e-3, "the changed file was not reloaded"


def test_a_nan_para_file_stops_a_stock_load_lora_prompt(comfy_server, sd15_checkpoint):
    shapes, _ = checkpoint_layers(sd15_checkpoint)
    layer = sorted(shapes)[0]
    out = shapes[layer][0]
    B = torch.randn(out, 2)
    B[0, 0] = float("nan")
    name = "nan_subject.safetensors"
    from safetensors.torch import save_file  # save_para itself refuses to write a NaN
    save_file({f"{layer}.para_B": B}, str(comfy_server.models_dir / "loras" / name))
    g = models.txt2img_graph(save="image", prefix="nan_lora", steps=1)
    g["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["ckpt", 0], "lora_name": name,
                                                                 "strength_model": 1.0}}
    g["sampler"]["inputs"]["model"] = ["lora", 0]
    entry = comfy_server.wait(comfy_server.client.queue(g), timeout=300)
    message = entry.message or ""
    assert entry.status == "error"
    # ComfyUI names the node that failed (its input names the file); the message names the layer.
    assert entry.error_details["node_type"] == "LoraLoaderModelOnly"
    assert f"{layer}.para_B contains NaN or Inf" in message, message


def test_a_write_killed_by_sigkill_is_never_listed_and_is_gone_after_a_restart(comfyui_path, tmp_path):
    """SIGKILL a process in the middle of writing models/para/dog.safetensors (the pack's atomic
    write), then start ComfyUI on that folder: the leftover is not in PaRa Loader's list and the
    pack removed it at start; a trainer state whose PaRa file never came is removed too."""
    import signal
    import subprocess
    import sys
    from core_helpers import KILL_MID_WRITE
    server = ComfyServer(comfyui_path)
    try:
        para_dir = server.models_dir / "para"
        proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(comfyui.PACK_ROOT), str(para_dir),
                                 "dog.safetensors"], stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "writing"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        (leftover,) = [p for p in para_dir.iterdir()]
        orphan = para_dir / "run_00001_step000004.trainer.pt"
        orphan.write_bytes(b"state without its PaRa file")
        import para_core
        para_core.save_para(para_core.ParaState(B={"diffusion_model.x": torch.randn(4, 1)}), str(para_dir / "real.safetensors"))
        server.start()
        options = server.client.object_info("PaRaLoader")["input"]["required"]["para_name"]
        listed = options[0] if isinstance(options[0], list) else options[1].get("options", [])
        assert listed == ["real.safetensors"]
        assert not leftover.exists() and not orphan.exists()
        assert "removed 2 unfinished file(s)" in server.log_text()
    finally:
        server.cleanup()
