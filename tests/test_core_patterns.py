"""Layer patterns (para_core/patterns.py, the custom_layers input): matching runs in bounded time
(no catastrophic backtracking: a CPU budget per pattern and per list), agrees with Python's re and
fnmatch, and patterns too large to compile safely are refused with a clear message. The server
side (a hostile pattern never stalls ComfyUI) is in test_server_layer_patterns.py."""
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from para_core import PresetError, select_layers
from para_core.patterns import PatternError, compile_glob, compile_regex

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
        from test_core_patterns import sd15_like_paths, WORST_PATTERNS
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
