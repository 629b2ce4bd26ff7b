"""The benchmark's judges on ground truth and on known negatives: fast,
deterministic, no ComfyUI server."""
import dataclasses
import os
from pathlib import Path

import pytest

pytest.importorskip("scipy", reason="the benchmark's judges need scipy")
pytest.importorskip("PIL", reason="the benchmark's world draws with Pillow")
pytest.importorskip("torch", reason="the shape judge is a small torch MLP")

import numpy as np  # noqa: E402

from bench import editing, judges, quality, world  # noqa: E402


@pytest.fixture(scope="module")
def J():
    return judges.Judges.build(None, n=400)


SOURCES = {src.name: src for src in editing.SOURCES + (editing.PILOT_SOURCE,)}


def _check(J, scene, src, edit=None):
    return editing.check(J, world.render(scene), src, editing._reference(J, src), edit)


@pytest.mark.parametrize("name", list(SOURCES))
def test_each_edit_source_scores_as_reconstructed(J, name):
    src = SOURCES[name]
    assert _check(J, src.scene, src)["joint"] is True


@pytest.mark.parametrize("name", list(SOURCES))
def test_perfect_edits_score_as_edited_and_preserved(J, name):
    src = SOURCES[name]
    for edit in src.edits:
        r = _check(J, src.edited(*edit), src, edit)
        assert r["edited"] and r["kept"] and r["joint"], (edit, r)


@pytest.mark.parametrize("name", list(SOURCES))
def test_what_the_caption_alone_says_does_not_reconstruct(J, name):
    """The base world's picture of the source's caption (centred, the size's own side, no mark)
    must fail: that is what makes the task one the base cannot do alone."""
    src = SOURCES[name]
    o = src.obj
    plain = world.Scene((world.Obj(o.shape, o.colour, o.size, 0.5, 0.5),), src.scene.background)
    assert _check(J, plain, src)["joint"] is False


@pytest.mark.parametrize("name", list(SOURCES))
def test_a_shift_of_six_pixels_is_not_a_reconstruction(J, name):
    src = SOURCES[name]
    shifted = dataclasses.replace(src.obj, cx=src.obj.cx + 6 / world.SIZE)
    r = _check(J, world.Scene((shifted,), src.scene.background), src)
    assert r["position"] is False and r["joint"] is False


def test_the_world_size_or_a_missing_mark_is_not_a_reconstruction(J):
    sized = next(s for s in editing.SOURCES if s.obj.side)
    marked = next(s for s in editing.SOURCES if s.obj.detail)
    r = _check(J, world.Scene((dataclasses.replace(sized.obj, side=0.0),), sized.scene.background), sized)
    assert r["size"] is False and r["joint"] is False
    r = _check(J, world.Scene((dataclasses.replace(marked.obj, detail=""),), marked.scene.background), marked)
    assert r["mark"] is False and r["joint"] is False


def test_wrong_colour_edit_fails(J):
    src = editing.SOURCES[0]
    edit = next(e for e in src.edits if e[0] == "colour")
    wrong = world.Scene((dataclasses.replace(src.obj, colour="blue"),), src.scene.background)
    assert edit[1] != "blue"
    r = _check(J, wrong, src, edit)
    assert r["edited"] is False and r["kept"] is True and r["joint"] is False


def test_consistency_is_one_for_identical_samples_and_low_for_scattered_ones(J):
    src = editing.SOURCES[0]
    same = np.stack([world.render(src.scene)] * 3)
    assert editing.consistency(J, same) == pytest.approx(1.0)
    scattered = np.stack([world.render(world.Scene((dataclasses.replace(src.obj, cx=x, cy=y),), "white"))
                          for x, y in ((0.25, 0.25), (0.75, 0.75), (0.25, 0.75))])
    assert editing.consistency(J, scattered) < 0.2


def test_bootstrap_interval_brackets_the_mean_of_paired_differences():
    assert editing.bootstrap_ci([0.25] * 12) == (0.25, 0.25)
    lo, hi = editing.bootstrap_ci([1, -1] * 10)
    assert lo < 0 < hi
    lo, hi = editing.bootstrap_ci([0.5, 0.25, 0.75, 0.5] * 3)
    assert 0.25 < lo < 0.5 < hi < 0.75


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
    assert c["neg_edit_worst"] == 0 and c["neg_gt_multi_fused"] == 0, c
    for k in ("shifted", "resized", "unmarked", "wrong_colour", "caption_only"):
        assert c[f"neg_gt_{k}"] == 0, (k, c)
