"""What a client can send through the API, through the real ComfyUI server: literal values on
MODEL/PARA sockets, file name prefixes the file system cannot take, huge trigger words, control
characters in names, and a PaRa file replaced by another of the same size and mtime. Each is a
clear error naming the input (or the right result), and the server keeps serving."""
import json
import os

import pytest
import torch

from harness import models
from harness.client import PromptRejected
from harness.server import load_latent

pytestmark = [pytest.mark.comfyui, pytest.mark.server]

IMAGE = "server_inputs.png"


@pytest.fixture(scope="module")
def para_core():
    import para_core
    return para_core


def checkpoint_layers(sd15_checkpoint, count=4):
    """(layer, weight shape) of the first ``count`` attention projections of the test checkpoint."""
    from safetensors import safe_open
    out = []
    with safe_open(str(sd15_checkpoint), "pt") as f:
        for k in sorted(f.keys()):
            if k.startswith("model.diffusion_model.") and k.endswith(("attn1.to_q.weight", "attn1.to_k.weight",
                                                                         "attn1.to_v.weight", "attn1.to_out.0.weight")):
                out.append((k[len("model."):-len(".weight")], tuple(f.get_slice(k).get_shape())))
    assert len(out) >= count
    return out[:count]


@pytest.fixture(scope="module")
def fitting(comfy_server, sd15_checkpoint, para_core):
    """A PaRa file that fits the test checkpoint, in the server's models/para: its name."""
    g = torch.Generator().manual_seed(3)
    B = {l: torch.randn(shape[0], 2, generator=g) for l, shape in checkpoint_layers(sd15_checkpoint)}
    name = "inputs_fit.safetensors"
    para_core.save_para(para_core.ParaState(B=B), str(comfy_server.models_dir / "para" / name))
    from PIL import Image
    Image.new("RGB", (64, 64), (90, 140, 200)).save(comfy_server.input_dir / IMAGE)
    return name


def run_error(server, graph, timeout=300):
    """The exception message of a prompt that must fail (rejected at validation counts too)."""
    try:
        entry = server.wait(server.client.queue(graph), timeout=timeout)
    except PromptRejected as e:
        return json.dumps(e.body)
    assert entry.status == "error", f"the prompt succeeded: {entry.outputs}"
    return entry.message or ""


_served = [0]


def still_serving(server, fitting):
    """A good prompt right after (a new prefix each time, so it really runs): the server kept serving."""
    _served[0] += 1
    g = {"load": {"class_type": "PaRaLoad", "inputs": {"para_name": fitting}},
         "save": {"class_type": "PaRaSave", "inputs": {"para": ["load", 0], "filename_prefix": f"after_bad{_served[0]}",
                                                       "dtype": "fp16"}}}
    entry = server.run(g, timeout=120)
    assert entry.status == "success"


def trainer_inputs(**kw):
    base = dict(model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=1, layers="noxattn-hspace-last",
                rank_cap="none", steps=2, learning_rate=1e-3, optimizer="AdamW", batch_size=1, seed=0,
                training_dtype="fp32", gradient_checkpointing=False, init="orthogonal", save_every=1,
                filename_prefix="inputs_train", resume_from="[none]", custom_layers="", trigger_words="")
    base.update(kw)
    return base


def base_graph():
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
            "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks", "clip": ["ckpt", 1]}},
            "load_image": {"class_type": "LoadImage", "inputs": {"image": IMAGE}},
            "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["load_image", 0], "vae": ["ckpt", 2]}}}


def trainer_graph(**kw):
    g = base_graph()
    g["train"] = {"class_type": "PaRaTrainer", "inputs": trainer_inputs(**kw)}
    return g


# ------------------------------------------------------------------------- literal values on sockets

LITERALS = [
    ("PaRaApply", {"model": "abc", "para": ["load", 0], "strength": 1.0}, "model"),
    ("PaRaApply", {"model": ["ckpt", 0], "para": {"a": 1}, "strength": 1.0}, "para"),
    ("PaRaLoader", {"model": 12, "para_name": None, "strength": 1.0}, "model"),
    ("PaRaMerge", {"mode": "sum", "para_1": {"a": 1}, "strength_1": 1.0, "para_2": ["load", 0], "strength_2": 1.0},
     "para_1"),
    ("PaRaMerge", {"mode": "sum", "para_1": ["load", 0], "strength_1": 1.0, "para_2": ["load", 0], "strength_2": 1.0,
                   "para_3": "zzz", "strength_3": 1.0}, "para_3"),
    ("PaRaSave", {"para": {"a": 1}, "filename_prefix": "literal", "dtype": "fp32"}, "para"),
    ("PaRaExportLoRA", {"model": ["ckpt", 0], "para": 3.5, "filename_prefix": "literal", "strength": 1.0,
                        "dtype": "fp32"}, "para"),
    ("PaRaExportLoRA", {"model": {"a": 1}, "para": ["load", 0], "filename_prefix": "literal", "strength": 1.0,
                        "dtype": "fp32"}, "model"),
    ("PaRaTrainer", None, "model"),
]


@pytest.mark.parametrize("node, inputs, name", LITERALS, ids=[f"{n}-{i}" for n, _, i in LITERALS])
def test_a_literal_value_on_a_model_or_para_socket_is_an_error_naming_the_input(comfy_server, fitting, node,
                                                                                 inputs, name):
    g = base_graph()
    g["load"] = {"class_type": "PaRaLoad", "inputs": {"para_name": fitting}}
    if node == "PaRaTrainer":
        g["x"] = {"class_type": node, "inputs": trainer_inputs(model="abc")}
    else:
        inputs = dict(inputs)
        if inputs.get("para_name", 0) is None:
            inputs["para_name"] = fitting
        g["x"] = {"class_type": node, "inputs": inputs}
    if node in ("PaRaApply", "PaRaLoader", "PaRaMerge"):  # not output nodes: something must consume them
        consumer = ({"class_type": "PaRaSave", "inputs": {"para": ["x", 0], "filename_prefix": "lit", "dtype": "fp32"}}
                    if node == "PaRaMerge" else
                    {"class_type": "PaRaExportLoRA", "inputs": {"model": ["x", 0], "para": ["load", 0],
                                                                "filename_prefix": "lit", "strength": 1.0,
                                                                "dtype": "fp32"}})
        g["consumer"] = consumer
    message = run_error(comfy_server, g)
    assert f"input '{name}'" in message, message
    assert "AttributeError" not in message and "object has no attribute" not in message, message
    still_serving(comfy_server, fitting)


# ------------------------------------------------------------------------- file names

BAD_PREFIXES = [
    ("nul", "bad\x00name", "NUL"),
    ("surrogate", "bad\ud800name", "surrogate"),
    ("long", "p" * 240, "too long"),
    ("long_folder", "d" * 300 + "/x", "too long"),
]


def save_graph(fitting, prefix, node="PaRaSave"):
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
         "load": {"class_type": "PaRaLoad", "inputs": {"para_name": fitting}}}
    if node == "PaRaSave":
        g["out"] = {"class_type": "PaRaSave", "inputs": {"para": ["load", 0], "filename_prefix": prefix, "dtype": "fp32"}}
    else:
        g["out"] = {"class_type": "PaRaExportLoRA", "inputs": {"model": ["ckpt", 0], "para": ["load", 0],
                                                               "filename_prefix": prefix, "strength": 1.0,
                                                               "dtype": "fp32"}}
    return g


@pytest.mark.parametrize("node", ["PaRaSave", "PaRaExportLoRA", "PaRaTrainer"])
@pytest.mark.parametrize("case, prefix, says", BAD_PREFIXES, ids=[c for c, _, _ in BAD_PREFIXES])
def test_a_prefix_the_file_system_cannot_take_is_an_error_naming_filename_prefix(comfy_server, fitting, node, case,
                                                                                  prefix, says):
    before = comfy_server.log_text()
    if node == "PaRaTrainer":
        g = trainer_graph(filename_prefix=prefix, steps=3)
        message = run_error(comfy_server, g)
        assert "step 1/" not in comfy_server.log_text()[len(before):], "the trainer trained before refusing"
    else:
        message = run_error(comfy_server, save_graph(fitting, prefix, node))
    assert "input 'filename_prefix'" in message and says in message, message
    assert "Errno" not in message and "embedded null" not in message and "outside" not in message, message
    still_serving(comfy_server, fitting)


@pytest.mark.parametrize("node", ["PaRaSave", "PaRaExportLoRA", "PaRaTrainer"])
@pytest.mark.parametrize("case, prefix", [("emoji", "\U0001F600" * 58), ("just_fits", "q" * 236)],
                         ids=["emoji", "just_fits"])
def test_a_name_that_fits_is_saved_even_when_a_temporary_name_of_it_would_not(comfy_server, fitting, node, case,
                                                                               prefix):
    """58 emoji: the final name is 251 bytes (the limit is 255); its temporary name must not be longer."""
    folder = comfy_server.models_dir / ("loras" if node == "PaRaExportLoRA" else "para")
    if node == "PaRaTrainer":  # its names add "_step000002" (11 bytes) and lose the "_" (1)
        prefix = prefix[:-2] if case == "emoji" else prefix[:-10]
        comfy_server.run(trainer_graph(filename_prefix=prefix, steps=2, save_every=2), timeout=300)
        want = f"{prefix}_00001_step000002.safetensors"
    else:
        comfy_server.run(save_graph(fitting, prefix, node), timeout=300)
        want = f"{prefix}_00001_.safetensors"
    assert len(want.encode()) <= 255
    assert want in os.listdir(folder), sorted(os.listdir(folder))[:5]
    assert not [n for n in os.listdir(folder) if n.endswith(".para-tmp")]


def test_huge_trigger_words_are_refused_before_training(comfy_server, fitting):
    before = comfy_server.log_text()
    message = run_error(comfy_server, trainer_graph(trigger_words="sks " * 9_000_000, filename_prefix="huge_tw"))
    log = comfy_server.log_text()[len(before):]
    assert "input 'trigger_words'" in message, message[:300]
    assert "step 1/" not in log and "could not write the checkpoint" not in log
    assert not [n for n in os.listdir(comfy_server.models_dir / "para") if n.startswith("huge_tw")]
    still_serving(comfy_server, fitting)


def test_trigger_words_with_a_lone_surrogate_are_refused_before_training(comfy_server, fitting):
    message = run_error(comfy_server, trainer_graph(trigger_words="sks \ud800", filename_prefix="surrogate_tw"))
    assert "input 'trigger_words'" in message, message
    still_serving(comfy_server, fitting)


# ------------------------------------------------------------------------- the server log

def test_control_characters_in_names_reach_the_log_escaped(comfy_server, fitting):
    evil = "log\x1b[31mRED\x1b[0m\nFORGED LINE"
    before = len(comfy_server.log_text())
    comfy_server.run(save_graph(fitting, evil), timeout=120)
    comfy_server.run(trainer_graph(filename_prefix=evil + "2", steps=1), timeout=300)
    # a file whose name holds escapes, and an error that names it (ComfyUI logs the message)
    bad = "bad\x1b[31mRED\nFORGED LINE.safetensors"
    (comfy_server.models_dir / "para" / bad).write_bytes(b"not a safetensors file at all")
    message = run_error(comfy_server, {"load": {"class_type": "PaRaLoad", "inputs": {"para_name": bad}},
                                       "save": {"class_type": "PaRaSave", "inputs": {
                                           "para": ["load", 0], "filename_prefix": "never", "dtype": "fp32"}}})
    assert "not a safetensors file" in message and "\\x1b[31mRED" in message, message
    log = comfy_server.log_text()[before:]
    assert "\x1b[31mRED" not in log, log[-2000:]  # (ComfyUI 0.33 colours its own log lines)
    assert not [l for l in log.splitlines() if l.startswith("FORGED LINE")], log[-2000:]
    assert "\\x1b[31mRED" in log  # the name is still there, escaped
    # the files have the names the client asked for
    assert any(n.startswith(evil) for n in os.listdir(comfy_server.models_dir / "para"))


# ------------------------------------------------------------------------- a replaced file

def sample_graph(loader):
    g = models.txt2img_graph(save="latent", prefix=f"swap_{loader}", steps=1, seed=5)
    if loader == "PaRaLoader":
        g["para"] = {"class_type": "PaRaLoader", "inputs": {"model": ["ckpt", 0], "para_name": "swap.safetensors",
                                                            "strength": 1.0}}
    else:
        g["load"] = {"class_type": "PaRaLoad", "inputs": {"para_name": "swap.safetensors"}}
        g["para"] = {"class_type": "PaRaApply", "inputs": {"model": ["ckpt", 0], "para": ["load", 0], "strength": 1.0}}
    g["sampler"]["inputs"]["model"] = ["para", 0]
    return g


@pytest.mark.parametrize("loader", ["PaRaLoader", "PaRaLoad"])
def test_a_file_replaced_by_one_of_the_same_size_and_mtime_is_reloaded(comfy_server, sd15_checkpoint, para_core,
                                                                      loader):
    """cp -p / rsync -a: another adapter, byte for byte as long, with the old file's mtime."""
    layers = checkpoint_layers(sd15_checkpoint)
    g = torch.Generator().manual_seed(11)
    states = [para_core.ParaState(B={l: torch.randn(shape[0], 3, generator=g) for l, shape in layers},
                                  metadata={"modelspec.title": "same length title"}) for _ in range(2)]
    folder = comfy_server.models_dir / "para"
    path, other = folder / "swap.safetensors", folder / "swap_other.safetensors"
    para_core.save_para(states[0], str(path))
    para_core.save_para(states[1], str(other))
    assert path.stat().st_size == other.stat().st_size
    first = load_latent(comfy_server.output_files(comfy_server.run(sample_graph(loader), 300), "latents")[0])
    st = path.stat()
    with open(path, "r+b") as f:  # what cp does onto an existing file: same inode, new bytes
        f.write(other.read_bytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    second = load_latent(comfy_server.output_files(comfy_server.run(sample_graph(loader), 300), "latents")[0])
    # the reference: the second adapter loaded fresh under another name
    ref_graph = sample_graph(loader)
    key = "para" if loader == "PaRaLoader" else "load"
    ref_graph[key]["inputs"]["para_name"] = "swap_other.safetensors"
    ref = load_latent(comfy_server.output_files(comfy_server.run(ref_graph, 300), "latents")[0])
    assert not torch.equal(first, ref)
    assert torch.equal(second, ref), "the replaced file's old adapter was used"


def test_an_invalid_dtype_sent_through_the_api_is_a_clear_error(comfy_server, sd15_checkpoint, para_core):
    ((layer, (out, _)),) = checkpoint_layers(sd15_checkpoint, 1)
    para_core.save_para(para_core.ParaState(B={layer: torch.randn(out, 2)}),
                        str(comfy_server.models_dir / "para" / "for_evil.safetensors"))
    g = {"load": {"class_type": "PaRaLoad", "inputs": {"para_name": "for_evil.safetensors"}},
         "save": {"class_type": "PaRaSave", "inputs": {"para": ["load", 0], "filename_prefix": "evil",
                                                       "dtype": "evil"}}}
    try:
        entry = comfy_server.wait(comfy_server.client.queue(g), timeout=120)
    except PromptRejected as e:  # ComfyUI versions that validate V3 combos refuse it at once
        assert "dtype" in str(e.body) and "KeyError" not in str(e.body)
        return
    message = entry.message or ""
    assert "input 'dtype' is 'evil'; use one of fp32, fp16, bf16" in message, message
