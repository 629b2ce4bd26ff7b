"""Helpers for the workflow, batch, demo and browser tests: PaRa files made for the test
checkpoint without training, and the shipped workflows."""
from __future__ import annotations

from pathlib import Path

from harness import comfyui

WORKFLOWS_DIR = comfyui.PACK_ROOT / "workflows"
UI_DIR = comfyui.PACK_ROOT / "example_workflows"  # the UI-format files (the templates menu)


def core():
    import para_core
    return para_core


def checkpoint_layers(checkpoint: Path, preset: str = "noxattn") -> tuple[dict, dict]:
    """({layer: weight shape}, {layer: weight}) of the checkpoint's layers that preset selects."""
    from safetensors import safe_open
    pc = core()
    shapes, weights = {}, {}
    with safe_open(str(checkpoint), "pt") as f:
        for k in f.keys():
            if k.startswith("model.diffusion_model.") and k.endswith(".weight"):
                shp = tuple(f.get_slice(k).get_shape())
                if len(shp) >= 2:
                    shapes[k[len("model."):-len(".weight")]] = shp
        layers = pc.select_layers(shapes, preset)
        for layer in layers:
            weights[layer] = f.get_tensor(f"model.{layer}.weight")
    return {l: shapes[l] for l in layers}, weights


def make_subject_file(path: Path, checkpoint: Path, seed: int, rank: int = 4, preset: str = "noxattn",
                      trigger: str = "sks") -> Path:
    """A PaRa subject file (random B) that fits the test checkpoint, as if trained on it."""
    import torch
    pc = core()
    shapes, weights = checkpoint_layers(checkpoint, preset)
    g = torch.Generator().manual_seed(seed)
    state = pc.ParaState(B={l: torch.randn(shp[0], rank, generator=g) for l, shp in shapes.items()},
                         metadata=pc.build_metadata("subject", rank=rank, layers=preset, base_arch="SD15",
                                                    base_fingerprint=pc.fingerprint(weights),
                                                    title=f"test subject {trigger}"))
    path.parent.mkdir(parents=True, exist_ok=True)
    pc.save_para(state, str(path))
    return path


def api_workflows() -> dict[str, dict]:
    from workflows import api_graph
    return {name: api_graph.load(name) for name in api_graph.names()}


def ui_workflows() -> dict[str, dict]:
    import json
    return {p.stem: json.loads(p.read_text()) for p in sorted(UI_DIR.glob("*.json"))}


def install_placeholders(server, checkpoint: Path, size: int = 64) -> dict[str, list[str]]:
    """Put every file the shipped workflows name in place on the server, so each combo value is
    valid and each workflow can run: checkpoints (the test checkpoint under the workflow's
    name), PaRa files (random subjects for it), the LoRA (a PaRa file, which the stock loader
    reads), the training-image folder (drawn, with captions) and the image to edit.
    Idempotent. Returns {kind: [names]}."""
    from workflows import demo
    made: dict[str, list[str]] = {}
    for graph in api_workflows().values():
        for node in graph.values():
            ct, inp = node["class_type"], node["inputs"]
            if ct == "CheckpointLoaderSimple":
                dest = server.models_dir / "checkpoints" / inp["ckpt_name"]
                if not dest.exists():
                    server.add_model("checkpoints", checkpoint, inp["ckpt_name"])
                made.setdefault("checkpoints", []).append(inp["ckpt_name"])
            elif ct in ("PaRaLoad", "PaRaLoader"):
                dest = server.models_dir / "para" / inp["para_name"]
                if not dest.exists():
                    make_subject_file(dest, checkpoint, seed=sum(map(ord, inp["para_name"])))
                made.setdefault("para", []).append(inp["para_name"])
            elif ct in ("LoraLoader", "LoraLoaderModelOnly"):
                dest = server.models_dir / "loras" / inp["lora_name"]
                if not dest.exists():
                    make_subject_file(dest, checkpoint, seed=7)
                made.setdefault("loras", []).append(inp["lora_name"])
            elif ct in ("LoadImageTextSetFromFolderNode", "LoadImageTextDataSetFromFolder"):
                folder = server.input_dir / inp["folder"]
                if not folder.exists():
                    demo.make_subject_images(folder, "sks", 3, size)
                made.setdefault("folders", []).append(inp["folder"])
            elif ct == "LoadImage":
                dest = server.input_dir / inp["image"]
                if not dest.exists():
                    demo.make_edit_image(dest, size)
                made.setdefault("images", []).append(inp["image"])
    return made
