"""Writing files (para_core/write.py): writers that share a folder (temporary names that always
fit, exclusive writes that never replace another writer's file, run numbers claimed by one process
only, two real processes racing), what a write killed midway leaves and the cleanup of it,
file permissions, and no non-finite tensor ever written."""
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core_helpers import KILL_MID_WRITE, REPO_ROOT, make_subject, save_subject
from para_core import ParaError, ParaState, load_para, save_para
from para_core import write as ff

EMOJI = "\U0001F600"


@pytest.mark.parametrize("stem", ["a", "dog", "x" * 40, "p" * 150, "p" * 236, EMOJI * 58, "é" * 110, EMOJI * 3 + "q" * 200])
def test_a_temporary_name_is_never_longer_than_the_final_one_or_than_64_bytes(tmp_path, stem):
    final = tmp_path / f"{stem}_00001_.safetensors"
    n = len(final.name.encode())
    tmp = os.path.basename(ff.temp_path_for(str(final)))
    assert len(tmp.encode()) <= max(n, ff.MIN_TEMP_NAME)
    assert tmp.startswith(".") and tmp.endswith(ff.TEMP_SUFFIX)
    tmp.encode("utf-8")  # never a cut character
    if n <= 255:  # every name the file system takes can be written
        ff.atomic_write(str(final), lambda p: open(p, "wb").write(b"x"))
        assert final.read_bytes() == b"x" and os.listdir(tmp_path) == [final.name]


def _write(path_text):
    return lambda tmp: open(tmp, "w").write(path_text)


def test_an_exclusive_write_takes_the_next_free_name_and_never_replaces(tmp_path):
    names = ff.numbered(lambda n: str(tmp_path / f"s_{n:05}_.safetensors"), 1, 5)
    (tmp_path / "s_00001_.safetensors").write_text("another writer's")
    got = ff.atomic_write(names, _write("mine"), exclusive=True)
    assert got == names[1]
    assert (tmp_path / "s_00001_.safetensors").read_text() == "another writer's"
    assert (tmp_path / "s_00002_.safetensors").read_text() == "mine"
    with pytest.raises(ff.NameTaken):
        ff.atomic_write(names[1], _write("again"), exclusive=True)
    assert (tmp_path / "s_00002_.safetensors").read_text() == "mine"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(ff.TEMP_SUFFIX)]


def test_save_para_exclusive_returns_the_name_it_claimed(tmp_path):
    st = ParaState(B={"diffusion_model.x": torch.randn(8, 2)})
    names = ff.numbered(lambda n: str(tmp_path / f"p_{n:05}_.safetensors"), 1)
    first = save_para(st, names, exclusive=True)
    second = save_para(st, names, exclusive=True)
    assert (first, second) == (names[0], names[1])
    assert torch.equal(load_para(second).B["diffusion_model.x"], st.B["diffusion_model.x"])


# A writer process: waits for the start signal, then saves ``count`` files under one prefix the
# way PaRa Save does (ComfyUI's counter from listing the folder, then an exclusive write), each
# marked with its writer and index; prints the names it got.
_WRITER = r"""
import os, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from para_core import ParaState, save_para
from para_core.write import numbered
folder, tag, count, go = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(count):
    used = [int(n.split("_")[1]) for n in os.listdir(folder) if n.startswith("race_") and n.endswith("_.safetensors")]
    start = max(used, default=0) + 1
    B = torch.full((4096, 64), float(i))
    B[0, 0] = float(ord(tag))
    got = save_para(ParaState(B={"diffusion_model.x": B}), numbered(lambda n: os.path.join(folder, f"race_{n:05}_.safetensors"), start), exclusive=True)
    print(os.path.basename(got), flush=True)
"""


def test_two_processes_saving_under_one_prefix_get_distinct_files(tmp_path):
    from core_helpers import REPO_ROOT
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(REPO_ROOT), str(tmp_path), tag, "15", str(go)],
                              stdout=subprocess.PIPE, text=True) for tag in "ab"]
    import time
    time.sleep(3)  # both have imported torch and wait
    go.write_text("")
    outs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    claimed = {name: (tag, i) for tag, names in zip("ab", outs) for i, name in enumerate(names)}
    assert len(claimed) == 30, "two saves got one name"
    for name, (tag, i) in claimed.items():
        B = load_para(tmp_path / name).B["diffusion_model.x"]
        assert (B[0, 0].item(), B[1, 1].item()) == (float(ord(tag)), float(i)), f"{name} was replaced"


def test_a_run_number_is_claimed_by_one_run_only(tmp_path):
    stem1, claim1 = ff.claim_run(str(tmp_path), "run", 1)
    stem2, claim2 = ff.claim_run(str(tmp_path), "run", 1)  # another run that listed the folder at once
    assert (os.path.basename(stem1), os.path.basename(stem2)) == ("run_00001", "run_00002")
    assert os.path.basename(claim1).startswith(".") and not claim1.endswith(".safetensors")
    (tmp_path / "run_00001_step000001.safetensors").write_bytes(b"x")
    ff.release_run(claim1)
    # run 1 finished: its files keep its number taken although its claim is gone
    stem3, claim3 = ff.claim_run(str(tmp_path), "run", 1)
    assert os.path.basename(stem3) == "run_00003"
    for c in (claim2, claim3):
        ff.release_run(c)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(ff.RUN_CLAIM_SUFFIX)]


def test_a_claim_whose_process_died_is_taken_over_and_cleaned_up(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    import socket
    dead = tmp_path / f".run_00001{ff.RUN_CLAIM_SUFFIX}"
    dead.write_text(f"{proc.pid} {socket.gethostname()}\n")
    other_host = tmp_path / f".run_00002{ff.RUN_CLAIM_SUFFIX}"
    other_host.write_text(f"{proc.pid} some-other-machine\n")  # its pid means nothing here: kept
    stem, claim = ff.claim_run(str(tmp_path), "run", 1)
    assert os.path.basename(stem) == "run_00001" and open(claim).read().split()[0] == str(os.getpid())
    ff.release_run(claim)
    dead.write_text(f"{proc.pid} {socket.gethostname()}\n")
    removed = ff.remove_stale_temp_files([str(tmp_path)])
    assert removed == [str(dead)] and other_host.exists()


def test_cleanup_keeps_the_state_of_a_long_named_checkpoint_being_written(tmp_path):
    """A trainer writes the .trainer.pt first, then the PaRa file (as a temporary file): the
    cleanup of another starting ComfyUI must see that, also when the temporary name is cut."""
    name = EMOJI * 52 + "_00001_step000002"
    state = tmp_path / f"{name}.trainer.pt"
    state.write_bytes(b"state")
    writing = ff.temp_path_for(str(tmp_path / f"{name}.safetensors"))
    open(writing, "wb").close()
    assert ff.remove_stale_temp_files([str(tmp_path)]) == []
    assert state.exists()


def test_metadata_too_large_for_a_safetensors_header_is_a_clear_error_and_writes_nothing(tmp_path):
    st = ParaState(B={"diffusion_model.x": torch.randn(8, 2)}, metadata={"para.train": "w" * 101_000_000})
    with pytest.raises(ff.ParaError, match=r"too large.*100 MB.*'para\.train'"):
        save_para(st, tmp_path / "big.safetensors")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------- a write killed midway

def comfy_lists(folder, exts=(".safetensors",)):
    """What ComfyUI's model lists show of ``folder``: its own extension filter (folder_paths'
    filter_files_extensions: os.path.splitext(name)[-1].lower() in the folder's extensions)."""
    return sorted(n for n in os.listdir(folder) if os.path.splitext(n)[-1].lower() in exts)


def test_temporary_names_are_not_listed_by_the_model_lists(tmp_path):
    tmp = ff.temp_path_for(tmp_path / "dog.safetensors")
    Path(tmp).write_bytes(b"partial")
    for exts in ({".safetensors"}, {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}):
        assert comfy_lists(tmp_path, exts) == []
    assert os.path.basename(tmp).startswith(".dog.safetensors.") and tmp.endswith(ff.TEMP_SUFFIX)


@pytest.mark.parametrize("name", ["dog.safetensors", "PaRa_00001_step000004.trainer.pt"])
def test_sigkill_mid_write_leaves_nothing_listed_and_the_next_start_removes_it(tmp_path, name):
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(REPO_ROOT), str(tmp_path), name],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].endswith(ff.TEMP_SUFFIX), left
    assert comfy_lists(tmp_path, {".safetensors", ".pt"}) == []
    removed = ff.remove_stale_temp_files([str(tmp_path)])
    assert [os.path.basename(p) for p in removed] == left and os.listdir(tmp_path) == []


def test_cleanup_keeps_a_live_writers_temp_file_and_every_real_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    live = Path(ff.temp_path_for(sub / "a.safetensors"))  # this process's pid: still writing
    live.write_bytes(b"x")
    old_style = tmp_path / ".tmp-abcd1234.safetensors"  # what earlier versions left (and listed)
    old_style.write_bytes(b"")
    keep = [tmp_path / "dog.safetensors", tmp_path / "dog.trainer.pt", sub / "run_00001_step000002.safetensors",
            sub / "run_00001_step000002.trainer.pt", tmp_path / "notes.tmp"]
    for p in keep:
        p.write_bytes(b"k")
    orphan = sub / "run_00001_step000004.trainer.pt"  # its PaRa file never got written
    orphan.write_bytes(b"o")
    being_written = sub / "run_00001_step000006.trainer.pt"  # its PaRa file is being written right now
    being_written.write_bytes(b"w")
    Path(ff.temp_path_for(sub / "run_00001_step000006.safetensors")).write_bytes(b"x")
    removed = sorted(ff.remove_stale_temp_files([str(tmp_path)]))
    assert removed == sorted([str(old_style), str(orphan)])
    assert live.exists() and being_written.exists() and all(p.exists() for p in keep)


# ------------------------------------------------------------------------- permissions

def test_para_files_get_the_umasks_permissions_not_0600(tmp_path, umask_022):
    path = tmp_path / "a.safetensors"
    save_subject(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o664)  # a replaced file keeps its mode, as with any other writer
    save_subject(path, seed=3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


# ------------------------------------------------------------------------- non-finite values

def test_saving_never_writes_a_non_finite_tensor(tmp_path):
    st = make_subject()
    for l in st.B:
        st.B[l][0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(ParaError, match="not finite"):
        save_para(st, str(tmp_path / "a.safetensors"), dtype=torch.float16)
    assert os.listdir(tmp_path) == []
