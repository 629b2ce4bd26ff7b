"""The benchmark's judges on ground truth and on known negatives: fast,
deterministic, no ComfyUI server."""
import dataclasses
import os
from pathlib import Path

import pytest

pytest.importorskip("scipy", reason="the benchmark's judges need scipy")
pytest.importorskip("PIL", reason="the benchmark's world draws with Pillow")
pytest.importorskip("torch", reason="the shape judge is a small torch MLP")

from bench import judges, quality, world  # noqa: E402


@pytest.fixture(scope="module")
def J():
    return judges.Judges.build(None, n=400)


SRC = quality.EDIT_SOURCE.objects[0]
SRC_ATTRS = (SRC.shape, SRC.colour, SRC.size, quality.EDIT_SOURCE.background)


def test_edit_source_scores_as_reconstructed(J):
    assert quality._edit_check(J, world.render(quality.EDIT_SOURCE), SRC_ATTRS, None) == (True, True)


@pytest.mark.parametrize("what,obj,bg", [("colour", dataclasses.replace(SRC, colour="red"), "white"),
                                         ("background", SRC, "gray")])
def test_perfect_edit_scores_as_edited_and_preserved(J, what, obj, bg):
    img = world.render(world.Scene((obj,), bg))
    assert quality._edit_check(J, img, (obj.shape, obj.colour, obj.size, bg), what) == (True, True)


def test_shifted_object_is_not_preserved(J):
    img = world.render(world.Scene((dataclasses.replace(SRC, cx=SRC.cx + 0.2),), "white"))
    assert quality._edit_check(J, img, SRC_ATTRS, None)[1] is False


def test_wrong_colour_edit_fails(J):
    img = world.render(world.Scene((dataclasses.replace(SRC, colour="blue"),), "white"))
    assert quality._edit_check(J, img, (SRC.shape, "red", SRC.size, "white"), "colour")[0] is False


def _sd1_tokenizer():
    root = os.environ.get("COMFYUI_PATH") or str(Path.home() / "ComfyUI")
    path = Path(root) / "comfy" / "sd1_tokenizer"
    if not (path / "vocab.json").is_file():
        pytest.skip("ComfyUI's SD1 tokenizer files not found (set COMFYUI_PATH)")
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(str(path))


def test_every_trigger_word_is_one_sd1_token():
    tok = _sd1_tokenizer()
    triggers = set(quality.INSTANCES) | {s["trigger"] for s in quality.SUBJECTS.values()}
    for t in sorted(triggers):
        assert len(tok.tokenize(t)) == 1, (t, tok.tokenize(t))


@pytest.mark.parametrize("trig", sorted(quality.INSTANCES))
def test_instance_judge_positive_and_wrong_mark(J, trig):
    inst = quality.INSTANCES[trig]
    o = world.Obj(inst["shape"], inst["colour"], "large", 0.5, 0.5, inst["detail"])
    img = world.render(world.Scene((o,), "white"))
    assert J.instance(img, inst["shape"], inst["colour"], inst["detail"])["all"]
    other = "band" if inst["detail"] == "dot" else "dot"
    wrong = world.render(world.Scene((dataclasses.replace(o, detail=other),), "white"))
    assert not J.instance(wrong, inst["shape"], inst["colour"], inst["detail"])["all"]
    plain = world.render(world.Scene((dataclasses.replace(o, detail=""),), "white"))
    assert not J.instance(plain, inst["shape"], inst["colour"], inst["detail"])["all"]


def _pair(ca, cb, fused=False):
    a, b = quality.INSTANCES[quality.IA], quality.INSTANCES[quality.IB]
    (x1, y1), (x2, y2) = ((0.42, 0.5), (0.58, 0.5)) if fused else world.PAIR_CENTRES
    return world.render(world.Scene((world.Obj(a["shape"], ca, "small", x1, y1),
                                     world.Obj(b["shape"], cb, "small", x2, y2)), "white"))


def test_both_present_positive_and_fused_blob(J):
    a, b = quality.INSTANCES[quality.IA], quality.INSTANCES[quality.IB]
    want = ((a["shape"], a["colour"]), (b["shape"], b["colour"]))
    assert J.both_present(_pair(a["colour"], b["colour"]), *want)
    fused = _pair(a["colour"], b["colour"], fused=True)
    assert len(judges.object_masks(fused)) == 1
    assert not J.both_present(fused, *want)
    assert not J.both_present(_pair(a["colour"], a["colour"]), *want)  # wrong colour


def test_controls_on_ground_truth(J):
    c = quality.controls(J)
    assert c["ctl_recon_gt"] >= 0.95 and c["ctl_edit_preserved_gt"] >= 0.95 and c["ctl_multi_ceiling"] >= 0.8, c
    assert c["neg_gt_recon_shifted"] == 0 and c["neg_gt_multi_fused"] == 0, c
