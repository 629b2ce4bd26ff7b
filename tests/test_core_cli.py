"""The command line, ``python -m para_core`` (docs/spec.md section 4), on small synthetic files.

A few tests run the real ``python -m para_core`` in a subprocess (exit codes, stdout/stderr,
no traceback); the rest call ``cli.main`` in-process, which is the same code without the
interpreter start-up.
"""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from core_helpers import CKPT_LAYERS, PARA_LAYERS, REPO_ROOT, make_checkpoint, make_subject, save_subject
from para_core import ParaState, build_metadata, load_para, merge_states, save_para
from para_core.functional.projection import reduce_weight
from para_core.base_model import Checkpoint
from para_core.cli import main, parse_file_strength
from para_core.export import lora_keys

COMMANDS = ["inspect", "merge", "export-lora", "bake"]


def _make_files(tmp_path):
    """A tiny checkpoint, two subjects made against it (fingerprint recorded), an output folder."""
    ckpt = tmp_path / "tiny_sd15.safetensors"
    make_checkpoint(ckpt)
    fp = Checkpoint(ckpt).fingerprint(["diffusion_model." + l for l in PARA_LAYERS])
    a, b = tmp_path / "dog.safetensors", tmp_path / "cat.safetensors"
    save_subject(a, seed=1, base_fingerprint=fp)
    save_subject(b, seed=2, base_fingerprint=fp)
    out = tmp_path / "out"
    out.mkdir()
    return {"ckpt": ckpt, "a": a, "b": b, "out": out, "fingerprint": fp, "tmp": tmp_path}


@pytest.fixture
def files(tmp_path):
    return _make_files(tmp_path)


def _one_error_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and "Traceback" not in stderr
    return lines[0]


# ------------------------------------------------------------------------- the real entry point

@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Runs of the real ``python -m para_core`` from the pack's root, one per scenario, each with
    its own output folder. They start together: each pays the interpreter and torch start-up,
    which in parallel costs about one. Returns (files, {scenario: CompletedProcess}, {scenario: out dir})."""
    f = _make_files(tmp_path_factory.mktemp("cli"))
    bad = f["tmp"] / "sdxl_dog.safetensors"
    save_subject(bad, layers=["middle_block.0.emb_layers.1"], shapes={"middle_block.0.emb_layers.1": (1280, 64)})
    outs = {}

    def out(name, file):
        outs[name] = f["out"] / name
        outs[name].mkdir()
        return outs[name] / file

    scenarios = {
        "inspect": ["inspect", f["a"], "--base", f["ckpt"]],
        "merge": ["merge", "--mode", "union", f"{f['a']}:0.5", f["b"], "-o", out("merge", "merged.safetensors")],
        "export": ["export-lora", "--base", f["ckpt"], "--para", f["a"], "--strength", "0.7",
                   "-o", out("export", "dog_lora.safetensors")],
        "bake": ["bake", "--base", f["ckpt"], "--para", f["a"], "-o", out("bake", "baked.safetensors")],
        "misfit": ["bake", "--base", f["ckpt"], "--para", bad, "-o", out("misfit", "baked.safetensors")],
    }
    # Side by side, one thread each: several multi-threaded math libraries on few cores only spin.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = {name: subprocess.Popen([sys.executable, "-m", "para_core", *map(str, args)], cwd=REPO_ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in scenarios.items()}
    runs = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        runs[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return f, runs, outs


def test_python_m_para_core_inspect_with_base(cli):
    f, runs, _ = cli
    r = runs["inspect"]
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert "kind:       subject" in r.stdout
    assert "layers:     4" in r.stdout
    assert f"fingerprint: base {f['fingerprint']}" in r.stdout and "(matches)" in r.stdout
    assert "diffusion_model.middle_block.2.out_layers.3" in r.stdout
    assert '"trigger_words": "sks dog"' in r.stdout  # para.train decoded


def test_python_m_para_core_merge_writes_a_merged_file(cli):
    f, runs, outs = cli
    assert runs["merge"].returncode == 0, runs["merge"].stderr
    merged = load_para(outs["merge"] / "merged.safetensors")
    assert merged.kind == "merged" and merged.metadata["para.merge_mode"] == "union"
    expected = merge_states([load_para(f["a"]), load_para(f["b"])], [0.5, 1.0], "union")
    for layer, (U, V) in expected.factors().items():
        torch.testing.assert_close(merged.U[layer] @ merged.V[layer].t(), U @ V.t(), atol=1e-6, rtol=0)


def test_python_m_para_core_export_lora_reproduces_the_weights(cli):
    f, runs, outs = cli
    assert runs["export"].returncode == 0, runs["export"].stderr
    lora = load_file(str(outs["export"] / "dog_lora.safetensors"))
    state, ckpt = load_para(f["a"]), Checkpoint(f["ckpt"])
    for layer, (U, V) in state.factors().items():
        ku, kd, ka = lora_keys(layer)
        W0 = ckpt.weight(layer).float()
        k = lora[ku].shape[1]
        delta = (lora[ku].reshape(-1, k) @ lora[kd].reshape(k, -1)) * (lora[ka] / k)
        torch.testing.assert_close(W0 + delta.reshape(W0.shape), reduce_weight(W0, U, V, 0.7),
                                   atol=1e-5, rtol=0)


def test_python_m_para_core_bake_keeps_other_tensors_bit_identical(cli):
    f, runs, outs = cli
    assert runs["bake"].returncode == 0, runs["bake"].stderr
    before, after = load_file(str(f["ckpt"])), load_file(str(outs["bake"] / "baked.safetensors"))
    assert set(before) == set(after)
    factors = load_para(f["a"]).factors()
    for key, t in before.items():
        layer = key[len("model."):-len(".weight")] if key.startswith("model.") else None
        assert after[key].dtype == t.dtype
        if layer in factors:
            U, V = factors[layer]
            assert torch.equal(after[key], reduce_weight(t, U, V))
        else:
            assert torch.equal(after[key].view(torch.uint8), t.view(torch.uint8)), key


def test_python_m_para_core_error_is_one_line_and_leaves_no_file(cli):
    _, runs, outs = cli
    r = runs["misfit"]
    assert r.returncode == 1
    line = _one_error_line(r.stderr)
    assert "middle_block.0.emb_layers.1" in line and "sdxl_dog.safetensors" in line
    assert os.listdir(outs["misfit"]) == []


# ------------------------------------------------------------------------- help

@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_a_description_and_an_example(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert f"python -m para_core {command}" in text
    assert "example" in text and len(text.split("\n\n")[1]) > 40  # the description paragraph


def test_top_level_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(c in text for c in COMMANDS)


# ------------------------------------------------------------------------- FILE[:S]

@pytest.mark.parametrize("text, expected", [
    ("dog.safetensors", ("dog.safetensors", 1.0)),
    ("dog.safetensors:0.5", ("dog.safetensors", 0.5)),
    ("dog.safetensors:-1", ("dog.safetensors", -1.0)),
    (r"C:\models\para\dog.safetensors", (r"C:\models\para\dog.safetensors", 1.0)),
    (r"C:\models\para\dog.safetensors:2", (r"C:\models\para\dog.safetensors", 2.0)),
    ("my:dog.safetensors", ("my:dog.safetensors", 1.0)),
])
def test_strength_is_the_text_after_the_last_colon_when_it_is_a_number(text, expected):
    assert parse_file_strength(text) == expected


def test_non_finite_strength_is_an_error(files, capsys):
    out = files["out"] / "m.safetensors"
    assert main(["merge", "--mode", "sum", f"{files['a']}:nan", str(files["b"]), "-o", str(out)]) == 1
    assert "finite" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


# ------------------------------------------------------------------------- inspect

def test_inspect_without_base_says_lora_count_is_not_available(files, capsys):
    assert main(["inspect", str(files["a"])]) == 0
    text = capsys.readouterr().out
    assert "LoRA at the same rank: n/a (needs --base)" in text
    assert "parameters: " + f"{sum(CKPT_LAYERS[l][0] * 2 for l in PARA_LAYERS):,}" in text


def test_inspect_json_with_base_reports_ranks_energy_and_lora_count(files, capsys):
    assert main(["inspect", str(files["a"]), "--base", str(files["ckpt"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "subject" and data["base"]["fingerprint_matches"] is True
    assert data["base"]["family"] == "SD15" and data["base"]["layout"] == "checkpoint"
    lora = 0
    for entry in data["layers"]:
        shape = CKPT_LAYERS[entry["name"][len("diffusion_model."):]]
        inner = int(torch.tensor(shape[1:]).prod())
        lora += 2 * (shape[0] + inner)
        assert entry["rank"] == 2 and entry["base_shape"] == list(shape)
        # generic W0: rank(W') = min(rank W0, out - r) (the tall skip_connection keeps its rank)
        assert entry["rank_W"] == min(entry["rank_W0"], shape[0] - 2)
        assert 0 < entry["energy_removed"] < 1
    assert data["lora_equivalent_parameters"] == lora
    assert data["metadata"]["para.train"]["steps"] == 10


def test_inspect_energy_removed_is_the_frobenius_share(files, capsys):
    main(["inspect", str(files["a"]), "--base", str(files["ckpt"]), "--json"])
    entry = json.loads(capsys.readouterr().out)["layers"][0]
    layer = entry["name"]
    W0 = Checkpoint(files["ckpt"]).weight(layer).float()
    U, V = load_para(files["a"]).factors()[layer]
    W = reduce_weight(W0, U, V)
    assert entry["energy_removed"] == pytest.approx(float((W0 - W).pow(2).sum() / W0.pow(2).sum()), rel=1e-4)


def test_inspect_fingerprint_mismatch_is_a_warning_line(files, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    make_checkpoint(other, seed=5)
    assert main(["inspect", str(files["a"]), "--base", str(other)]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and files["fingerprint"] in lines[0]
    assert "(DIFFERS)" in captured.out


def test_inspect_of_a_merged_file_shows_the_mode(files, capsys):
    out = files["out"] / "m.safetensors"
    main(["merge", "--mode", "sequential", str(files["a"]), str(files["b"]), "-o", str(out)])
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "kind:       merged (merge mode sequential)" in capsys.readouterr().out


# ------------------------------------------------------------------------- export-lora

def test_export_lora_metadata_says_which_base_it_fits(files, capsys):
    out = files["out"] / "lora.safetensors"
    assert main(["export-lora", "--base", str(files["ckpt"]), "--para", str(files["a"]), "--dtype", "fp16",
                 "-o", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert md["ss_network_module"] == "networks.lora"
    assert md["ss_network_dim"] == "2" and md["ss_network_alpha"] == "2"
    assert md["para.exported_from"] == "dog.safetensors"
    assert md["para.base_fingerprint"] == files["fingerprint"]
    assert md["para.base_arch"] == "SD15"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert "only fits the base it was exported against" in md["para.note"]
    assert {"modelspec.sai_model_spec", "modelspec.implementation", "modelspec.title", "modelspec.date"} <= set(md)


def test_export_lora_of_a_misfitting_file_names_the_first_layer(files, capsys):
    bad = files["tmp"] / "bad.safetensors"
    save_subject(bad, layers=["middle_block.2.out_layers.3", "middle_block.0.emb_layers.1"],
                 shapes={"middle_block.2.out_layers.3": (32, 1), "middle_block.0.emb_layers.1": (1280, 1)})
    out = files["out"] / "lora.safetensors"
    assert main(["export-lora", "--base", str(files["ckpt"]), "--para", str(bad), "-o", str(out)]) == 1
    assert "middle_block.0.emb_layers.1 has 1280 output channels" in _one_error_line(capsys.readouterr().err)
    assert os.listdir(files["out"]) == []


def test_export_lora_warns_on_a_fingerprint_mismatch_and_still_exports(files, tmp_path, capsys):
    other = tmp_path / "finetune.safetensors"
    make_checkpoint(other, seed=9)
    out = files["out"] / "lora.safetensors"
    assert main(["export-lora", "--base", str(other), "--para", str(files["a"]), "-o", str(out)]) == 0
    assert capsys.readouterr().err.startswith("warning: ")
    assert out.exists()


# ------------------------------------------------------------------------- bake

def test_bake_with_two_files_and_strengths(files, capsys):
    out = files["out"] / "baked.safetensors"
    assert main(["bake", "--base", str(files["ckpt"]), "--para", f"{files['a']}:0.5", "--para", str(files["b"]),
                 "--mode", "sequential", "-o", str(out)]) == 0
    merged = merge_states([load_para(files["a"]), load_para(files["b"])], [0.5, 1.0], "sequential")
    layer = "diffusion_model." + PARA_LAYERS[0]
    U, V = merged.factors()[layer]
    W0 = Checkpoint(files["ckpt"]).weight(layer)
    torch.testing.assert_close(Checkpoint(out).weight(layer), reduce_weight(W0, U, V), atol=1e-6, rtol=0)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["para.baked"])["mode"] == "sequential"


def test_bake_a_diffusion_model_only_file(files, tmp_path, capsys):
    unet = tmp_path / "unet.safetensors"
    tensors = make_checkpoint(unet, layout="bare")
    out = files["out"] / "unet_baked.safetensors"
    assert main(["bake", "--base", str(unet), "--para", str(files["a"]), "-o", str(out)]) == 0
    assert set(load_file(str(out))) == set(tensors)


# ------------------------------------------------------------------------- errors

@pytest.mark.parametrize("argv", [
    ["inspect", "{tmp}/missing.safetensors"],
    ["inspect", "{a}", "--base", "{a}"],
    ["merge", "--mode", "sum", "{a}", "{tmp}/notes.txt", "-o", "{out}/m.safetensors"],
    ["export-lora", "--base", "{tmp}/notes.txt", "--para", "{a}", "-o", "{out}/l.safetensors"],
    ["bake", "--base", "{ckpt}", "--para", "{ckpt}", "-o", "{out}/b.safetensors"],
    ["bake", "--base", "{ckpt}", "--para", "{a}", "-o", "{ckpt}"],
    ["merge", "--mode", "sum", "{a}", "-o", "{out}"],
], ids=["missing-file", "para-as-base", "text-as-para", "text-as-base", "checkpoint-as-para", "overwrite-base",
        "output-is-a-folder"])
def test_errors_exit_1_with_one_line_and_no_output(files, argv, capsys):
    (files["tmp"] / "notes.txt").write_text("not a model\n" * 20)
    ckpt_bytes = files["ckpt"].read_bytes()
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    assert main(argv) == 1
    _one_error_line(capsys.readouterr().err)
    assert os.listdir(files["out"]) == []
    assert files["ckpt"].read_bytes() == ckpt_bytes


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["merge", "--mode", "average", "a", "-o", "b"],
                                  ["export-lora", "--base", "c", "--para", "p", "--strength", "inf", "-o", "o"]])
def test_usage_errors_exit_2_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------- start-up cost: a wrong path fails before torch is imported

@pytest.mark.parametrize("argv", [
    ["inspect", "{tmp}/missing.safetensors"],
    ["merge", "--mode", "sum", "{a}", "{tmp}/missing.safetensors:0.5", "-o", "{out}/m.safetensors"],
    ["export-lora", "--base", "{tmp}/missing.safetensors", "--para", "{a}", "-o", "{out}/l.safetensors"],
    ["bake", "--base", "{ckpt}", "--para", "{tmp}/missing.safetensors", "-o", "{out}/b.safetensors"],
], ids=["inspect", "merge", "export-lora", "bake"])
def test_a_wrong_path_fails_at_once_without_importing_torch(files, argv):
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code = f"import sys; from para_core.cli import main; rc = main({argv!r}); print(rc, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.stdout.split() == ["1", "False"], r.stdout + r.stderr
    line = _one_error_line(r.stderr)
    assert f"{files['tmp']}/missing.safetensors: no such file" in line
    assert "models/para" not in line, "an explicit path gets no advice about ComfyUI's folders"


def test_a_folder_given_as_a_file_is_named(files, capsys):
    assert main(["inspect", str(files["out"])]) == 1
    assert f"{files['out']}: is a folder" in _one_error_line(capsys.readouterr().err)


def _all_merge_modes():
    from para_core import cli, merge
    return sorted(set(cli.MERGE_MODES) | set(merge.MERGE_MODES))


@pytest.mark.parametrize("mode", _all_merge_modes())
def test_every_merge_mode_is_a_cli_choice_and_merges_as_the_library_does(files, mode):
    """The CLI keeps its own list of modes (importing para_core.merge would import torch): each
    mode of either list is accepted by ``merge --mode`` and gives what merge_states gives."""
    out = files["out"] / f"{mode}.safetensors"
    assert main(["merge", "--mode", mode, f"{files['a']}:0.5", str(files["b"]), "-o", str(out)]) == 0
    merged = load_para(out)
    assert merged.kind == "merged" and merged.metadata["para.merge_mode"] == mode
    expected = merge_states([load_para(files["a"]), load_para(files["b"])], [0.5, 1.0], mode)
    for layer, (U, V) in expected.factors().items():
        torch.testing.assert_close(merged.U[layer] @ merged.V[layer].t(), U @ V.t(), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------- signals, read-only outputs, odd names

def _big_checkpoint(path):
    """The tiny checkpoint plus 400 MB of other tensors: bake's save takes long enough to be
    stopped in the middle of writing."""
    from safetensors.torch import save_file
    tensors = {k: v for k, v in load_file(str(path)).items()}
    for i in range(4):
        tensors[f"first_stage_model.filler.{i}.weight"] = torch.zeros(25_000_000)
    save_file(tensors, str(path))


@pytest.mark.parametrize("sig, status, says", [("SIGTERM", -15, "terminated"), ("SIGINT", 1, "interrupted")])
def test_a_signal_during_bake_leaves_no_temporary_file(files, sig, status, says):
    import signal
    import time
    _big_checkpoint(files["ckpt"])
    out = files["out"] / "baked.safetensors"
    proc = subprocess.Popen([sys.executable, "-m", "para_core", "bake", "--base", str(files["ckpt"]), "--para",
                             str(files["a"]), "-o", str(out)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            # a suite started in the background ignores SIGINT, and a child inherits that
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".para-tmp") for p in files["out"].iterdir()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "bake never started writing"
            time.sleep(0.005)
        proc.send_signal(getattr(signal, sig))
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert os.listdir(files["out"]) == []
    assert proc.returncode == status, stderr
    assert says in _one_error_line(stderr)


@pytest.mark.parametrize("command", ["merge", "export-lora", "bake"])
def test_a_read_only_output_is_refused_and_kept(files, capsys, command):
    out = files["out"] / "keep.safetensors"
    out.write_bytes(b"the user's file")
    os.chmod(out, 0o444)
    argv = {"merge": ["merge", "--mode", "sum", str(files["a"]), str(files["b"]), "-o", str(out)],
            "export-lora": ["export-lora", "--base", str(files["ckpt"]), "--para", str(files["a"]), "-o", str(out)],
            "bake": ["bake", "--base", str(files["ckpt"]), "--para", str(files["a"]), "-o", str(out)]}[command]
    assert main(argv) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and "read-only" in line and "chmod u+w" in line
    assert out.read_bytes() == b"the user's file" and (out.stat().st_mode & 0o777) == 0o444
    assert sorted(os.listdir(files["out"])) == ["keep.safetensors"]
    os.chmod(out, 0o644)  # writable again: it is replaced as before
    assert main(argv) == 0
    assert out.read_bytes() != b"the user's file"


def test_control_characters_in_a_path_are_escaped_in_the_one_error_line(files, capsys):
    evil = str(files["out"] / "x\x1b[31mred\x07\rline.safetensors")
    assert main(["inspect", evil]) == 1
    err = capsys.readouterr().err
    line = _one_error_line(err)
    assert "\x1b" not in err and "\r" not in err and "\x07" not in err
    assert "x\\x1b[31mred\\x07 line.safetensors" in line  # escaped; a line break becomes a space


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_read_only_file_in_a_peft_output_folder_is_refused_before_any_work(files, capsys, name):
    out = files["out"] / "peft_out"
    out.mkdir()
    keep = out / name
    keep.write_bytes(b"the user's file")
    os.chmod(keep, 0o444)
    assert main(["export-lora", "--base", str(files["ckpt"]), "--para", str(files["a"]), "--format", "peft",
                 "-o", str(out)]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert str(keep) in line and "read-only" in line
    assert sorted(os.listdir(out)) == [name] and keep.read_bytes() == b"the user's file"


# ------------------------------------------------------------------------- permissions

def test_cli_outputs_get_the_umasks_permissions(tmp_path, umask_022):
    ckpt = tmp_path / "base.safetensors"
    make_checkpoint(ckpt)
    a = tmp_path / "a.safetensors"
    save_subject(a)
    outs = {"merge": tmp_path / "m.safetensors", "export": tmp_path / "l.safetensors", "bake": tmp_path / "b.safetensors"}
    assert main(["merge", "--mode", "sum", str(a), str(a), "-o", str(outs["merge"])]) == 0
    assert main(["export-lora", "--base", str(ckpt), "--para", str(a), "-o", str(outs["export"])]) == 0
    assert main(["bake", "--base", str(ckpt), "--para", str(a), "-o", str(outs["bake"])]) == 0
    assert {k: oct(stat.S_IMODE(p.stat().st_mode)) for k, p in outs.items()} == {k: "0o644" for k in outs}


# ------------------------------------------------------------------------- finite but huge factors

def huge_subject():
    st = make_subject()
    for l in st.B:
        st.B[l][0, 0] = 3e38  # finite: passes the NaN/Inf check on load
    return st


def huge_merged():
    st = make_subject()
    U = {l: torch.full((b.shape[0], 2), 3e38) for l, b in st.B.items()}
    return ParaState(kind="merged", U=U, V={l: u.clone() for l, u in U.items()},
                     metadata=build_metadata("merged", merge_mode="sum", base_arch="SD15"))


@pytest.mark.parametrize("make", [huge_subject, huge_merged], ids=["subject", "merged"])
def test_cli_export_and_bake_refuse_non_finite_results_and_write_nothing(tmp_path, capsys, make):
    ckpt = tmp_path / "base.safetensors"
    make_checkpoint(ckpt)
    f = tmp_path / "huge.safetensors"
    save_para(make(), str(f))
    load_para(f)  # the inputs alone look fine
    for args, out in ((["export-lora", "--base", str(ckpt), "--para", str(f)], "l.safetensors"),
                      (["bake", "--base", str(ckpt), "--para", str(f)], "b.safetensors")):
        assert main(args + ["-o", str(tmp_path / out)]) == 1
        err = capsys.readouterr().err
        assert "not finite" in err and "huge.safetensors" in err, err
        assert not (tmp_path / out).exists()
    assert sorted(os.listdir(tmp_path)) == ["base.safetensors", "huge.safetensors"]


def test_merge_of_huge_values_is_a_clear_error_not_a_linalg_error(tmp_path, capsys):
    a = tmp_path / "a.safetensors"
    save_para(huge_subject(), str(a))
    b = tmp_path / "b.safetensors"
    save_subject(b, seed=5)
    for mode in ("union", "sum", "sequential"):
        assert main(["merge", "--mode", mode, str(a), str(b), "-o", str(tmp_path / "m.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "LinAlgError" not in err and "unexpected" not in err and "a.safetensors" in err, err
        assert not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------------- metadata as stored

@pytest.mark.parametrize("depth", [600, 100000])
def test_inspect_shows_deeply_nested_metadata_as_stored(tmp_path, capsys, depth):
    st = make_subject()
    st.metadata["para.train"] = "[" * depth + "]" * depth
    p = tmp_path / "a.safetensors"
    save_para(st, str(p))
    assert main(["inspect", str(p)]) == 0
    assert main(["inspect", str(p), "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "para.train" in out.out
