"""User-given layer patterns (``custom_layers``), matched in time linear in the path's length.

Python's ``re`` backtracks: ``(x+)+!`` on a path without ``!`` takes time exponential in the
path's length, holding the GIL the whole time, so one pattern typed into a node froze the whole
ComfyUI server. Here a pattern is parsed with Python's own regex parser, built into a Thompson
NFA (the automaton has at most ``MAX_STATES`` states), and run as a lazily built DFA: every
character of a path costs at most one pass over the NFA's states, whatever the pattern. Features
that are not regular (backreferences, lookarounds, atomic groups, possessive repeats, word
boundaries) are refused with a clear message instead.

Globs (``*`` matches across dots, ``?``, ``[...]``) are translated to the same regex syntax here,
not with ``fnmatch.translate`` (which emits lookaheads and atomic groups on some Pythons).
"""
from __future__ import annotations

from typing import Callable, Dict, FrozenSet, List, Optional, Tuple

try:  # Python >= 3.11
    import re._constants as _c
    import re._parser as _parser
except ImportError:  # pragma: no cover - Python <= 3.10
    import sre_constants as _c
    import sre_parse as _parser

__all__ = ["PatternError", "LinearPattern", "compile_regex", "compile_glob", "glob_to_regex",
           "MAX_PATTERN_LENGTH", "MAX_STATES"]

MAX_PATTERN_LENGTH = 1000
MAX_STATES = 5000
# Cached DFA transitions per pattern; past this the cache is dropped and rebuilt (memory bound).
_MAX_CACHE = 20000


class PatternError(ValueError):
    pass


# NFA nodes: ("char", test, next) | ("split", (a, b)) | ("assert", "start"/"end", next) | ("match",)
_Node = tuple


class _Builder:
    def __init__(self, text: str):
        self.text = text
        self.nodes: List[list] = []

    def new(self, *node) -> int:
        if len(self.nodes) >= MAX_STATES:
            raise PatternError(f"layer pattern {self.text!r} is too complex (its automaton would need more than "
                               f"{MAX_STATES} states, e.g. from large {{m,n}} repeats); simplify it.")
        self.nodes.append(list(node))
        return len(self.nodes) - 1

    # A fragment is (start, [dangling (node, slot) pairs to patch with the next start]).
    def patch(self, outs, target):
        for node, slot in outs:
            self.nodes[node][slot] = target

    def empty(self):
        n = self.new("split", None, None)  # epsilon: slot 2 unused
        self.nodes[n] = ["eps", None]
        return n, [(n, 1)]

    def seq(self, items, icase):
        frag = None
        for op, av in items:
            f = self.item(op, av, icase)
            if frag is None:
                frag = f
            else:
                self.patch(frag[1], f[0])
                frag = (frag[0], f[1])
        return frag if frag is not None else self.empty()

    def char(self, test):
        n = self.new("char", test, None)
        return n, [(n, 2)]

    def item(self, op, av, icase):
        name = str(op)
        if name == "LITERAL":
            return self.char(_literal(av, icase, False))
        if name == "NOT_LITERAL":
            return self.char(_literal(av, icase, True))
        if name == "ANY":
            return self.char(lambda ch: ch != "\n")
        if name == "IN":
            return self.char(_charset(av, icase, self.text))
        if name == "BRANCH":
            _, alternatives = av
            frags = [self.seq(alt, icase) for alt in alternatives]
            start = frags[-1][0]
            outs = list(frags[-1][1])
            for f in reversed(frags[:-1]):
                start = self.new("split", f[0], start)
                outs = f[1] + outs
            return start, outs
        if name == "SUBPATTERN":
            _group, add_flags, del_flags, sub = av
            if add_flags & _c.SRE_FLAG_IGNORECASE:
                icase = True
            if del_flags & _c.SRE_FLAG_IGNORECASE:
                icase = False
            return self.seq(sub, icase)
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            lo, hi, sub = av
            return self.repeat(lo, hi, sub, icase)
        if name == "AT":
            where = str(av)
            if where in ("AT_BEGINNING", "AT_BEGINNING_STRING"):
                n = self.new("assert", "start", None)
                return n, [(n, 2)]
            if where in ("AT_END", "AT_END_STRING"):
                n = self.new("assert", "end", None)
                return n, [(n, 2)]
            raise PatternError(f"layer pattern {self.text!r}: word boundaries (\\b, \\B) are not supported; "
                               "layer paths are matched as a whole, so leave them out.")
        if name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise PatternError(f"layer pattern {self.text!r}: backreferences are not supported (they can take "
                               "exponential time); write the text out instead.")
        if name in ("ASSERT", "ASSERT_NOT"):
            raise PatternError(f"layer pattern {self.text!r}: lookahead/lookbehind is not supported (it can take "
                               "exponential time); use a '!' exclusion pattern instead.")
        if name in ("ATOMIC_GROUP", "POSSESSIVE_REPEAT"):
            raise PatternError(f"layer pattern {self.text!r}: atomic groups and possessive repeats are not "
                               "supported; use a plain group (matching here never backtracks anyway).")
        raise PatternError(f"layer pattern {self.text!r}: {name.lower()} is not supported in layer patterns.")

    def repeat(self, lo, hi, sub, icase):
        unbounded = hi == _c.MAXREPEAT
        frag = None
        pieces = []
        for _ in range(lo):
            pieces.append(self.seq(sub, icase))
        if unbounded:
            body = self.seq(sub, icase)
            split = self.new("split", body[0], None)
            self.patch(body[1], split)
            pieces.append((split, [(split, 2)]))
        else:
            # (sub(sub(sub)?)?)? : each optional copy may stop the repeat
            optional = []
            for _ in range(hi - lo):
                body = self.seq(sub, icase)
                split = self.new("split", body[0], None)
                optional.append((split, body))
            for i, (split, body) in enumerate(optional):
                if i + 1 < len(optional):
                    self.patch(body[1], optional[i + 1][0])
            if optional:
                outs = [(s, 2) for s, _ in optional] + list(optional[-1][1][1])
                pieces.append((optional[0][0], outs))
        if not pieces:
            return self.empty()
        for p in pieces:
            if frag is None:
                frag = p
            else:
                self.patch(frag[1], p[0])
                frag = (frag[0], p[1])
        return frag


def _literal(code: int, icase: bool, negate: bool) -> Callable[[str], bool]:
    ch = chr(code)
    if icase:
        low = ch.lower()
        return (lambda c: c.lower() != low) if negate else (lambda c: c.lower() == low)
    return (lambda c: c != ch) if negate else (lambda c: c == ch)


_CATEGORIES = {
    "CATEGORY_DIGIT": str.isdigit, "CATEGORY_NOT_DIGIT": lambda c: not c.isdigit(),
    "CATEGORY_SPACE": str.isspace, "CATEGORY_NOT_SPACE": lambda c: not c.isspace(),
    "CATEGORY_WORD": lambda c: c.isalnum() or c == "_", "CATEGORY_NOT_WORD": lambda c: not (c.isalnum() or c == "_"),
}


def _charset(items, icase: bool, text: str) -> Callable[[str], bool]:
    negate = False
    tests: List[Callable[[str], bool]] = []
    for op, av in items:
        name = str(op)
        if name == "NEGATE":
            negate = True
        elif name == "LITERAL":
            tests.append(_literal(av, False, False))
        elif name == "RANGE":
            lo, hi = av
            tests.append(lambda c, lo=lo, hi=hi: lo <= ord(c) <= hi)
        elif name == "CATEGORY":
            fn = _CATEGORIES.get(str(av))
            if fn is None:
                raise PatternError(f"layer pattern {text!r}: character class {av} is not supported.")
            tests.append(fn)
        else:
            raise PatternError(f"layer pattern {text!r}: {name.lower()} inside [...] is not supported.")

    def test(c: str) -> bool:
        hit = any(t(c) for t in tests)
        if not hit and icase:
            hit = any(t(c.lower()) or t(c.upper()) for t in tests)
        return hit != negate

    return test


class LinearPattern:
    """``fullmatch(path)`` in O(len(path) * states) at worst, O(len(path)) once the DFA is warm."""

    def __init__(self, text: str, nodes: List[list], start: int):
        self.pattern = text
        self._nodes = nodes
        self._start = start
        self._cache: Dict[Tuple[FrozenSet[int], str, bool], FrozenSet[int]] = {}
        self._closures: Dict[Tuple[FrozenSet[int], bool, bool], FrozenSet[int]] = {}

    def _closure(self, states, at_start: bool, at_end: bool) -> FrozenSet[int]:
        key = (frozenset(states), at_start, at_end)
        hit = self._closures.get(key)
        if hit is not None:
            return hit
        seen = set()
        stack = list(states)
        out = set()
        nodes = self._nodes
        while stack:
            n = stack.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            node = nodes[n]
            kind = node[0]
            if kind == "split":
                stack.append(node[1])
                stack.append(node[2])
            elif kind == "eps":
                stack.append(node[1])
            elif kind == "assert":
                if (node[1] == "start" and at_start) or (node[1] == "end" and at_end):
                    stack.append(node[2])
            else:  # char or match
                out.add(n)
        result = frozenset(out)
        if len(self._closures) > _MAX_CACHE:
            self._closures.clear()
        self._closures[key] = result
        return result

    def fullmatch(self, path: str) -> bool:
        nodes = self._nodes
        n = len(path)
        current = self._closure((self._start,), True, n == 0)
        for i, ch in enumerate(path):
            if not current:
                return False
            at_end = i + 1 == n
            key = (current, ch, at_end)
            nxt = self._cache.get(key)
            if nxt is None:
                moved = [nodes[s][2] for s in current if nodes[s][0] == "char" and nodes[s][1](ch)]
                nxt = self._closure(moved, False, at_end)
                if len(self._cache) > _MAX_CACHE:
                    self._cache.clear()
                self._cache[key] = nxt
            current = nxt
        return any(nodes[s][0] == "match" for s in current)

    def __repr__(self) -> str:
        return f"LinearPattern({self.pattern!r})"


def compile_regex(text: str) -> LinearPattern:
    """A regex (Python syntax, regular features only) as a LinearPattern. Raises PatternError."""
    if len(text) > MAX_PATTERN_LENGTH:
        raise PatternError(f"layer pattern of {len(text)} characters is too long (at most {MAX_PATTERN_LENGTH}).")
    try:
        parsed = _parser.parse(text)
    except _c.error as e:
        raise PatternError(f"layer pattern {text!r} is not a valid regular expression: {e}") from None
    except RecursionError:
        raise PatternError(f"layer pattern {text!r} nests too deeply; simplify it.") from None
    flags = parsed.state.flags
    if flags & _c.SRE_FLAG_VERBOSE:
        raise PatternError(f"layer pattern {text!r}: the verbose flag (?x) is not supported.")
    b = _Builder(text)
    try:
        start, outs = b.seq(list(parsed), bool(flags & _c.SRE_FLAG_IGNORECASE))
    except RecursionError:
        raise PatternError(f"layer pattern {text!r} nests too deeply; simplify it.") from None
    match = b.new("match")
    b.patch(outs, match)
    return LinearPattern(text, b.nodes, start)


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
            out.append(_escape(c))
    return "".join(out)


def _escape(c: str) -> str:
    return "\\" + c if c in ".^$*+?{}[]\\|()" else c


def compile_glob(glob: str) -> LinearPattern:
    if len(glob) > MAX_PATTERN_LENGTH:
        raise PatternError(f"layer pattern of {len(glob)} characters is too long (at most {MAX_PATTERN_LENGTH}).")
    return compile_regex(glob_to_regex(glob))
