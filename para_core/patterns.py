"""User-given layer patterns (``custom_layers``), matched with bounded work.

Python's ``re`` backtracks: ``(x+)+!`` on a path without ``!`` takes time exponential in the
path's length, holding the GIL the whole time, so one pattern typed into a node froze the whole
ComfyUI server. Here patterns are compiled and matched by the maintained ``regex`` library (in
every ComfyUI environment through transformers): matching runs with ``concurrent=True`` (the GIL
is released, the server keeps answering) and under a CPU-time budget (``timeout=``) per pattern
and per list of patterns; a pattern that spends it is refused with a clear message. What a user
can hand over is bounded too: each pattern's length, the number and total size of the patterns,
and the product of the counted repeats ``{m,n}``, which ``regex`` unrolls when it compiles
(``(?:a{1000}){1000}`` takes a second and 270 MB, with the GIL held).

Globs (``*`` matches across dots, ``?``, ``[...]``) are translated to regex syntax here, not with
``fnmatch.translate`` (which emits lookaheads and atomic groups on some Pythons).
"""
from __future__ import annotations

import time
from typing import Iterable, List, Optional

import regex

__all__ = ["PatternError", "Budget", "LayerPattern", "compile_regex", "compile_glob", "glob_to_regex",
           "check_pattern_list", "MAX_PATTERN_LENGTH", "MAX_PATTERNS", "MAX_TOTAL_LENGTH", "MAX_REPEAT_PRODUCT",
           "PATTERN_BUDGET_S", "LIST_BUDGET_S"]

MAX_PATTERN_LENGTH = 1000
MAX_PATTERNS = 256
MAX_TOTAL_LENGTH = 20_000
MAX_REPEAT_PRODUCT = 10_000
# CPU seconds (what regex's timeout counts) one pattern may spend over all the paths of a model,
# and all the patterns of one list together; a real pattern needs milliseconds.
PATTERN_BUDGET_S = 0.25
LIST_BUDGET_S = 2.0


class PatternError(ValueError):
    pass


class Budget:
    """CPU seconds left for matching (shared by the patterns of one list)."""

    def __init__(self, seconds: float):
        self.left = float(seconds)


class LayerPattern:
    """A compiled pattern whose ``fullmatch(path)`` spends at most its budget, over all calls."""

    def __init__(self, text: str, compiled, budget: Optional[Budget] = None):
        self.pattern = text
        self._re = compiled
        self._budgets = [Budget(PATTERN_BUDGET_S)] + ([budget] if budget is not None else [])

    def fullmatch(self, path: str) -> bool:
        left = min(b.left for b in self._budgets)
        if left <= 0:
            raise self._too_slow()
        t0 = time.process_time()
        try:
            return self._re.fullmatch(path, timeout=left, concurrent=True) is not None
        except TimeoutError:
            raise self._too_slow() from None
        finally:
            spent = time.process_time() - t0
            for b in self._budgets:
                b.left -= spent

    def _too_slow(self) -> PatternError:
        return PatternError(f"layer pattern {self.pattern!r} takes too long to match the model's layer paths (it "
                            "backtracks); simplify it, e.g. without nested repeats like (a+)+.")

    def __repr__(self) -> str:
        return f"LayerPattern({self.pattern!r})"


def check_pattern_list(spec: str, items: Iterable[str]) -> List[str]:
    """The patterns of one ``custom_layers`` input, bounded in number and total size."""
    if len(spec) > MAX_TOTAL_LENGTH:
        raise PatternError(f"layer patterns of {len(spec)} characters in all are too long (at most {MAX_TOTAL_LENGTH}); "
                           "use fewer, more general patterns (globs like *attn1* or a 're:' regex).")
    items = list(items)
    if len(items) > MAX_PATTERNS:
        raise PatternError(f"{len(items)} layer patterns are too many (at most {MAX_PATTERNS}); use fewer, more "
                           "general patterns (globs like *attn1* or a 're:' regex).")
    return items


def _repeat_product(text: str) -> int:
    """The product of the counts of every ``{m}``, ``{m,}``, ``{m,n}``, ``{,n}`` in a pattern,
    outside character classes and escapes: an upper bound of how far compiling unrolls it."""
    product, i, n = 1, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a class: up to its closing ']' (a ']' right after '[' or '[^' is literal)
            j = i + 1
            if j < n and text[j] == "^":
                j += 1
            if j < n and text[j] == "]":
                j += 1
            while j < n and text[j] != "]":
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "{":
            j = text.find("}", i)
            body = text[i + 1:j] if j > i else ""
            lo, comma, hi = body.partition(",")
            if body and (lo.isdigit() or not lo) and (hi.isdigit() or not hi) and (lo or hi):
                product *= max(int(lo or 0), int(hi or 0), 1)
                i = j + 1
                continue
        i += 1
    return product


def _check_length(text: str) -> None:
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"layer pattern of {len(text)} characters is too long (at most {MAX_PATTERN_LENGTH}).")


def compile_regex(text: str, budget: Optional[Budget] = None) -> LayerPattern:
    """A regex (Python syntax, as the ``regex`` library reads it) as a LayerPattern. Raises PatternError."""
    _check_length(text)
    return _compile(text, text, budget)


def _compile(text: str, source: str, budget: Optional[Budget]) -> LayerPattern:
    if _repeat_product(text) > MAX_REPEAT_PRODUCT:
        raise PatternError(f"layer pattern {source!r} is too complex (its counted repeats {{m,n}} multiply to more than "
                           f"{MAX_REPEAT_PRODUCT}); simplify it.")
    try:
        compiled = regex.compile(text)
    except regex.error as e:
        raise PatternError(f"layer pattern {source!r} is not a valid regular expression: {e}") from None
    except (RecursionError, OverflowError, MemoryError):
        raise PatternError(f"layer pattern {source!r} nests too deeply or repeats too much; simplify it.") from None
    return LayerPattern(source, compiled, budget)


def glob_to_regex(glob: str) -> str:
    """``*`` -> ``.*`` (across dots), ``?`` -> ``.``, ``[seq]``/``[!seq]`` -> a class; the rest literal."""
    out, i, n = [], 0, len(glob)
    while i < n:
        c = glob[i]
        i += 1
        if c == "*":
            if not out or out[-1] != ".*":  # '**' is the same as '*'
                out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and glob[j] == "!":
                j += 1
            if j < n and glob[j] == "]":
                j += 1
            while j < n and glob[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
            else:
                body = glob[i:j]
                i = j + 1
                if body.startswith("!"):
                    body = "^" + body[1:]
                elif body.startswith("^"):
                    body = "\\" + body
                out.append("[" + body.replace("\\", "\\\\") + "]")
        else:
            out.append(regex.escape(c))
    return "".join(out)


def compile_glob(glob: str, budget: Optional[Budget] = None) -> LayerPattern:
    _check_length(glob)
    return _compile(glob_to_regex(glob), glob, budget)
