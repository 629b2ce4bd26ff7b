"""The one-command demo (workflows/demo.py) end to end at --quick, its message when ComfyUI is
missing, and which model it uses."""
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness import comfyui, models
from workflow_helpers import WORKFLOWS_DIR

DEMO = WORKFLOWS_DIR / "demo.py"


def test_without_comfyui_it_says_how_to_get_it(tmp_path):
    env = dict(os.environ, COMFYUI_PATH=str(tmp_path / "nowhere"), HOME=str(tmp_path))
    r = subprocess.run([sys.executable, str(DEMO), "--quick", "--out", str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    if comfyui.PACK_ROOT.parent.name == "custom_nodes":
        pytest.skip("this checkout lives in a ComfyUI's custom_nodes, so the demo always finds that ComfyUI")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "git clone https://github.com/comfyanonymous/ComfyUI" in r.stderr
    assert "COMFYUI_PATH" in r.stderr
    assert not (tmp_path / "out").exists()


def readme_batch_example() -> list[str]:
    """The documented batch command that runs on what the demo leaves behind, as argv."""
    lines = (comfyui.PACK_ROOT / "docs" / "workflows.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if "workflows/batch.py 2_generate_with_para_file --start-server" in ln)
    text = ""
    for ln in lines[start:]:
        text += ln.strip().rstrip("\\") + " "
        if not ln.rstrip().endswith("\\"):
            break
    return shlex.split(text)


@pytest.mark.slow
@pytest.mark.server
def test_quick_demo_writes_para_files_images_loss_plots_and_a_summary(comfyui_path, sd15_checkpoint, tmp_path):
    out = tmp_path / "demo_output"
    # ComfyUI 0.3.64's own Python has no websocket-client: hide it, the progress must still show
    blocker = tmp_path / "no_websocket_client"
    blocker.mkdir()
    (blocker / "websocket.py").write_text("raise ImportError('websocket-client is not installed')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(DEMO), "--quick", "--out", str(out)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    log = r.stdout
    for line in ("workflow 1:", "workflow 3:", "workflow 4:", "workflow 5:", "step 4/4", "all done",
                 "random weights", "workflows/batch.py"):
        assert line in log, log
    assert "no live progress" not in log
    # every graph was valid as queued: ComfyUI logged no validation failure
    server_log = (out / "comfyui" / "comfyui.log").read_text()
    assert "Failed to validate" not in server_log and "invalid prompt" not in server_log.lower(), server_log[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    files = {f["file"]: f for f in summary["para_files"]}
    subjects = [f for f in files.values() if f["kind"] == "subject"]
    merged = [f for f in files.values() if f["kind"] == "merged"]
    assert len(subjects) == 2 and len(merged) == 1
    assert {f["trigger_words"] for f in subjects} == {"sks", "zwx"}
    for f in subjects:
        assert f["rank"] == "4" and f["steps"] == 4 and f["layers"] > 0
        assert 0 < f["params"] < f["equivalent_lora_params"], "PaRa stores r*out per layer, LoRA r*(out+in)"
        assert (out / f["file"]).stat().st_size == f["bytes"]
    assert merged[0]["merge_mode"] == "sum"
    lora = summary["exported_lora"]
    assert (out / lora["file"]).is_file()
    # the exported LoRA has exactly the parameters of an equivalent LoRA, plus one alpha per layer
    sks = next(f for f in subjects if f["trigger_words"] == "sks")
    assert lora["params"] == sks["equivalent_lora_params"] + sks["layers"]
    # ... and gives the PaRa model's picture (workflow 1 and 5 share prompt and seed)
    assert lora["max_pixel_difference_to_para_image"] is not None and lora["max_pixel_difference_to_para_image"] <= 3

    from PIL import Image
    expected = ["images/1_train_sks_save_image.png", "images/1_train_zwx_save_image.png",
                "images/3_merge_save_image.png", "images/4_edit_input.png", "images/4_edit_save_image_edit.png",
                "images/4_edit_save_image_caption.png", "images/5_lora_save_image.png",
                "loss_1_train_sks.png", "loss_1_train_zwx.png"]
    for rel in expected:
        with Image.open(out / rel) as im:
            assert im.size[0] > 0, rel
    with Image.open(out / "images/5_lora_save_image.png") as im:
        assert im.size == (64, 64)
    assert sorted(p.name for p in (out / "training_images" / "demo_sks").glob("*.txt"))
    assert "sks" in next((out / "training_images" / "demo_sks").glob("*.txt")).read_text()
    md = (out / "summary.md").read_text()
    assert "| server start |" in md and "LoRA parameters" in md
    assert set(summary["timings_s"]) >= {"server start", "1_train_subject (sks)", "3_merge_two_subjects",
                                         "4_single_image_edit", "5_export_as_lora (generate)", "total"}
    assert sorted(files) == ["para/demo_merged.safetensors", "para/demo_sks.safetensors", "para/demo_zwx.safetensors"]

    # the documented batch example runs as written on what the demo left behind
    models = out / "comfyui" / "models"
    assert (models / "checkpoints" / "demo_base.safetensors").is_file()
    assert sorted(p.name for p in (models / "para").iterdir()) == sorted(Path(f).name for f in files)
    argv = readme_batch_example()
    assert argv[:2] == ["python", "workflows/batch.py"] and "demo_output/comfyui" in argv, argv
    r = subprocess.run([sys.executable, str(WORKFLOWS_DIR / "batch.py"), *argv[2:]], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "9 ok, 0 failed" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "batch_output" / "manifest.csv", newline="")))
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    with Image.open(tmp_path / "batch_output" / "grid.png") as grid:
        assert grid.width >= 3 * 64


def test_a_user_checkpoint_runs_the_shipped_workflows_at_the_paper_settings(tmp_path):
    from workflows import demo
    from workflows import api_graph
    s = demo.settings_for(demo.parse_args(["--checkpoint", "my_model.safetensors"]))
    assert s["size"] == 512 and s["train_steps"] == 1000
    train = api_graph.load("1_train_subject")
    trainer = train[api_graph.find(train, "PaRa Trainer")]
    paper = {"rank": 4, "layers": "noxattn", "learning_rate": 1e-4, "steps": 1000, "optimizer": "AdamW", "batch_size": 1}
    assert {k: trainer["inputs"][k] for k in paper} == paper
    edit = api_graph.load("4_single_image_edit")
    assert api_graph.get_input(edit, "PaRa Trainer.layers") == "noxattn-hspace-last"
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "my_model.safetensors").write_bytes(b"x")
    assert demo.user_checkpoint("my_model.safetensors", tmp_path).name == "my_model.safetensors"
    with pytest.raises(SystemExit, match="found: my_model.safetensors"):
        demo.user_checkpoint("other.safetensors", tmp_path)


# ------------------------------------------------------------------------------------------
# Which model the demo uses: the benchmark's base when it is built, else one it builds once. The
# builds take minutes, so train_base's build and cache check are replaced here; the builds themselves are tested in test_bench_quality.py.
# ------------------------------------------------------------------------------------------

PARALLEL = (os.cpu_count() or 1) >= 2  # the demo builds the decoder and UNet stages at once on 2+ cores


@pytest.mark.parametrize("bench_steps", [1200, 5000], ids=["small-benchmark-base", "large-benchmark-base"])
def test_the_demo_uses_the_benchmark_base_when_built_else_builds_one_once(monkeypatch, tmp_path, bench_steps):
    from workflows import demo
    from bench import train_base
    built = []
    current = set()
    bench = tmp_path / "para_quality_base.safetensors"
    monkeypatch.setattr(train_base, "UNET_STEPS", bench_steps)
    monkeypatch.setattr(train_base, "ensure_base", lambda seed=0, **kw: (built.append((bench, seed, kw)), current.add(bench),
                                                                        bench)[-1])
    monkeypatch.setattr(train_base, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(train_base, "checkpoint_path", lambda: tmp_path / "para_quality_base.safetensors")
    monkeypatch.setattr(train_base, "is_current", lambda path, seed=0: Path(path) in current)
    monkeypatch.setattr(train_base, "build", lambda path, seed=0, **kw: (built.append((Path(path), seed, kw)),
                                                                           current.add(Path(path))))
    logs = []
    path, what = demo.demo_checkpoint(False, log=logs.append, threads=1)  # a build gets the demo's thread count
    if bench_steps <= demo.DEMO_BASE_UNET_STEPS:  # the benchmark's base is small: the demo builds that one
        assert built == [(bench, 0, {"threads": 1, "parallel": PARALLEL})] and path == bench and "quality benchmark" in what
        assert "building the benchmark's base model once" in logs[0]
    else:
        assert built == [(tmp_path / f"para_demo_base_u{demo.DEMO_BASE_UNET_STEPS}.safetensors", 0,
                          {"unet_steps": demo.DEMO_BASE_UNET_STEPS, "threads": 1, "parallel": PARALLEL})]
        assert path == built[0][0] and "trained here" in what and "building the demo's base model once" in logs[0]
    assert demo.demo_checkpoint(False, log=logs.append)[0] == path and len(built) == 1, "cached: built once"
    current.add(bench)
    path, what = demo.demo_checkpoint(False)
    assert path == bench and "quality benchmark" in what


def test_quick_stays_on_random_weights_and_says_so(monkeypatch):
    from workflows import demo
    monkeypatch.setattr(models, "cached_sd15_checkpoint", lambda: Path("test_sd15.safetensors"))
    path, what = demo.demo_checkpoint(True)
    assert path.name == "test_sd15.safetensors" and "random weights" in what and "noise" in what


def test_the_first_queue_of_workflow_5_holds_only_the_export_branch():
    from workflows import demo
    from workflows import api_graph
    g = api_graph.load("5_export_as_lora")
    part = demo.only_for(g, api_graph.find(g, "PaRa Export LoRA"))
    assert sorted(api_graph.title(n) for n in part.values()) == ["Load Checkpoint", "PaRa Export LoRA", "PaRa Load"]


def test_a_base_build_reports_each_stage_and_an_eta(monkeypatch):
    from bench import train_base
    monkeypatch.setattr(train_base.time, "time", lambda: 1000.0)
    assert train_base.progress("UNet", 49, 100, 1000.0 - 90) == "UNet step 50/100 (90s, ETA 1m30s)"
    assert train_base.progress("decoder", 99, 100, 1000.0 - 5) == "decoder step 100/100 (5s, ETA 0s)"
