"""PaRa Trainer's checkpoints and resume: a resume takes its new learning rate, a checkpoint that
cannot be written warns and the run goes on (and is retried at the next save), a NaN stop gives
advice for the training dtype; a damaged .trainer.pt (wrong rank, wrong field types, damaged
optimizer or GradScaler state) is a clear error naming resume_from before the run starts:
in-process for every kind of damage, and through the real server, which then keeps serving."""
import copy
import json
import os

import pytest
import torch

from harness import models
from pack_helpers import folder, trainer_settings

pytestmark = [pytest.mark.comfyui, pytest.mark.usefixtures("one_torch_thread")]

BASE = trainer_settings(filename_prefix="rd")


def _group(s):
    return s["optimizer"]["param_groups"][0]


def _first(s):
    return s["optimizer"]["state"][0]


# (id, what to do to the loaded trainer state, the training dtype of the resumed run, what the message says)
DAMAGE = [
    ("betas", lambda s: _group(s).__setitem__("betas", "xx"), "fp32", "'betas'"),
    ("no_exp_avg", lambda s: _first(s).pop("exp_avg"), "fp32", "no 'exp_avg'"),
    ("amsgrad_yes", lambda s: _group(s).__setitem__("amsgrad", "yes"), "fp32", "'amsgrad'"),
    ("maximize_yes", lambda s: _group(s).__setitem__("maximize", "yes"), "fp32", "'maximize'"),
    ("scaler_foo", lambda s: s.__setitem__("scaler", {"foo": 1}), "fp16", "GradScaler state has no 'scale'"),
    ("scaler_scale", lambda s: s.__setitem__("scaler", dict(scale=-1.0, growth_factor=2.0, backoff_factor=0.5,
                                                            growth_interval=2000, _growth_tracker=0)),
     "fp16", "'scale'"),
    ("second_group", lambda s: s["optimizer"]["param_groups"].append(dict(_group(s), params=[])), "fp32",
     "2 parameter groups"),
    ("step_x", lambda s: _first(s).__setitem__("step", "x"), "fp32", "'step'"),
    ("beta_out_of_range", lambda s: _group(s).__setitem__("betas", (1.5, 0.999)), "fp32", "beta"),
    ("negative_second_moment", lambda s: _first(s).__setitem__("exp_avg_sq", -_first(s)["exp_avg_sq"] - 1), "fp32",
     "NaN/Inf"),
    ("nan_moment", lambda s: _first(s)["exp_avg"].fill_(float("nan")), "fp32", "NaN or Inf"),
    ("int_moment", lambda s: _first(s).__setitem__("exp_avg", torch.zeros_like(_first(s)["exp_avg"], dtype=torch.int32)),
     "fp32", "floating-point"),
    ("missing_entry", lambda s: s["optimizer"]["state"].pop(1), "fp32", "no state for"),
    ("params_swapped", lambda s: _group(s).__setitem__("params", [1, 0] + _group(s)["params"][2:]), "fp32",
     "lists the tensors"),
]


def para_folder():
    import folder_paths
    return folder_paths.get_folder_paths("para")[0]


def train(mods, model, **kw):
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    with torch.inference_mode():
        return mods.trainer.PaRaTrainer.execute(model=model, latents=lat, positive=models.random_conditioning(1),
                                                **dict(BASE, **kw))


@pytest.fixture(scope="module")
def source(mods, comfy_in_process):
    """One fp16 run with a checkpoint (optimizer + GradScaler state) to damage copies of."""
    with torch.inference_mode():
        model = models.make_tiny_model(seed=0)
    train(mods, model, steps=2, save_every=2, training_dtype="fp16", filename_prefix="rd_src")
    (name,) = [f for f in os.listdir(para_folder()) if f.startswith("rd_src_") and f.endswith(".safetensors")]
    path = os.path.join(para_folder(), name)
    state = torch.load(path[: -len(".safetensors")] + ".trainer.pt", weights_only=True)
    assert state["scaler"] and state["optimizer"]["state"]
    return model, path, state


def damaged_copy(source, case_id, damage):
    import shutil
    _, path, state = source
    name = f"rd_{case_id}.safetensors"
    dest = os.path.join(para_folder(), name)
    shutil.copyfile(path, dest)
    s = copy.deepcopy(state)
    damage(s)
    torch.save(s, dest[: -len(".safetensors")] + ".trainer.pt")
    return name


def test_the_undamaged_state_resumes(mods, source):
    model, path, _ = source
    _, _, loss, steps = train(mods, model, steps=3, training_dtype="fp16", resume_from=os.path.basename(path),
                              filename_prefix="rd_ok").args[:4]
    assert steps == 3 and len(loss["loss"]) == 3


@pytest.mark.parametrize("optimizer, parametrization", [("SGD", "paper"), ("Adam", "paper"), ("RMSprop", "paper"),
                                                      ("AdamW", "reference")])
def test_every_optimizers_own_state_passes_the_check(mods, source, optimizer, parametrization):
    model = source[0]
    prefix = f"rd_{optimizer}_{parametrization}"
    train(mods, model, steps=2, save_every=2, optimizer=optimizer, parametrization=parametrization,
          filename_prefix=prefix)
    (name,) = [f for f in os.listdir(para_folder()) if f.startswith(prefix + "_") and f.endswith(".safetensors")]
    _, _, loss, steps = train(mods, model, steps=3, optimizer=optimizer, parametrization=parametrization,
                              resume_from=name, filename_prefix=prefix + "_more").args[:4]
    assert steps == 3 and len(loss["loss"]) == 3


@pytest.mark.parametrize("case_id, damage, dtype, says", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_trainer_state_is_an_error_naming_resume_from(mods, source, case_id, damage, dtype, says):
    model = source[0]
    name = damaged_copy(source, case_id, damage)
    with pytest.raises(mods.core.ParaError) as err:
        train(mods, model, steps=3, training_dtype=dtype, resume_from=name, filename_prefix="rd_bad")
    message = str(err.value)
    assert message.startswith(f"input 'resume_from' ({name})"), message
    assert says in message and ".trainer.pt" in message and "delete it" in message, message


def resume_graph(image, name, dtype="fp32"):
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.SD15_CHECKPOINT_NAME}},
         "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of sks", "clip": ["ckpt", 1]}},
         "load": {"class_type": "LoadImage", "inputs": {"image": image}},
         "encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["load", 0], "vae": ["ckpt", 2]}},
         "train": {"class_type": "PaRaTrainer", "inputs": dict(
             model=["ckpt", 0], latents=["encode", 0], positive=["pos", 0], rank=1, layers="noxattn-hspace",
             rank_cap="none", steps=2, learning_rate=1e-3, optimizer="AdamW", batch_size=1, seed=0,
             training_dtype=dtype, gradient_checkpointing=False, init="orthogonal", save_every=1,
             filename_prefix="srv_rd", resume_from=name or "[none]", custom_layers="", trigger_words="")},
         "save": {"class_type": "PaRaSave", "inputs": {"para": ["train", 1], "filename_prefix": "srv_rd_out",
                                                       "dtype": "fp32"}}}
    return g


def test_a_damaged_trainer_state_through_the_server(comfy_server):
    from PIL import Image
    Image.new("RGB", (64, 64), (200, 80, 40)).save(comfy_server.input_dir / "resume_damage.png")
    graph = resume_graph("resume_damage.png", None, "fp16")
    comfy_server.run(graph, timeout=600)
    para_dir = comfy_server.models_dir / "para"
    (first,) = sorted(para_dir.glob("srv_rd_*_step000001.safetensors"))
    state = torch.load(str(first)[: -len(".safetensors")] + ".trainer.pt", weights_only=True)
    for case_id, damage, dtype, says in DAMAGE:
        name = f"srv_rd_{case_id}.safetensors"
        (para_dir / name).write_bytes(first.read_bytes())
        s = copy.deepcopy(state)
        damage(s)
        torch.save(s, str(para_dir / name)[: -len(".safetensors")] + ".trainer.pt")
        entry = comfy_server.wait(comfy_server.client.queue(resume_graph("resume_damage.png", name, dtype)), timeout=600)
        message = entry.message or ""
        assert entry.status == "error", case_id
        assert f"input 'resume_from' ({name})" in message and says in message, (case_id, message)
    # and the server keeps serving: the undamaged checkpoint resumes
    comfy_server.run(resume_graph("resume_damage.png", first.name, "fp16"), timeout=600)


# ------------------------------------------------------------------------- checkpoints, resume and stops in-process

@pytest.fixture
def model(comfy_in_process):
    with torch.inference_mode():
        return models.make_tiny_model(seed=0)


def test_resume_with_a_new_learning_rate_uses_it(mods, model, monkeypatch):
    train(mods, model, steps=2, save_every=2, filename_prefix="lr_src")
    (name,) = [f for f in os.listdir(folder("para")) if f.startswith("lr_src_") and f.endswith(".safetensors")]
    seen = []
    real = mods.training.TrainingRun._one_step

    def spy(self, *a, **k):
        seen.append([g["lr"] for g in self.optimizer.param_groups])
        return real(self, *a, **k)

    monkeypatch.setattr(mods.training.TrainingRun, "_one_step", spy)
    train(mods, model, steps=3, learning_rate=0.5, resume_from=name, filename_prefix="lr_dst")
    assert seen == [[0.5]]


def test_a_checkpoint_that_cannot_be_written_warns_and_the_run_goes_on(mods, model, caplog, monkeypatch):
    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mods.trainer, "save_para", disk_full)
    prefix = "ppp_full"
    out = train(mods, model, steps=3, save_every=1, filename_prefix=prefix)
    _, para, loss, steps = out.args[:4]
    assert steps == 3 and len(loss["loss"]) == 3 and para.layers
    assert sum("could not write the checkpoint" in r.getMessage() for r in caplog.records) == 3
    assert "could not be written" in json.dumps(out.ui.as_dict())
    assert not [f for f in os.listdir(folder("para")) if f.startswith("ppp")]


def test_a_failed_save_is_retried_at_the_next_one(mods, model, monkeypatch):
    real, calls = mods.trainer.save_para, []

    def flaky(state, path, *a, **k):  # disk full once, at step 1
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(state, path, *a, **k)

    monkeypatch.setattr(mods.trainer, "save_para", flaky)
    _, para, _, steps = train(mods, model, steps=2, save_every=1, filename_prefix="retry").args[:4]
    files = sorted(f for f in os.listdir(folder("para")) if f.startswith("retry_"))
    assert steps == 2 and files == ["retry_00001_step000002.safetensors", "retry_00001_step000002.trainer.pt"]


def resumable(mods, model, prefix):
    train(mods, model, steps=2, save_every=2, filename_prefix=prefix)
    (name,) = [f for f in os.listdir(folder("para")) if f.startswith(prefix + "_") and f.endswith(".safetensors")]
    return name, mods.trainer_state.trainer_state_path(os.path.join(folder("para"), name))


def test_trainer_state_of_another_rank_is_a_clear_error(mods, model):
    name, tpath = resumable(mods, model, "rank2")
    other, other_t = resumable(mods, model, "rank1_src")
    state = mods.trainer_state.load_trainer_state(other_t)
    for st in state["optimizer"]["state"].values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                st[k] = v[:, :1].clone()  # what a rank-1 run's moments look like
    torch.save(state, tpath)
    with pytest.raises(mods.core.ParaError, match=r"input 'resume_from'.*does not belong to .*another rank"):
        train(mods, model, steps=4, resume_from=name, filename_prefix="rank_resume")


@pytest.mark.parametrize("field, value", [("step", -5), ("layers", 7), ("loss_history", "abc")])
def test_damaged_trainer_state_is_an_error_naming_resume_from_and_the_field(mods, model, field, value):
    name, tpath = resumable(mods, model, f"dmg_{field}")
    state = torch.load(tpath, weights_only=True)
    state[field] = value
    torch.save(state, tpath)
    with pytest.raises(mods.core.ParaError, match=f"input 'resume_from'.*field '{field}'"):
        train(mods, model, steps=4, resume_from=name, filename_prefix="dmg_resume")


@pytest.mark.parametrize("dtype, advice, not_advice", [
    ("fp32", "Lower learning_rate", "fp16"),
    ("bf16", "training_dtype fp32", "instead of fp16"),
    ("fp16", "bf16 or fp32 instead of fp16", None),
])
def test_nan_stop_advice_depends_on_the_training_dtype(mods, model, monkeypatch, dtype, advice, not_advice):
    real = mods.training.diffusion_loss_sum
    monkeypatch.setattr(mods.training, "diffusion_loss_sum", lambda *a: real(*a) * float("nan"))
    with pytest.raises(mods.core.ParaError, match="NaN/Inf") as err:
        train(mods, model, steps=2, training_dtype=dtype, filename_prefix=f"nan_{dtype}")
    assert advice in str(err.value)
    if not_advice:
        assert not_advice not in str(err.value)
