"""Two ComfyUI servers sharing one models/para (and models/loras) folder, saving under the same
prefix at the same time: every save gets its own file, no file is replaced by the other server's,
and a training run's checkpoints (PaRa file + .trainer.pt) all belong to that run."""
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch

from harness import models
from harness.server import ComfyServer

pytestmark = [pytest.mark.comfyui, pytest.mark.server, pytest.mark.slow]

SAVES = 10  # PaRa Save and PaRa Export LoRA nodes per server and prompt
IMAGE = "shared.png"


def layers_of(sd15_checkpoint):
    from safetensors import safe_open
    with safe_open(str(sd15_checkpoint), "pt") as f:
        return [(k[len("model."):-len(".weight")], tuple(f.get_slice(k).get_shape())) for k in sorted(f.keys())
                if k.startswith("model.diffusion_model.") and re.search(r"attn1\.to_[qkv]\.weight$", k)]


@pytest.fixture(scope="module")
def two_servers(comfy_server, comfyui_path, sd15_checkpoint):
    """The session's server and a second one whose models/para and models/loras are the first's."""
    other = ComfyServer(comfyui_path, checkpoints=[sd15_checkpoint])
    for sub in ("para", "loras"):
        (other.models_dir / sub).rmdir()
        (other.models_dir / sub).symlink_to(comfy_server.models_dir / sub, target_is_directory=True)
    from PIL import Image
    for i, s in enumerate((comfy_server, other)):
        Image.new("RGB", (64, 64), (40 + 100 * i, 120, 200 - 100 * i)).save(s.input_dir / IMAGE)
    try:
        other.start()
        yield comfy_server, other
    finally:
        other.cleanup()


def sources(folder: Path, layers, tag: str, value: float, para_core):
    """SAVES different PaRa files for one server, each marked by ``value`` in its first entries."""
    names = []
    for i in range(SAVES):
        g = torch.Generator().manual_seed(hash((tag, i)) % 2**31)
        B = {l: torch.randn(shape[0], 32, generator=g) for l, shape in layers}
        B[layers[0][0]][0, 0] = value
        B[layers[0][0]][0, 1] = float(i)
        name = f"shared_src_{tag}_{i}.safetensors"
        para_core.save_para(para_core.ParaState(B=B), str(folder / name))
        names.append(name)
    return names


def save_graph(names):
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}}}
    for i, name in enumerate(names):
        g[f"load{i}"] = {"class_type": "PaRaLoad", "inputs": {"para_name": name}}
        g[f"save{i}"] = {"class_type": "PaRaSave", "inputs": {"para": [f"load{i}", 0], "filename_prefix": "race/save",
                                                              "dtype": "fp32"}}
        g[f"lora{i}"] = {"class_type": "PaRaExportLoRA", "inputs": {
            "model": ["ckpt", 0], "para": [f"load{i}", 0], "filename_prefix": "race/lora", "strength": 1.0,
            "dtype": "fp32"}}
    return g


def reported(entry, node_id):
    """The file name a PaRa Save / Export LoRA node reported ("saved models/<folder>/<name>")."""
    text = "".join(entry.texts()[node_id])
    return text.split("saved models/", 1)[1].split("/", 1)[1]


def at_once(servers, graphs, timeout=900):
    """Queue one graph on each server at the same moment; their history entries."""
    ids, barrier = [None] * len(servers), threading.Barrier(len(servers))

    def go(i):
        barrier.wait()
        ids[i] = servers[i].client.queue(graphs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [s.wait(pid, timeout=timeout) for s, pid in zip(servers, ids)]


def test_two_servers_saving_under_one_prefix_never_overwrite_each_other(two_servers, sd15_checkpoint):
    import para_core
    from safetensors import safe_open
    a, b = two_servers
    para, loras = a.models_dir / "para", a.models_dir / "loras"
    layers = layers_of(sd15_checkpoint)
    marks = {"a": 1234.0, "b": -4321.0}
    graphs = [save_graph(sources(para, layers, tag, marks[tag], para_core)) for tag in ("a", "b")]
    # warm up: both servers load the checkpoint first (ComfyUI then reuses it), so the two
    # prompts below run in step and their saves meet
    warm = {k: v for k, v in graphs[0].items() if k in ("ckpt", "load0", "lora0")}
    warm["lora0"] = dict(warm["lora0"], inputs=dict(warm["lora0"]["inputs"], filename_prefix="warm/lora"))
    at_once([a, b], [warm, warm])
    entries = at_once([a, b], graphs)
    claimed = {}  # file -> (server, source index)
    for tag, entry in zip("ab", entries):
        assert entry.status == "success", entry.error
        for i in range(SAVES):
            for kind in ("save", "lora"):
                name = f"{kind}:{reported(entry, f'{kind}{i}')}"
                assert name not in claimed, f"{name} was reported by both servers"
                claimed[name] = (tag, i)
    assert len(claimed) == 4 * SAVES
    on_disk = {f"save:race/{n}" for n in os.listdir(para / "race")} | {f"lora:race/{n}" for n in os.listdir(loras / "race")}
    assert on_disk == set(claimed), "files missing (replaced) or not reported"
    first = layers[0][0]
    for name, (tag, i) in claimed.items():
        kind, rel = name.split(":", 1)
        with safe_open(str((para if kind == "save" else loras) / rel), "pt") as f:
            if kind == "save":
                got = f.get_tensor(f"{first}.para_B")[0, :2].tolist()
            else:
                title = f.metadata().get("para.exported_from")
        if kind == "save":
            assert got == [marks[tag], float(i)], f"{rel} holds another server's adapter"
        else:
            assert title == f"shared_src_{tag}_{i}.safetensors", f"{rel} holds another export ({title})"


def train_graph(seed):
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks", "clip": ["ckpt", 1]}},
            "load": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
            "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}},
            "train": {"class_type": "PaRaTrainer", "inputs": dict(
                model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=1, layers="noxattn-hspace-last",
                rank_cap="none", steps=4, learning_rate=1e-3, optimizer="AdamW", batch_size=1, seed=seed,
                training_dtype="fp32", gradient_checkpointing=False, init="orthogonal", save_every=1,
                filename_prefix="race/train", resume_from="[none]", custom_layers="", trigger_words=f"run{seed}")}}


def test_two_servers_training_under_one_prefix_keep_each_runs_checkpoints_together(two_servers):
    a, b = two_servers
    # warm up: both servers load the checkpoint first, so the two runs below start together
    warm = train_graph(99)
    warm["train"]["inputs"].update(steps=1, save_every=0, filename_prefix="race/warm")
    at_once([a, b], [warm, dict(warm)])
    entries = at_once([a, b], [train_graph(1), train_graph(2)])
    finals = []
    for seed, entry in zip((1, 2), entries):
        assert entry.status == "success", entry.error
        text = "".join(entry.texts()["train"])
        finals.append(re.search(r"saved (\S+\.safetensors)", text).group(1))
    assert finals[0] != finals[1], f"both runs report {finals[0]}"
    folder = a.models_dir / "para"
    runs = {}
    for p in sorted((folder / "race").glob("train_*_step*.safetensors")):
        stem, step = re.match(r"(train_\d+)_step(\d+)\.safetensors$", p.name).groups()
        from safetensors import safe_open
        with safe_open(str(p), "pt") as f:
            seed = json.loads(f.metadata()["para.train"])["seed"]
        state = torch.load(str(p)[: -len(".safetensors")] + ".trainer.pt", weights_only=True)
        assert state["settings"]["seed"] == seed and state["para_file"] == p.name, \
            f"{p.name} and its .trainer.pt come from different runs"
        runs.setdefault(stem, set()).add(seed)
        assert int(step) == state["step"]
    assert all(len(seeds) == 1 for seeds in runs.values()), f"one run name holds several runs: {runs}"
    assert sorted(s for seeds in runs.values() for s in seeds) == [1, 2]
    for seed, final in zip((1, 2), finals):
        stem = re.match(r"race/(train_\d+)_step", final).group(1)
        assert runs[stem] == {seed}
        assert len(list((folder / "race").glob(f"{stem}_step*.safetensors"))) == 4
