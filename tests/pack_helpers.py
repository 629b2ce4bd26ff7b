"""Helpers for the tests that run the pack's nodes in-process (test_nodes_*), given the shared
``mods`` fixture (conftest.py). (Not named node_helpers: ComfyUI has a top-level module of that
name, which comfy.hooks imports.)"""
import torch

# PaRa Trainer's required inputs at the smallest settings that train: two steps of rank 2 on the
# noxattn layers, fp32, no checkpoints, no resume.
TRAINER_SETTINGS = dict(rank=2, layers="noxattn", rank_cap="none", steps=2, learning_rate=1e-2, optimizer="AdamW",
                        batch_size=1, seed=0, training_dtype="fp32", gradient_checkpointing=False,
                        init="orthogonal", save_every=0, filename_prefix="test", resume_from="[none]")


def trainer_settings(**overrides) -> dict:
    """TRAINER_SETTINGS with ``overrides`` (e.g. rank=4, steps=3, filename_prefix="ref")."""
    unknown = set(overrides) - set(TRAINER_SETTINGS) - {"parametrization"}
    assert not unknown, f"not PaRa Trainer inputs of TRAINER_SETTINGS: {sorted(unknown)}"
    return dict(TRAINER_SETTINGS, **overrides)


def folder(kind):
    """The in-process ComfyUI's first folder of ``kind`` ("para", "loras", ...)."""
    import folder_paths
    return folder_paths.get_folder_paths(kind)[0]


def subject_state(mods, model, seed=1, rank=2, layers=None):
    """A random subject ParaState for ``model``'s noxattn layers (or ``layers``)."""
    shapes = mods.patching.layer_shapes(model)
    layers = layers or mods.core.select_layers(shapes, "noxattn")
    g = torch.Generator().manual_seed(seed)
    B = {l: torch.randn(shapes[l][0], rank, generator=g) for l in layers}
    return mods.core.ParaState(B=B, metadata=mods.core.build_metadata("subject", rank=rank, base_arch="SD15"))
