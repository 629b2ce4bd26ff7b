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
from para_core.patterns import LIST_BUDGET_S, PATTERN_BUDGET_S, PatternError, compile_glob, compile_regex

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


# ------------------------------------------------------------------------- matching in bounded time

# Classic catastrophic-backtracking shapes, and a real custom_layers pattern that took 25 s in `re`
# (x4 per 2 more characters of the path).
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


def test_worst_case_patterns_over_a_whole_unet_stay_within_their_cpu_budget_in_a_subprocess():
    """Each pattern runs over ~1500 long paths; with backtracking (`re`) the first alone takes minutes.
    Measured in CPU seconds (what the patterns' budget counts; wall time on a busy machine includes
    waiting for a core), bounded at a few times PATTERN_BUDGET_S. A subprocess, so that a
    regression fails by timeout instead of hanging the test run."""
    code = textwrap.dedent(f"""
        import json, sys, time
        sys.path.insert(0, {str(PACK_ROOT)!r})
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_core_patterns import sd15_like_paths, WORST_PATTERNS
        from para_core import select_layers, PresetError
        paths = sd15_like_paths()
        times = {{}}
        for p in WORST_PATTERNS:
            t = time.process_time()
            try:
                select_layers(paths, p)
            except PresetError:
                pass
            times[p] = time.process_time() - t
        print(json.dumps(times))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = 4 * PATTERN_BUDGET_S
    slow = {p: t for p, t in times.items() if t > bound}
    assert not slow, f"patterns over {bound} CPU s on {len(sd15_like_paths())} paths: {slow}"


@pytest.mark.parametrize("pattern", [r"(a*)*b", r"(a|a)*b", r"(a|aa)+$b", r"((a*)*)*$x", r"(.*a){20}b"])
def test_matching_a_long_path_takes_bounded_time(pattern):
    """Backtracking patterns either answer or are refused (they spent their budget), within a few
    times the budget in CPU seconds (exponential backtracking on 20,000 characters would not end)."""
    m = compile_regex(pattern)
    t0 = time.process_time()
    try:
        assert m.fullmatch("a" * 20000) is False
    except PatternError as e:
        assert "takes too long" in str(e)
    assert time.process_time() - t0 < 4 * PATTERN_BUDGET_S


class CountingRegex:
    """A compiled regex that records the timeout of each fullmatch it is asked for."""

    def __init__(self, compiled):
        self.compiled, self.timeouts = compiled, []

    def fullmatch(self, path, timeout=None, **kw):
        self.timeouts.append(timeout)
        return self.compiled.fullmatch(path, timeout=timeout, **kw)


def test_a_pattern_that_spent_its_budget_stays_refused():
    m = compile_regex(r"(a|aa)+$b")
    with pytest.raises(PatternError, match="takes too long"):
        m.fullmatch("a" * 20000)
    m._re = spy = CountingRegex(m._re)
    with pytest.raises(PatternError, match="takes too long"):
        m.fullmatch("a" * 20000)
    assert spy.timeouts == []  # refused at once: the regex is not run again


def test_the_patterns_of_one_list_share_one_budget():
    from para_core.patterns import Budget
    slow = r"(?:[a-z._0-9]|[a-z])*[A-Z]"  # backtracks on a layer path, no shortcut for regex
    shared = Budget(PATTERN_BUDGET_S + 0.05)
    first, second = compile_regex(slow, shared), compile_regex(r"(?:[a-z_.0-9]|[a-z])*[A-Z]", shared)
    with pytest.raises(PatternError, match="takes too long"):
        first.fullmatch(f"{ATTN}.attn1.to_q")
    left = shared.left
    assert left < PATTERN_BUDGET_S
    second._re = spy = CountingRegex(second._re)
    with pytest.raises(PatternError, match="takes too long"):
        second.fullmatch(f"{ATTN}.attn1.to_q")
    assert spy.timeouts in ([], [left])  # what the first one left (none: refused), not a budget of its own


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
def test_patterns_too_large_to_compile_safely_are_refused_clearly(pattern, says, monkeypatch):
    """Refused by their size before any is compiled (compiling some would unroll them: seconds and
    hundreds of MB with the GIL held); the two that only compiling can refuse fail fast."""
    import para_core.patterns as patterns
    compiled, real = [], patterns.regex.compile
    monkeypatch.setattr(patterns.regex, "compile", lambda text, *a, **k: (compiled.append(text), real(text, *a, **k))[1])
    t0 = time.process_time()
    with pytest.raises(PresetError, match=says):
        select_layers(sd15_like_paths(1), pattern)
    if says in ("nests too deeply", "not a valid regular expression"):
        assert time.process_time() - t0 < 2.0
    else:
        assert compiled == []


def test_a_long_list_of_patterns_is_matched_within_its_budget():
    paths = sd15_like_paths()
    spec = ",".join([f"*blocks.{i}.1.transformer_blocks.{t}.attn1.to_q" for i in range(12) for t in range(10)] +
                    [f"re:.*_blocks\\.{i}\\.0\\.in_layers\\.2" for i in range(12)] + ["!*attn2*"] * 100)
    t0 = time.process_time()
    chosen = select_layers(paths, spec)  # raises when the list's budget (LIST_BUDGET_S CPU seconds) is spent
    assert time.process_time() - t0 < 5 * LIST_BUDGET_S
    assert len(chosen) == 2 * 12 * 10 + 2 * 12  # every attn1.to_q and in_layers.2 of both block stacks
    assert {p.split(".")[-1] for p in chosen} == {"to_q", "2"}
