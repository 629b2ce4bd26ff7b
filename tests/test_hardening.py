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
from para_core import ParaError, ParaState, PresetError, build_metadata, load_para, save_para, select_layers
from para_core.fileformat import atomic_write
from para_core.patterns import compile_glob, compile_regex

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
def test_matching_time_grows_linearly_with_the_path(pattern):
    m = compile_regex(pattern)
    m.fullmatch("a" * 50)  # warm the lazily built automaton
    t0 = time.perf_counter()
    m.fullmatch("a" * 2000)
    short = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.fullmatch("a" * 20000)
    long = time.perf_counter() - t0
    assert long < 1.0 and long < 40 * short + 0.05, (short, long)


REGEXES = [r"a|b", r"(ab)*c", r"a{2,3}", r"x?y+z*", r"[^a-c]\d\w\s", r"(?i)ABC", r"a(?i:B)c", r"^abc$", r"",
           r"(a|ab)(c|bcd)(d*)", r"a{0}b", r"(a{1,2}){2}", r"[a-]x", r"\.", r".*attn[12]\.to_(q|k)", r"a*?b+?"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_the_linear_matcher_agrees_with_python_re(pattern):
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
    (r"re:(a)\1", "backreferences"),
    (r"re:(?=attn)attn1", "lookahead"),
    (r"re:(?>a+)b", "atomic"),
    (r"re:a++b", "possessive"),
    (r"re:\battn", "word boundaries"),
    (r"re:((a{40}){40}){40}", "too complex"),
    ("re:" + "a" * 2000, "too long"),
])
def test_patterns_that_cannot_be_matched_in_linear_time_are_refused_clearly(pattern, says):
    t0 = time.perf_counter()
    with pytest.raises(PresetError, match=says):
        select_layers(sd15_like_paths(1), pattern)
    assert time.perf_counter() - t0 < 1.0
