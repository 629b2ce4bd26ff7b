"""The trainer state file (.trainer.pt, para_core/trainer_state.py): written with the umask's
permissions, and a state whose fields have the wrong types is a clear error naming the file and
the field."""
import stat

import pytest
import torch

from para_core import ParaError


def test_trainer_state_gets_the_umasks_permissions(tmp_path, umask_022):
    from para_core.trainer_state import save_trainer_state
    p = tmp_path / "x.trainer.pt"
    save_trainer_state({"step": 1, "layers": ["a"]}, str(p))
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


@pytest.mark.parametrize("field, value, says", [
    ("step", -5, "field 'step'"),
    ("step", "12", "field 'step'"),
    ("step", 2.5, "field 'step'"),
    ("layers", "abc", "field 'layers'"),
    ("layers", [1, 2], "field 'layers'"),
    ("loss_history", "x", "field 'loss_history'"),
    ("loss_history", [0.1] * 9, "field 'loss_history'"),
    ("optimizer", [1, 2], "field 'optimizer'"),
    ("optimizer_name", 3, "field 'optimizer_name'"),
    ("settings", "fast", "field 'settings'"),
    ("scaler", 7, "field 'scaler'"),
    ("version", "one", "field 'version'"),
])
def test_trainer_state_with_wrong_field_types_is_a_clear_error(tmp_path, field, value, says):
    from para_core.trainer_state import load_trainer_state
    good = {"step": 4, "layers": ["diffusion_model.a"], "loss_history": [0.1] * 4, "optimizer_name": "AdamW",
            "optimizer": {"state": {}, "param_groups": []}, "settings": {"lr": 0.1}, "scaler": None, "version": 1}
    p = tmp_path / "x.trainer.pt"
    torch.save(good, p)
    assert load_trainer_state(p)["step"] == 4
    torch.save(dict(good, **{field: value}), p)
    with pytest.raises(ParaError, match=says) as err:
        load_trainer_state(p)
    assert "x.trainer.pt" in str(err.value)
