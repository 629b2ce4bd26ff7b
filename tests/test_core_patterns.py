"""Issue 13 (reliability and security), the parts that need no ComfyUI: layer patterns that could
freeze the server, temporary files, permissions, non-finite results, hostile files and trainer
states. The ComfyUI side is in test_hardening_nodes.py and test_hardening_server.py."""
import json
import os
import re
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import para_core
import para_core.read as read
import para_core.write as write
from para_core import ParaError, ParaState, PresetError, build_metadata, load_para, save_para, select_layers


from para_core.patterns import PatternError, compile_glob, compile_regex  # noqa: E402
PACK_ROOT = Path(__file__).resolve().parent.parent
ATTN = "input_blocks.1.1.transformer_blocks.0"


def sd15_like_paths(n_blocks=12):
    """About 700 module paths shaped like an SDXL/SD1.5 UNet's (long, dotted, digits)."""
    out = {}
    for i in range(n_blocks):
        for blk in ("input_blocks", "output_blocks"):
            for t in range(10):
                base = f"{blk}.{i}.1.transformer_blocks.{t}"
                for leaf in ("attn1.to_q", "attn1.to_k", "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj"):
                    out[f"diffusion_model.{base}.{leaf}"] = (640, 640)
            out[f"diffusion_model.{blk}.{i}.0.in_layers.2"] = (320, 320, 3, 3)
    return out


# ------------------------------------------------------------------------- 2. patterns in linear time

# Classic catastrophic-backtracking shapes, and the one from the issue (25 s in `re`, x4 per 2 chars).
WORST_PATTERNS = [
    r"re:input_blocks\.1\.1\.transfor([a-z_.0-9]+)+!",
    r"re:([a-z_.0-9]+)+!",
    r"re:(.*)*x!",
    r"re:(\w|\.|\d)+!",
    r"re:(.*\.)*.*!",
    r"re:((a|[a-z])*)*!",
    r"re:(.*.*.*.*.*.*.*.*.*.*)+!",
    r"re:(.*a){12}!",
    "*.*.*.*.*.*.*.*.*.*.*!",
    r"re:([a-z]+\.?)+\d{3}!",
]


def test_worst_case_patterns_match_a_whole_unet_in_well_under_a_second_in_a_subprocess():
    """Each pattern runs over ~1500 long paths; with backtracking (`re`) the first alone takes minutes.
    A subprocess, so that a regression fails by timeout instead of hanging the test run."""
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(PACK_ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_hardening import sd15_like_paths, WORST_PATTERNS
        from para_core import select_layers, PresetError
        paths = sd15_like_paths()
        times = {{}}
        for p in WORST_PATTERNS:
            t = time.perf_counter()
            try:
                select_layers(paths, p)
            except PresetError:
                pass
            times[p] = time.perf_counter() - t
        print(json.dumps(times))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    slow = {p: t for p, t in times.items() if t > 0.5}
    assert not slow, f"patterns slower than 0.5 s over {len(sd15_like_paths())} paths: {slow}"


@pytest.mark.parametrize("pattern", [r"(a*)*b", r"(a|a)*b", r"(a|aa)+$b", r"((a*)*)*$x", r"(.*a){20}b"])
def test_matching_a_long_path_takes_bounded_time(pattern):
    """Backtracking patterns either answer or are refused (they spent their budget), within a second."""
    m = compile_regex(pattern)
    t0 = time.perf_counter()
    try:
        assert m.fullmatch("a" * 20000) is False
    except PatternError as e:
        assert "takes too long" in str(e)
    assert time.perf_counter() - t0 < 1.0


def test_a_pattern_that_spent_its_budget_stays_refused():
    m = compile_regex(r"(a|aa)+$b")
    with pytest.raises(PatternError, match="takes too long"):
        m.fullmatch("a" * 20000)
    t0 = time.perf_counter()
    with pytest.raises(PatternError, match="takes too long"):
        m.fullmatch("a" * 20000)
    assert time.perf_counter() - t0 < 0.1


def test_the_patterns_of_one_list_share_one_budget():
    from para_core.patterns import PATTERN_BUDGET_S, Budget
    slow = r"(?:[a-z._0-9]|[a-z])*[A-Z]"  # backtracks on a layer path, no shortcut for regex
    shared = Budget(PATTERN_BUDGET_S + 0.05)
    first, second = compile_regex(slow, shared), compile_regex(r"(?:[a-z_.0-9]|[a-z])*[A-Z]", shared)
    with pytest.raises(PatternError, match="takes too long"):
        first.fullmatch(f"{ATTN}.attn1.to_q")
    t0 = time.process_time()
    with pytest.raises(PatternError, match="takes too long"):
        second.fullmatch(f"{ATTN}.attn1.to_q")
    assert time.process_time() - t0 < 0.2  # what the first one left, not a budget of its own


REGEXES = [r"a|b", r"(ab)*c", r"a{2,3}", r"x?y+z*", r"[^a-c]\d\w\s", r"(?i)ABC", r"a(?i:B)c", r"^abc$", r"",
           r"(a|ab)(c|bcd)(d*)", r"a{0}b", r"(a{1,2}){2}", r"[a-]x", r"\.", r".*attn[12]\.to_(q|k)", r"a*?b+?",
           r"(a)\1", r"(?=a)ab", r"(?!a).b", r"(?>a+)b", r"a++b", r"\bab", r"(?x) a b  # c"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_the_bounded_matcher_agrees_with_python_re(pattern):
    import random
    rnd = random.Random(0)
    words = ["", "a", "ab", "abc", "aab", "abcdd", "xyyz", "d1_ ", "ABC", "aBc", "abbcd", "aaaa", "-x", ".",
             "input.attn1.to_q", "input.attn2.to_v"]
    words += ["".join(rnd.choice("abcdxyz1 .") for _ in range(rnd.randint(0, 7))) for _ in range(300)]
    m = compile_regex(pattern)
    for w in words:
        assert m.fullmatch(w) == bool(re.fullmatch(pattern, w)), (pattern, w)


def test_globs_match_like_fnmatch_across_dots():
    import fnmatch
    for g in ["*attn1*", "a?c", "[!a]b", "[ab]*", "x[", "*.to_q", "**q"]:
        m = compile_glob(g)
        for w in ["", "a", "abc", "1b", "x[", "zz.to_q", "bb", f"{ATTN}.attn1.to_q"]:
            assert m.fullmatch(w) == bool(re.fullmatch(fnmatch.translate(g), w)), (g, w)


@pytest.mark.parametrize("pattern, says", [
    (r"re:((a{40}){40}){40}", "too complex"),
    (r"re:(?:a{1000}){1000}", "too complex"),  # regex would unroll it: 1 s and 270 MB with the GIL held
    ("re:" + "a" * 2000, "too long"),
    ("re:" + "(?:" * 200 + "a" + ")" * 200, "nests too deeply"),
    (r"re:(a", "not a valid regular expression"),
    (",".join(f"*attn{i}*" for i in range(300)), "too many"),
    (",".join(["*" + "x" * 900] * 30), "characters in all are too long"),
])
def test_patterns_too_large_to_compile_safely_are_refused_clearly(pattern, says):
    t0 = time.perf_counter()
    with pytest.raises(PresetError, match=says):
        select_layers(sd15_like_paths(1), pattern)
    assert time.perf_counter() - t0 < 1.0


def test_a_long_list_of_patterns_is_matched_within_its_budget():
    paths = sd15_like_paths()
    spec = ",".join([f"*blocks.{i}.1.transformer_blocks.{t}.attn1.to_q" for i in range(12) for t in range(10)] +
                    [f"re:.*_blocks\\.{i}\\.0\\.in_layers\\.2" for i in range(12)] + ["!*attn2*"] * 100)
    t0 = time.perf_counter()
    chosen = select_layers(paths, spec)
    assert time.perf_counter() - t0 < 5.0
    assert len(chosen) == 2 * 12 * 10 + 2 * 12  # every attn1.to_q and in_layers.2 of both block stacks
    assert {p.split(".")[-1] for p in chosen} == {"to_q", "2"}


# ------------------------------------------------------------------------- 3. temporary files

from core_helpers import CKPT_LAYERS, PARA_LAYERS, make_checkpoint, make_subject, save_subject  # noqa: E402
from para_core.cli import main as cli_main  # noqa: E402
TEMP_SUFFIX = ".para-tmp"


def comfy_lists(folder, exts=(".safetensors",)):
    """What ComfyUI's model lists show of ``folder``: its own extension filter (folder_paths'
    filter_files_extensions: os.path.splitext(name)[-1].lower() in the folder's extensions)."""
    return sorted(n for n in os.listdir(folder) if os.path.splitext(n)[-1].lower() in exts)


def test_temporary_names_are_not_listed_by_the_model_lists(tmp_path):
    tmp = write.temp_path_for(tmp_path / "dog.safetensors")
    Path(tmp).write_bytes(b"partial")
    for exts in ({".safetensors"}, {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}):
        assert comfy_lists(tmp_path, exts) == []
    assert os.path.basename(tmp).startswith(".dog.safetensors.") and tmp.endswith(TEMP_SUFFIX)


_KILL_MID_WRITE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, sys.argv[1])
    import torch
    from para_core.write import atomic_write
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
        print("writing", flush=True)
        time.sleep(60)
    atomic_write(os.path.join(sys.argv[2], sys.argv[3]), write)
""")


@pytest.mark.parametrize("name", ["dog.safetensors", "PaRa_00001_step000004.trainer.pt"])
def test_sigkill_mid_write_leaves_nothing_listed_and_the_next_start_removes_it(tmp_path, name):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_MID_WRITE, str(PACK_ROOT), str(tmp_path), name],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].endswith(TEMP_SUFFIX), left
    assert comfy_lists(tmp_path, {".safetensors", ".pt"}) == []
    removed = write.remove_stale_temp_files([str(tmp_path)])
    assert [os.path.basename(p) for p in removed] == left and os.listdir(tmp_path) == []


def test_cleanup_keeps_a_live_writers_temp_file_and_every_real_file(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    live = Path(write.temp_path_for(sub / "a.safetensors"))  # this process's pid: still writing
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
    Path(write.temp_path_for(sub / "run_00001_step000006.safetensors")).write_bytes(b"x")
    removed = sorted(write.remove_stale_temp_files([str(tmp_path)]))
    assert removed == sorted([str(old_style), str(orphan)])
    assert live.exists() and being_written.exists() and all(p.exists() for p in keep)


# ------------------------------------------------------------------------- 8. permissions

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_para_files_get_the_umasks_permissions_not_0600(tmp_path, umask_022):
    path = tmp_path / "a.safetensors"
    save_subject(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o664)  # a replaced file keeps its mode, as with any other writer
    save_subject(path, seed=3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


def test_cli_outputs_get_the_umasks_permissions(tmp_path, umask_022):
    ckpt = tmp_path / "base.safetensors"
    make_checkpoint(ckpt)
    a = tmp_path / "a.safetensors"
    save_subject(a)
    outs = {"merge": tmp_path / "m.safetensors", "export": tmp_path / "l.safetensors", "bake": tmp_path / "b.safetensors"}
    assert cli_main(["merge", "--mode", "sum", str(a), str(a), "-o", str(outs["merge"])]) == 0
    assert cli_main(["export-lora", "--base", str(ckpt), "--para", str(a), "-o", str(outs["export"])]) == 0
    assert cli_main(["bake", "--base", str(ckpt), "--para", str(a), "-o", str(outs["bake"])]) == 0
    assert {k: oct(stat.S_IMODE(p.stat().st_mode)) for k, p in outs.items()} == {k: "0o644" for k in outs}


def test_trainer_state_gets_the_umasks_permissions(tmp_path, umask_022):
    from para_core.trainer_state import save_trainer_state
    p = tmp_path / "x.trainer.pt"
    save_trainer_state({"step": 1, "layers": ["a"]}, str(p))
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


# ------------------------------------------------------------------------- 4. finite but huge factors

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
        assert cli_main(args + ["-o", str(tmp_path / out)]) == 1
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
        assert cli_main(["merge", "--mode", mode, str(a), str(b), "-o", str(tmp_path / "m.safetensors")]) == 1
        err = capsys.readouterr().err
        assert "LinAlgError" not in err and "unexpected" not in err and "a.safetensors" in err, err
        assert not (tmp_path / "m.safetensors").exists()


def test_saving_never_writes_a_non_finite_tensor(tmp_path):
    st = make_subject()
    for l in st.B:
        st.B[l][0, 0] = 1e6  # finite in fp32, inf in fp16
    with pytest.raises(ParaError, match="not finite"):
        save_para(st, str(tmp_path / "a.safetensors"), dtype=torch.float16)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------- 7. raw errors

def write_header(path, header: bytes):
    path.write_bytes(struct.pack("<Q", len(header)) + header)


@pytest.mark.parametrize("header", [b"[" * 100000 + b"]" * 100000, b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"],
                         ids=["top-level", "inside-an-entry"])
def test_deeply_nested_header_is_a_clear_error(tmp_path, header):
    p = tmp_path / "deep.safetensors"
    write_header(p, header)
    with pytest.raises(ParaError, match="deep.safetensors: not a safetensors file"):
        load_para(p)


@pytest.mark.parametrize("depth", [600, 100000])
def test_inspect_shows_deeply_nested_metadata_as_stored(tmp_path, capsys, depth):
    st = make_subject()
    st.metadata["para.train"] = "[" * depth + "]" * depth
    p = tmp_path / "a.safetensors"
    save_para(st, str(p))
    assert cli_main(["inspect", str(p)]) == 0
    assert cli_main(["inspect", str(p), "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and "para.train" in out.out


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


# ------------------------------------------------------------------------- 1. one validation for every load path

@pytest.mark.parametrize("tensors, says", [
    ({"para_B": torch.tensor([[1.0, float("nan")]])}, "NaN or Inf"),
    ({"para_U": torch.ones(4, 2)}, "para_U but no para_V"),
    ({"para_V": torch.ones(4, 2)}, "para_V but no para_U"),
    ({"para_B": torch.ones(4, 2, 1)}, r"shape \(4, 2, 1\)"),
    ({"para_B": torch.tensor(1.0)}, r"shape \(\)"),
    ({"para_B": torch.ones(4, 2, dtype=torch.int32)}, "dtype"),
    ({"para_U": torch.ones(4, 2), "para_V": torch.ones(4, 3)}, "differ in shape"),
])
def test_layer_checks_shared_by_para_load_and_stock_load_lora(tmp_path, tensors, says):
    with pytest.raises(ParaError, match=says):
        read.check_layer_tensors("f.safetensors", "diffusion_model.x", tensors)
    from safetensors.torch import save_file
    p = tmp_path / "f.safetensors"
    save_file({f"diffusion_model.x.{k}": v for k, v in tensors.items()}, str(p))
    with pytest.raises(ParaError, match=says):
        load_para(p)


# ------------------------------------------------------------------------- stored dtypes

def _factors(kind, dtype, out=16, inner=24, rank=2):
    g = torch.Generator().manual_seed(0)
    names = {"subject": ("para_B",), "merged": ("para_U", "para_V"), "reference": ("para_U", "para_D")}[kind]
    shapes = {"para_B": (out, rank), "para_U": (out, rank), "para_V": (out, rank), "para_D": (rank, inner)}
    return {f"diffusion_model.x.{n}": (torch.randn(*shapes[n], generator=g) * 0.5).to(dtype) for n in names}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("kind", ["subject", "merged", "reference"])
def test_float8_factors_are_read_exactly_in_float32(tmp_path, capsys, kind, dtype):
    from safetensors.torch import save_file
    tensors = _factors(kind, dtype)
    path = tmp_path / f"{kind}_fp8.safetensors"
    save_file(tensors, str(path), metadata={"para.kind": kind})
    st = load_para(path)
    assert st.kind == kind
    for key, t in tensors.items():
        layer, name = key.rsplit(".", 1)
        got = st.tensors(layer)[name]
        assert got.dtype == torch.float32 and torch.equal(got, t.float())
    assert cli_main(["inspect", str(path)]) == 0, capsys.readouterr().err


def test_float4_factors_are_refused_with_what_to_do(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "f4.safetensors"
    save_file({"diffusion_model.x.para_B": torch.zeros(16, 1, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}, str(path))
    with pytest.raises(ParaError, match="para_B is stored as float4_e2m1fn_x2, a packed format.*fp32, fp16 or bf16"):
        load_para(path)
    with pytest.raises(ParaError, match="packed format"):
        read.check_layer_tensors("f4.safetensors", "diffusion_model.x",
                                 {"para_B": torch.zeros(16, 1, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)})
