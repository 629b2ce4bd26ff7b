"""PaRa Trainer under ComfyUI 0.3x's memory management: a dynamic-VRAM model is
trained on its classic copy, with comfy.model_management.in_training set, and every
out-of-memory form ComfyUI knows stops the run with advice and the last step kept.

ComfyUI only builds a ModelPatcherDynamic for a CUDA device (on a CPU its constructor returns a
plain ModelPatcher), so the dynamic model here is a ModelPatcher that reports is_dynamic() and
carries ModelPatcherDynamic's own get_non_dynamic_delegate: the rest (the checkpoint loader's
cached_patcher_init, the reload, the trainer) is the real code."""
import importlib
import os
import re

import pytest
import torch

from harness import models
from pack_helpers import trainer_settings

pytestmark = pytest.mark.comfyui
SETTINGS = trainer_settings(filename_prefix="dyn")


@pytest.fixture
def dynamic_model(sd15_checkpoint, comfy_in_process):
    import comfy.model_patcher as mp_mod
    import comfy.sd
    if not hasattr(mp_mod, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM (added after 0.3.64)")

    class DynamicOnCPU(mp_mod.ModelPatcher):
        non_dynamic_delegate_model = None
        get_non_dynamic_delegate = mp_mod.ModelPatcherDynamic.get_non_dynamic_delegate

        def is_dynamic(self):
            return True

    with torch.inference_mode():
        base = comfy.sd.load_checkpoint_guess_config(str(sd15_checkpoint), output_vae=False, output_clip=False)[0]
    dyn = DynamicOnCPU(base.model, base.load_device, base.offload_device)
    dyn.cached_patcher_init = base.cached_patcher_init
    return dyn


def test_dynamic_model_is_trained_on_its_classic_copy_with_the_training_flag(mods, dynamic_model, monkeypatch):
    import comfy.model_management as mm
    trainer, training = mods.trainer, mods.training
    seen = {}
    real_step = training.TrainingRun._one_step

    def one_step(self, *a, **k):
        seen.setdefault("dynamic", self.model.is_dynamic())
        seen.setdefault("same_model", self.model.model is dynamic_model.model)
        seen.setdefault("in_training", getattr(mm, "in_training", None))
        return real_step(self, *a, **k)

    monkeypatch.setattr(training.TrainingRun, "_one_step", one_step)
    before = {k: v.detach().clone() for k, v in dynamic_model.model.diffusion_model.state_dict().items()}
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
    with torch.inference_mode():
        out_model, state, loss, steps = trainer.PaRaTrainer.execute(model=dynamic_model, latents=lat, positive=pos,
                                                                    **SETTINGS).args[:4]
    assert seen == {"dynamic": False, "same_model": False, "in_training": True}
    assert getattr(mm, "in_training", False) is False
    assert steps == 2 and all(torch.isfinite(torch.tensor(loss["loss"])))
    # the user's model: untouched weights, the result patched onto a clone of it
    after = dynamic_model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out_model.is_dynamic() and out_model.model is dynamic_model.model and out_model.patches


def test_a_model_that_cannot_be_reloaded_gets_a_clear_error(mods, dynamic_model):
    dv, core = mods.dynamic_vram, mods.core
    dynamic_model.cached_patcher_init = None
    with pytest.raises(core.ParaError, match="dynamic VRAM.*--disable-dynamic-vram"):
        dv.training_patcher(dynamic_model)


def test_a_classic_model_is_trained_as_it_is(mods, tiny_model):
    assert mods.dynamic_vram.training_patcher(tiny_model) is tiny_model


@pytest.mark.parametrize("form", ["OutOfMemoryError", "AcceleratorError"])
def test_every_out_of_memory_form_stops_with_advice_and_keeps_the_last_step(mods, tiny_model, monkeypatch, form):
    import comfy.model_management as mm
    trainer, training, core = mods.trainer, mods.training, mods.core
    if form == "AcceleratorError" and not (hasattr(torch, "AcceleratorError") and hasattr(mm, "is_oom")):
        pytest.skip("no AcceleratorError / comfy.model_management.is_oom here")
    error = getattr(torch, form)
    para = importlib.import_module(training.__name__.rsplit('.', 1)[0] + ".adapters.para")
    real, calls = para.basis_batched, []

    def basis_batched(B):  # the device gives up at the third step (no GPU to exhaust here)
        calls.append(1)
        if len(calls) == 3:
            raise error("CUDA error: out of memory")
        return real(B)

    monkeypatch.setattr(para, "basis_batched", basis_batched)
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    prefix = f"oom_{form}"
    with torch.inference_mode():
        with pytest.raises(core.ParaError, match="out of memory"):
            trainer.PaRaTrainer.execute(model=tiny_model, latents=lat, positive=models.random_conditioning(1),
                                        **dict(SETTINGS, steps=10, save_every=100, filename_prefix=prefix))
    import folder_paths
    mine = re.compile(re.escape(prefix) + r"_\d{5}_step\d{6}\.safetensors")  # exactly this prefix's files
    saved = sorted(f for f in os.listdir(folder_paths.get_folder_paths("para")[0]) if mine.fullmatch(f))
    assert saved and saved[-1].endswith("step000002.safetensors")
