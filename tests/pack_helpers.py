"""PaRa Trainer inputs for the tests that run it in-process (test_nodes_*). (Not named node_helpers:
ComfyUI has a top-level module of that name, which comfy.hooks imports.)"""

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
