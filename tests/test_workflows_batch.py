"""Batch queuing (workflows/batch.py): sweeps expand as asked, run on a real server, survive a
failing job, and say in a manifest which parameters made which file."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from workflow_helpers import WORKFLOWS_DIR, install_placeholders
from workflows import api_graph, batch

WORKFLOW = "2_generate_with_para_file"
SMALL = ["--set", "Empty Latent Image.width=64", "--set", "Empty Latent Image.height=64", "--set", "KSampler.steps=2"]


def args(**kw):
    base = dict(mode=None, sweep=None, set=None, seeds=None, strengths=None, para=None, prompt=None)
    return SimpleNamespace(**dict(base, **kw))


def test_values_parse_as_lists_ranges_json_and_files(tmp_path):
    assert batch.parse_values("1,2,3") == [1, 2, 3]
    assert batch.parse_values("0.5, 1") == [0.5, 1]
    assert batch.parse_values("1..4") == [1, 2, 3, 4]
    assert batch.parse_values('["a, b", "c"]') == ["a, b", "c"]
    assert batch.parse_values("a.safetensors,b.safetensors") == ["a.safetensors", "b.safetensors"]
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of sks, on a beach\n\na photo of sks in snow\n")
    assert batch.parse_values(f"@{f}") == ["a photo of sks, on a beach", "a photo of sks in snow"]


def test_grid_makes_every_combination_and_list_pairs_them():
    g = api_graph.load(WORKFLOW)
    axes, jobs, mode = batch.build_axes(g, args(seeds="1,2", strengths="0,0.5,1"))
    assert mode == "grid" and [a.paths for a in axes] == [["6.inputs.seed"], ["2.inputs.strength"]]
    combos = batch.expand(axes, jobs, mode)
    assert len(combos) == 6 and combos[0] == {"seed": 1, "strength": 0} and combos[-1] == {"seed": 2, "strength": 1}
    axes, jobs, _ = batch.build_axes(g, args(set=["KSampler.seed=1,2,3", "PaRa Loader.strength=0,0.5,1"]))
    assert batch.expand(axes, jobs, "list") == [{"KSampler.seed": s, "PaRa Loader.strength": t}
                                                for s, t in ((1, 0), (2, 0.5), (3, 1))]
    with pytest.raises(batch.SweepError, match="same number of values"):
        batch.expand(batch.build_axes(g, args(seeds="1,2", strengths="0,0.5,1"))[0], [], "list")


def test_sweep_file_and_prompt_shorthand(tmp_path):
    g = api_graph.load(WORKFLOW)
    f = tmp_path / "sweep.json"
    f.write_text(json.dumps({"mode": "list", "set": {"6.inputs.seed": [5, 6]},
                             "jobs": [{"PaRa Loader.para_name": "a.safetensors"}]}))
    axes, jobs, mode = batch.build_axes(g, args(sweep=str(f), prompt=["x", "y"]))
    combos = batch.expand(axes, jobs, mode)
    assert combos == [{"2.inputs.para_name": "a.safetensors", "6.inputs.seed": 5, "prompt": "x"},
                      {"2.inputs.para_name": "a.safetensors", "6.inputs.seed": 6, "prompt": "y"}]
    job = batch.job_graph(g, axes, combos[1])
    assert job["3"]["inputs"]["text"] == "y" and job["6"]["inputs"]["seed"] == 6
    assert g["3"]["inputs"]["text"] != "y", "the original graph must stay untouched"


def test_bad_paths_are_clear_errors():
    g = api_graph.load(WORKFLOW)
    with pytest.raises(api_graph.GraphError, match="no node 'NoSuchNode'"):
        batch.build_axes(g, args(set=["NoSuchNode.seed=1"]))
    with pytest.raises(batch.SweepError, match="has no input 'sead'"):
        batch.build_axes(g, args(set=["KSampler.sead=1"]))
    with pytest.raises(batch.SweepError, match="swept twice"):
        batch.build_axes(g, args(set=["6.inputs.seed=1"], seeds="1,2"))
    assert batch.main([WORKFLOW, "--set", "KSampler.seed"]) == 2


def test_plain_options_set_the_checkpoint_size_steps_and_sampler_of_every_job():
    g = api_graph.load(WORKFLOW)
    axes, jobs, mode = batch.build_axes(g, args(ckpt="demo_base.safetensors", size="64", steps="20", cfg="4",
                                                sampler="dpmpp_2m", scheduler="karras", seeds="1,2"))
    graph, axes, fixed = batch.fixed_inputs(g, axes)
    assert [a.label for a in axes] == ["seed"]
    assert api_graph.get_input(graph, "Load Checkpoint.ckpt_name") == "demo_base.safetensors"
    assert api_graph.get_input(graph, "Empty Latent Image.width") == 64
    assert api_graph.get_input(graph, "Empty Latent Image.height") == 64
    assert {k: api_graph.get_input(graph, f"KSampler.{k}") for k in ("steps", "cfg", "sampler_name", "scheduler")} \
        == {"steps": 20, "cfg": 4, "sampler_name": "dpmpp_2m", "scheduler": "karras"}
    # several values sweep, like any other parameter
    axes, _, _ = batch.build_axes(g, args(steps="10,20", width="64", height="96"))
    assert [(a.label, a.values) for a in axes] == [("width", [64]), ("height", [96]), ("steps", [10, 20])]
    with pytest.raises(batch.SweepError, match="swept twice"):
        batch.build_axes(g, args(size="64", width="64"))
    # the flags exist on the command line
    parsed = batch.parse_args([WORKFLOW, "--ckpt", "a.safetensors", "--size", "64", "--steps", "3", "--cfg", "4"])
    assert (parsed.ckpt, parsed.size, parsed.steps, parsed.cfg) == ("a.safetensors", "64", "3", "4")


# ------------------------------------------------------------------------------------------
# Against a real server
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server, sd15_checkpoint):
    install_placeholders(comfy_server, sd15_checkpoint)
    return comfy_server


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_2x2_sweep_on_two_servers_gives_4_outputs_a_manifest_and_a_grid(server, tmp_path, capsys):
    # two URLs of the same server stand for two machines: jobs alternate between them
    urls = [server.url, server.url.replace("127.0.0.1", "localhost")]
    rc = batch.main([WORKFLOW, *SMALL, "--seeds", "1,2", "--strengths", "0,1", "--grid", "--out", str(tmp_path),
                     "--server", urls[0], "--server", urls[1]])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = read_csv(tmp_path / "manifest.csv")
    assert [(r["seed"], r["strength"]) for r in rows] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1")]
    assert all(r["status"] == "ok" for r in rows)
    assert {r["server"] for r in rows} == set(urls)
    files = [r["files"] for r in rows]
    assert len(set(files)) == 4 and all((tmp_path / f).stat().st_size > 0 for f in files)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["jobs"][3]["inputs"] == {"6.inputs.seed": 2, "2.inputs.strength": 1}
    from PIL import Image
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64
    assert "4 ok, 0 failed" in out


def test_failing_and_rejected_jobs_are_reported_and_the_others_finish(server, tmp_path, capsys):
    # job 2 fails while running (NaN strength), job 3 is refused by ComfyUI (unknown sampler)
    rc = batch.main([WORKFLOW, *SMALL, "--mode", "list", "--set", "PaRa Loader.strength=1,nan,0.5",
                     "--set", "KSampler.sampler_name=euler,euler,no_such_sampler", "--out", str(tmp_path),
                     "--server", server.url])
    out = capsys.readouterr().out
    assert rc == 1
    rows = read_csv(tmp_path / "manifest.csv")
    assert [r["status"] for r in rows] == ["ok", "error", "rejected"]
    assert "strength" in rows[1]["error"] and not rows[1]["files"]
    assert "no_such_sampler" in rows[2]["error"]
    assert (tmp_path / rows[0]["files"]).is_file()
    assert "1 ok, 2 failed" in out and "job 2" in out and "job 3" in out


def test_no_server_is_a_clear_error(tmp_path, capsys):
    assert batch.main([WORKFLOW, "--seeds", "1", "--out", str(tmp_path), "--server", "http://127.0.0.1:9"]) == 2
    assert "no ComfyUI answers" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stopping_the_batch_removes_its_waiting_job_and_interrupts_its_running_one(server, tmp_path, sig):
    # two slow jobs on one server: the first runs, the second waits in ComfyUI's queue
    cmd = [sys.executable, str(WORKFLOWS_DIR / "batch.py"), WORKFLOW, "--size", "512", "--steps", "500",
           "--seeds", "1,2", "--server", server.url, "--max-queued", "2", "--out", str(tmp_path)]
    # SIG_DFL: a test run started in the background (`cmd &` without job control, nohup) ignores
    # SIGINT, the child would inherit that and Python would then never raise KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while True:
            q = server.client.get("/queue")
            if len(q["queue_running"]) == 1 and len(q["queue_pending"]) == 1:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (q, proc.stdout.read() if proc.poll() else "")
            time.sleep(0.2)
        running, waiting = q["queue_running"][0][1], q["queue_pending"][0][1]
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, out
    assert "removed 1 waiting job(s)" in out and "interrupted job 1" in out, out
    # ComfyUI checks the interrupt between sampler steps only: a job still loading its model on a
    # busy 2-core CI machine stops once sampling starts, which took more than 30 s there once
    res = server.client.wait(running, timeout=180)
    assert res.error == "interrupted", (f"running {running}", res.status, res.error)
    q = server.client.get("/queue")
    assert q["queue_running"] == [] and q["queue_pending"] == [], (f"running {running}, waiting {waiting}", q, out)
    history = server.client.get(f"/history/{running}")[running]
    assert any(m[0] == "execution_interrupted" for m in history["status"]["messages"])
    assert server.client.get(f"/history/{waiting}") == {}, "the waiting job never ran"
    rows = read_csv(tmp_path / "manifest.csv")
    assert [(r["status"], r["error"]) for r in rows] == [("cancelled", "interrupted while running"),
                                                         ("cancelled", "removed from the queue")]
