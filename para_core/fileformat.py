"""The PaRa file (spec section 2): safetensors with ``<layer>.para_B`` (subject),
``<layer>.para_U`` + ``<layer>.para_V`` (merged) or ``<layer>.para_U`` + ``<layer>.para_D``
(reference, spec section 1b), ``para.*`` and ``modelspec.*`` metadata.

``ParaState`` is the in-memory form shared by the CLI and the nodes (the ``PARA`` socket).
Layer names are ComfyUI module paths with the ``diffusion_model.`` prefix.
"""
from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import stat
import struct
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .reduction import basis_batched

__all__ = [
    "ParaError",
    "ParaState",
    "FORMAT_VERSION",
    "load_para",
    "save_para",
    "atomic_save_safetensors",
    "atomic_write",
    "fingerprint",
    "build_metadata",
    "check_fits",
    "FingerprintWarning",
]

FORMAT_VERSION = "1"
PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
SUFFIXES = (".para_B", ".para_U", ".para_V", ".para_D")
_LORA_MARKERS = (".lora_up.", ".lora_down.", ".lora_A.", ".lora_B.", "_lora.up.", ".hada_w1_a", ".lokr_w1", ".oft_blocks", ".lora_B", ".lora_A")

ARCHITECTURES = {
    "SD15": "stable-diffusion-v1",
    "SD20": "stable-diffusion-v2",
    "SD21UnclipL": "stable-diffusion-v2",
    "SDXL": "stable-diffusion-xl-v1-base",
    "SDXLRefiner": "stable-diffusion-xl-v1-refiner",
    "SD3": "stable-diffusion-v3",
    "SD35": "stable-diffusion-v3.5",
    "Flux": "flux-1-dev",
    "FluxSchnell": "flux-1-schnell",
    "Flux2": "flux-2",
    "Chroma": "chroma",
    "Lumina2": "lumina-2",
    "ZImage": "z-image",
    "QwenImage": "qwen-image",
    "HiDream": "hidream-i1",
}


def printable(text) -> str:
    """``text`` with every control or other non-printable character written as its escape
    (``\\x1b``, ``\\n``, ``\\ud800``), for logs and terminals: a name holding ANSI escapes or line
    breaks cannot recolour the console or forge a log line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


class ParaError(ValueError):
    """A user-facing error: says what is wrong, where, and what to do. ComfyUI logs the message:
    names in it (a file, a prefix) come from users, so it is kept printable."""

    def __init__(self, message="", *args):
        super().__init__(printable(message), *args)


class FingerprintWarning(UserWarning):
    pass


@dataclass
class ParaState:
    """One PaRa adapter in memory.

    ``kind == "subject"``: ``B[layer]`` of shape (out, r), Q = QR(B).
    ``kind == "merged"``: ``U[layer]``, ``V[layer]`` of shape (out, k), W' = W0 - U V^T W0.
    ``kind == "reference"``: ``U[layer]`` (out, r) and ``D[layer]`` (r, in*kh*kw), W' = W0 - U D
    (the reference code's parametrization, reference.py); it has no (U, V) form without W0.
    """

    kind: str = "subject"
    B: Dict[str, torch.Tensor] = field(default_factory=dict)
    U: Dict[str, torch.Tensor] = field(default_factory=dict)
    V: Dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None
    D: Dict[str, torch.Tensor] = field(default_factory=dict)
    _factors: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = field(default=None, repr=False, compare=False)

    @property
    def layers(self) -> List[str]:
        return list(self.B if self.kind == "subject" else self.U)

    @property
    def name(self) -> str:
        return os.path.basename(self.source) if self.source else self.metadata.get("modelspec.title", "PaRa adapter")

    def rank(self, layer: str) -> int:
        t = self.B[layer] if self.kind == "subject" else self.U[layer]
        return int(t.shape[1])

    def ranks(self) -> Dict[str, int]:
        return {l: self.rank(l) for l in self.layers}

    def num_params(self) -> int:
        if self.kind == "subject":
            return sum(t.numel() for t in self.B.values())
        if self.kind == "reference":
            return sum(t.numel() for t in self.U.values()) + sum(t.numel() for t in self.D.values())
        return sum(t.numel() for t in self.U.values()) + sum(t.numel() for t in self.V.values())

    def out_dim(self, layer: str) -> int:
        t = self.B[layer] if self.kind == "subject" else self.U[layer]
        return int(t.shape[0])

    def factors(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (U, V)} in float32; a subject gives (Q, Q) from one batched QR per shape."""
        if self.kind == "reference":
            raise ParaError(f"{self.name} is a reference-parametrization adapter (W0 - U D): it has no general "
                            "(U, V) form; use para_core.reference for it.")
        if self._factors is None:
            if self.kind == "subject":
                Q = basis_batched(self.B)
                self._factors = {l: (Q[l], Q[l]) for l in self.B}
            else:
                self._factors = {l: (self.U[l].float(), self.V[l].float()) for l in self.U}
        return self._factors

    def renamed(self, mapping: Mapping[str, str]) -> "ParaState":
        """A copy with layers renamed (used to resolve kohya-style names)."""
        ren = lambda d: {mapping.get(k, k): v for k, v in d.items()}
        return ParaState(self.kind, ren(self.B), ren(self.U), ren(self.V), dict(self.metadata), self.source,
                         D=ren(self.D))


# ---------------------------------------------------------------- writing

# Temporary files end in ".para-tmp" and start with a dot: ComfyUI's model lists filter by
# extension (folder_paths.filter_files_extensions), so a leftover of a crash is never listed, and
# remove_stale_temp_files() finds exactly ours. The writer's pid is in the name so that a cleanup
# never removes a file another live process is still writing.
TEMP_SUFFIX = ".para-tmp"
_TEMP_NAME = re.compile(r"^\..+\.(\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
# What earlier versions of this pack left behind (tempfile.mkstemp names, listed by ComfyUI).
_OLD_TEMP_NAME = re.compile(r"^\.tmp-[a-z0-9_]{8}(?:\.safetensors|\.trainer\.pt)$")


# A temporary name is ".<stem>.<pid>-<8 hex>.para-tmp": this many bytes besides the stem (a pid
# has at most 7 digits on Linux). It is never longer than the final name, or than MIN_TEMP_NAME
# bytes for short names: a name the file system takes always has a temporary name it takes.
_TEMP_OVERHEAD = len("." + "." + "1234567" + "-" + "0" * 8 + TEMP_SUFFIX)
MIN_TEMP_NAME = 64


def _temp_stem(name: str) -> str:
    """The part of a final file name its temporary name keeps (cut in bytes, at a character)."""
    raw = name.encode("utf-8", "surrogateescape")
    budget = max(len(raw), MIN_TEMP_NAME) - _TEMP_OVERHEAD
    if len(raw) <= budget:
        return name
    return raw[:max(budget, 1)].decode("utf-8", "ignore") or "x"


def temp_path_for(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f".{_temp_stem(name)}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def check_replaceable(path: str) -> None:
    """Writing over ``path`` replaces it (the write goes to a temporary file that is then renamed
    onto it). A file that exists and is read-only (no write permission bit, e.g. 0444, or one this
    user may not write) is refused instead: read-only is how a user says "keep this", and the
    rename would otherwise replace it silently (renaming needs only the folder's permission)."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        return
    if not st.st_mode & 0o222 or not os.access(path, os.W_OK):
        raise ParaError(f"{path}: the file exists and is read-only (mode {stat.S_IMODE(st.st_mode):04o}), so it was not "
                        f"replaced. Make it writable (chmod u+w) or delete it to write over it, or choose another "
                        "output path.")


class NameTaken(FileExistsError):
    """The final name of an exclusive write exists (another writer claimed it)."""


def _claim_name(tmp: str, path: str) -> None:
    """Give the finished file ``tmp`` the name ``path`` only if no file has it: a hard link fails
    when the name exists, so two writers can never both get a name, and nothing is replaced.
    On file systems without hard links the name is first created with O_EXCL (empty for a
    moment), then the file is renamed onto it. Raises NameTaken."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise NameTaken(path) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK, errno.EXDEV):
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            raise NameTaken(path) from None
        os.replace(tmp, path)
        return
    try:
        os.unlink(tmp)  # the file has its name: a leftover link is removed at the next start
    except OSError:
        pass


def atomic_write(path, write: Callable[[str], None], suffix: str = "", exclusive: bool = False) -> str:
    """Call ``write(tmp)`` on a temporary file in the same folder, then rename it to ``path``:
    a crash or an error never leaves a half-written file (the old one, if any, stays), and the
    temporary name is never listed by ComfyUI. The file gets the permissions any other writer
    would give it (0666 minus the umask, or those of the file it replaces), not mkstemp's 0600.
    A read-only ``path`` is not replaced (check_replaceable).

    ``path`` may also be a list of names: with ``exclusive`` the file gets the first of them
    that no file has, claimed atomically (_claim_name); nothing is ever replaced, and NameTaken
    is raised when every name is taken. Returns the name written. ``suffix`` is accepted for
    older callers and ignored."""
    names = [os.fspath(p) for p in path] if isinstance(path, (list, tuple)) else [os.fspath(path)]
    if len(names) > 1 and not exclusive:
        raise ValueError("several names need exclusive=True")
    first = names[0]
    folder = os.path.dirname(os.path.abspath(first))
    os.makedirs(folder, exist_ok=True)
    mode = None
    if not exclusive:
        check_replaceable(first)
        try:
            mode = stat.S_IMODE(os.stat(first).st_mode)
        except OSError:
            pass
    tmp = temp_path_for(first)  # pid + 32 random bits: no other writer has this name
    try:
        # Everything from here on is inside the try: an exception (a signal turned into one, see
        # cli.main) at any point removes the temporary file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
        try:
            if mode is None:
                mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 minus the umask, read without changing it
        finally:
            os.close(fd)
        write(tmp)
        # safetensors' save_file (0.8) recreates the file as 0600 itself: set the mode afterwards.
        os.chmod(tmp, mode)
        if not exclusive:
            check_replaceable(first)  # made read-only while we wrote
            os.replace(tmp, first)
            return first
        for name in names:
            try:
                _claim_name(tmp, name)
                return name
            except NameTaken:
                continue
        raise NameTaken(f"{first}: this name and the {len(names) - 1} after it are all taken")
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def numbered(make: Callable[[int], str], first: int, count: int = 10000) -> List[str]:
    """``[make(first), make(first + 1), ...]``: the names an exclusive write tries in turn."""
    return [make(n) for n in range(first, first + count)]


# ---------------------------------------------------------------- claiming a run's name

# A training run in models/para writes <stem>_stepNNNNNN.safetensors (+ .trainer.pt) for many
# steps under one run number; two ComfyUIs sharing the folder must never both pick one. The run
# holds ".<file name>_<number>.para-run" (created with O_EXCL, so only one process gets it) while
# it runs; it says which process on which machine holds it.
RUN_CLAIM_SUFFIX = ".para-run"
_RUN_CLAIM = re.compile(r"^\..+_\d{5,}" + re.escape(RUN_CLAIM_SUFFIX) + "$")


def claim_run(folder: str, filename: str, first: int, tries: int = 10000):
    """Claim the first run number n >= ``first`` that no other run (or save) in ``folder`` uses for
    ``filename``: returns (stem, claim path), stem = folder/<filename>_<n:05>. Release it with
    release_run(claim path) when the run ends (a claim whose process died is removed at the next
    start, remove_stale_temp_files)."""
    os.makedirs(folder, exist_ok=True)
    host = socket.gethostname()
    for n in range(first, first + tries):
        base = f"{filename}_{n:05}"
        claim = os.path.join(folder, f".{base}{RUN_CLAIM_SUFFIX}")
        try:
            fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            if not _stale_claim(claim, time.time()):
                continue
            try:
                os.unlink(claim)
                fd = os.open(claim, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except OSError:
                continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {host}\n")
        # A run (or PaRa Save) that finished before we looked has files with this number but no
        # claim any more: the number is taken.
        if any(name.startswith(base + "_") for name in os.listdir(folder)):
            release_run(claim)
            continue
        return os.path.join(folder, base), claim
    raise NameTaken(f"{os.path.join(folder, filename)}: run numbers {first} to {first + tries - 1} are all taken")


def refresh_run(claim: Optional[str]) -> None:
    """Mark a claim as still in use (its age decides for claims of other machines)."""
    if claim:
        try:
            os.utime(claim)
        except OSError:
            pass


def release_run(claim: Optional[str]) -> None:
    if claim:
        try:
            os.unlink(claim)
        except OSError:
            pass


# A claim of another machine (a shared network folder) is stale only after this long unused.
RUN_CLAIM_MAX_AGE_S = 7 * 24 * 3600


def _stale_claim(path: str, now: float) -> bool:
    try:
        with open(path) as f:
            pid_text, _, host = f.read(200).strip().partition(" ")
        age = now - os.path.getmtime(path)
    except OSError:
        return False
    if host == socket.gethostname() and pid_text.isdigit():
        return not _pid_alive(int(pid_text))
    return age > RUN_CLAIM_MAX_AGE_S


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap safe check (os.kill would terminate it on Windows): the age decides
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temp_files(folders: Iterable[str], max_age_s: float = 24 * 3600) -> List[str]:
    """Delete the temporary files a crashed write left in ``folders`` (recursively): ours whose
    writer process is gone (or older than ``max_age_s``), earlier versions' ``.tmp-*`` files, run
    claims whose process is gone (claim_run), and a trainer checkpoint's ``*_stepNNNNNN.trainer.pt`` whose PaRa file was never written. Returns
    the removed paths. Called when the pack starts (nodes/__init__.py)."""
    import time as _time
    removed: List[str] = []
    now = _time.time()
    for top in folders:
        if not os.path.isdir(top):
            continue
        for root, _dirs, files in os.walk(top):
            names = set(files)
            for name in files:
                full = os.path.join(root, name)
                m = _TEMP_NAME.match(name)
                stale = False
                try:
                    if m:
                        stale = not _pid_alive(int(m.group(1))) or now - os.path.getmtime(full) > max_age_s
                    elif _RUN_CLAIM.match(name):
                        stale = _stale_claim(full, now)
                    elif _OLD_TEMP_NAME.match(name):
                        stale = True
                    elif _ORPHAN_STATE.match(name):
                        para = name[: -len(".trainer.pt")] + ".safetensors"
                        # unless a live process is still writing that PaRa file (a trainer in
                        # another ComfyUI sharing the folder writes the state first)
                        writing = any(_TEMP_NAME.match(n) and n.startswith(f".{_temp_stem(para)}.")
                                      and _pid_alive(int(_TEMP_NAME.match(n).group(1))) for n in names)
                        stale = para not in names and not writing
                    if stale:
                        os.unlink(full)
                        removed.append(full)
                except OSError:
                    pass
    return removed


_ORPHAN_STATE = re.compile(r"^.+_step\d{6}\.trainer\.pt$")


# safetensors refuses to write (or read) a header over 100 MB ("header too large").
MAX_HEADER_BYTES = 100_000_000


def _check_header_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path) -> None:
    size = len(json.dumps(dict(metadata)).encode()) + sum(len(k.encode()) + 120 for k in tensors)
    if size > MAX_HEADER_BYTES:
        biggest = max(metadata, key=lambda k: len(str(metadata[k])), default="")
        raise ParaError(f"{path}: the metadata is too large to be saved (a safetensors header holds at most "
                        f"{MAX_HEADER_BYTES // 1_000_000} MB; this one would be about {size / 1e6:.0f} MB, most of "
                        f"it in {biggest!r}); shorten what went into it (e.g. trigger_words).")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path, metadata: Optional[Mapping[str, str]] = None,
                            exclusive: bool = False) -> str:
    """safetensors save_file through atomic_write (``path`` and ``exclusive`` as there); returns
    the name written."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    md = dict(metadata or {})
    _check_header_size(data, md, os.fspath(path[0] if isinstance(path, (list, tuple)) else path))
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=md), ".safetensors", exclusive=exclusive)


def build_metadata(
    kind: str,
    *,
    rank: Optional[int] = None,
    ranks: Optional[Mapping[str, int]] = None,
    layers: str = "",
    base_arch: str = "",
    base_fingerprint: str = "",
    train: Optional[Mapping] = None,
    merge_mode: Optional[str] = None,
    title: str = "",
    extra: Optional[Mapping[str, str]] = None,
) -> Dict[str, str]:
    md = {
        "para.format": FORMAT_VERSION,
        "para.kind": kind,
        "para.layers": layers,
        "para.base_arch": base_arch,
        "para.base_fingerprint": base_fingerprint,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{ARCHITECTURES.get(base_arch, base_arch.lower() or 'unknown')}/para",
        "modelspec.implementation": "https://github.com/CCRobert1997/PaRa",
        "modelspec.title": title or "PaRa adapter",
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
    }
    if ranks:
        md["para.ranks"] = json.dumps({k: int(v) for k, v in ranks.items()}, sort_keys=True)
        if rank is None:
            rank = max(ranks.values())
    if rank is not None:
        md["para.rank"] = str(int(rank))
    if merge_mode:
        md["para.merge_mode"] = merge_mode
    if train is not None:
        md["para.train"] = json.dumps(dict(train), sort_keys=True, default=str)
    for k, v in (extra or {}).items():
        md[k] = str(v)
    return md


def save_para(state: ParaState, path, dtype: torch.dtype = torch.float32, exclusive: bool = False) -> str:
    """Save ``state`` in the spec's format (atomic). Returns the path. With ``exclusive``,
    ``path`` may be a list of names: the first free one is claimed, nothing is replaced
    (atomic_write)."""
    where = os.fspath(path[0] if isinstance(path, (list, tuple)) else path)
    tensors: Dict[str, torch.Tensor] = {}
    if state.kind == "subject":
        for l, b in state.B.items():
            tensors[f"{l}.para_B"] = b.detach().to(dtype)
    elif state.kind == "merged":
        for l in state.U:
            tensors[f"{l}.para_U"] = state.U[l].detach().to(dtype)
            tensors[f"{l}.para_V"] = state.V[l].detach().to(dtype)
    elif state.kind == "reference":
        for l in state.U:
            tensors[f"{l}.para_U"] = state.U[l].detach().to(dtype)
            tensors[f"{l}.para_D"] = state.D[l].detach().to(dtype)
    else:
        raise ParaError(f"unknown PaRa kind {state.kind!r}")
    for key, t in tensors.items():
        check_finite_result(t, where, f"{key} in {str(dtype).replace('torch.', '')}")
    md = dict(state.metadata)
    md.setdefault("para.format", FORMAT_VERSION)
    md["para.kind"] = state.kind
    if "para.ranks" not in md:
        md["para.ranks"] = json.dumps(state.ranks(), sort_keys=True)
    return atomic_save_safetensors(tensors, path, md, exclusive=exclusive)


# ---------------------------------------------------------------- reading

def _read_header(path: str, what: str = "PaRa file") -> dict:
    """Parse the safetensors header ourselves to give precise errors for wrong/truncated files.
    ``what`` names the expected kind of file in the messages ("PaRa file", "checkpoint")."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ParaError(f"{path}: not a safetensors file (only {size} bytes). Pick a .safetensors {what}.")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > 100_000_000 or n + 8 > size:
            raise ParaError(f"{path}: not a safetensors file, or its header is truncated. Pick a .safetensors {what}, or re-save/re-download it.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:
        raise ParaError(f"{path}: not a safetensors file (its header is not JSON). Pick a .safetensors {what}.") from None
    except RecursionError:
        raise ParaError(f"{path}: not a valid safetensors file (its header nests JSON too deeply). Pick a .safetensors {what}.") from None
    if not isinstance(header, dict):
        raise ParaError(f"{path}: not a safetensors file (its header is not a JSON object). Pick a .safetensors {what}.")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except Exception:
            raise ParaError(f"{path}: corrupt safetensors header at tensor {k!r}.") from None
    if 8 + n + end > size:
        raise ParaError(f"{path}: the file is truncated ({size} bytes, its header says {8 + n + end}); re-save or re-download it.")
    return header


def _layer_and_suffix(key: str) -> Tuple[Optional[str], Optional[str]]:
    for s in SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)], s[1:]
    return None, None


def check_layer_tensors(where: str, layer: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """The checks on one layer's tensors that need no model: pairs complete, 2-D, floating point,
    finite. ``tensors``: {"para_B": B} or {"para_U": U, "para_V": V} (or "para_D"). ``where`` names
    the file. The one place for them: load_para and the stock Load LoRA path (nodes/adapter.py)."""
    if "para_U" in tensors and "para_V" not in tensors and "para_D" not in tensors:
        raise ParaError(f"{where}: layer {layer} has para_U but no para_V; merged files need both.")
    for name in ("para_V", "para_D"):
        if name in tensors and "para_U" not in tensors:
            raise ParaError(f"{where}: layer {layer} has {name} but no para_U; {'merged' if name == 'para_V' else 'reference'} "
                            "files need both.")
    for name, t in tensors.items():
        want = "(rank, in*kh*kw)" if name == "para_D" else "(out, rank)"
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ParaError(f"{where}: {layer}.{name} has shape {shape}, expected {want}.")
        if not t.is_floating_point():
            raise ParaError(f"{where}: {layer}.{name} has dtype {t.dtype}; PaRa tensors are floating point. "
                            "The file is not a valid PaRa adapter.")
        if not torch.isfinite(t).all():
            raise ParaError(f"{where}: {layer}.{name} contains NaN or Inf values; the adapter is broken (retrain, or use an earlier checkpoint).")
    U, V = tensors.get("para_U"), tensors.get("para_V")
    if U is not None and V is not None and U.shape != V.shape:
        raise ParaError(f"{where}: layer {layer}: para_U {tuple(U.shape)} and para_V {tuple(V.shape)} differ in shape.")


def check_layer_fits(where: str, layer: str, kind: str, out_dim: int, rank: int, weight_shape: Sequence[int],
                     family: str = "this model", base_arch: str = "") -> None:
    """One layer of an adapter against the model's weight: output size, and a subject's rank at
    most what the layer allows. Shared by check_fits and the patch-time check (nodes/adapter.py)."""
    shape = tuple(int(d) for d in weight_shape)
    if len(shape) < 2 or shape[0] != out_dim:
        raise ParaError(
            f"{where}: layer {layer} has {out_dim} output channels in the file but the weight in {family} "
            f"has shape {shape}. This adapter was made for another model "
            f"(its base: {base_arch or 'unknown'}); pick the checkpoint it was trained on."
        )
    inner = 1
    for d in shape[1:]:
        inner *= d
    if kind == "subject" and rank > min(shape[0], inner):
        raise ParaError(f"{where}: layer {layer} has rank {rank}, more than the layer allows ({min(shape[0], inner)}).")


def check_finite_result(t: torch.Tensor, where: str, what: str) -> torch.Tensor:
    """Finite inputs can still give a non-finite result (entries near 3e38 overflow in U V^T W0, a
    QR or an fp16 cast): every path that applies or writes a weight checks what it computed."""
    if not bool(torch.isfinite(t).all()):
        raise ParaError(f"{where}: {what} is not finite (NaN/Inf): the adapter's values are too large for this "
                        "computation (e.g. a merge or strength with huge entries, or an fp16 overflow). Nothing was "
                        "applied or written; use a sane adapter, a lower strength, or fp32.")
    return t


def load_para(path: str, device: str = "cpu") -> ParaState:
    """Load and validate a PaRa file; every problem is a ParaError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ParaError(f"{path}: no such PaRa file. Put .safetensors files in models/para.")
    header = _read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    B: Dict[str, torch.Tensor] = {}
    U: Dict[str, torch.Tensor] = {}
    V: Dict[str, torch.Tensor] = {}
    D: Dict[str, torch.Tensor] = {}
    try:
        with safe_open(path, framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            for k in keys:
                layer, kind = _layer_and_suffix(k)
                if layer is None:
                    continue
                t = f.get_tensor(k)
                {"para_B": B, "para_U": U, "para_V": V, "para_D": D}[kind][layer] = t
    except ParaError:
        raise
    except Exception as e:
        raise ParaError(f"{path}: could not read the safetensors file ({e}); it may be corrupt, re-save it.") from None
    if not (B or U or V or D):
        if any(m in k for k in keys for m in _LORA_MARKERS):
            raise ParaError(f"{path}: this is a LoRA file, not a PaRa file (it has lora_up/lora_down-style tensors and no .para_B). Load it with ComfyUI's 'Load LoRA' node instead.")
        raise ParaError(f"{path}: no PaRa tensors (*.para_B, *.para_U/*.para_V or *.para_U/*.para_D) in this file; it is not a PaRa adapter.")
    if B and (U or V or D):
        raise ParaError(f"{path}: mixes para_B with para_U/para_V/para_D; a file is either a subject or a merged "
                        "adapter (or a reference one, para_U/para_D), never a mix.")
    if D or (metadata.get("para.kind") == "reference" and not V):
        _check_reference(path, U, V, D)
        return ParaState(kind="reference", U=U, D=D, metadata=metadata, source=path)
    for layer in list(B) + [l for l in dict.fromkeys(list(U) + list(V))]:
        tensors = {n: d[layer] for n, d in (("para_B", B), ("para_U", U), ("para_V", V)) if layer in d}
        check_layer_tensors(path, layer, tensors)
    kind = "subject" if B else "merged"
    return ParaState(kind=kind, B=B, U=U, V=V, metadata=metadata, source=path)


def _check_reference(path, U, V, D) -> None:
    """A reference file (spec section 1b): para_U (out, r) + para_D (r, in*kh*kw) per layer, finite."""
    if V:
        raise ParaError(f"{path}: mixes para_D with para_V; a file is either a merged (para_U/para_V) or a reference "
                        "(para_U/para_D) adapter.")
    for layer in U:
        if layer not in D:
            raise ParaError(f"{path}: layer {layer} has para_U but no para_D; reference files need both.")
    for layer in D:
        if layer not in U:
            raise ParaError(f"{path}: layer {layer} has para_D but no para_U; reference files need both.")
    for name, d in (("para_U", U), ("para_D", D)):
        for layer, t in d.items():
            if t.dim() != 2:
                want = "(out, rank)" if name == "para_U" else "(rank, in*kh*kw)"
                raise ParaError(f"{path}: {layer}.{name} has shape {tuple(t.shape)}, expected {want}.")
            if not torch.isfinite(t).all():
                raise ParaError(f"{path}: {layer}.{name} contains NaN or Inf values; the adapter is broken (retrain, "
                                "or use an earlier checkpoint).")
    for layer in U:
        if U[layer].shape[1] != D[layer].shape[0]:
            raise ParaError(f"{path}: layer {layer}: para_U {tuple(U[layer].shape)} and para_D {tuple(D[layer].shape)} "
                            "disagree on the rank (U is (out, r), D is (r, in*kh*kw)).")


# ---------------------------------------------------------------- fitting a model

def fingerprint(weights: Mapping[str, torch.Tensor], samples: int = 16) -> str:
    """A cheap fingerprint of the base weights an adapter was made against.

    Hashes, for every adapted layer (sorted), its shape and ``samples`` evenly spaced entries
    rounded to fp16 (so fp32 and fp16 copies of one base agree; a bf16 copy, which keeps
    fewer mantissa bits, does not: it gets the mismatch warning).
    A value may also be a safetensors slice (``safe_open(...).get_slice(key)``): then only the
    sampled entries are read from disk, so a checkpoint's fingerprint costs milliseconds.
    """
    h = hashlib.sha256()
    for name in sorted(weights):
        w = weights[name]
        shape = tuple(w.get_shape()) if hasattr(w, "get_shape") else tuple(w.shape)
        n = 1
        for d in shape:
            n *= int(d)
        k = min(samples, n)
        # integer arithmetic: a float linspace can round the last index past the end
        idx = [i * (n - 1) // max(k - 1, 1) for i in range(k)]
        if hasattr(w, "get_shape"):
            vals = torch.stack([_slice_entry(w, shape, i) for i in idx])
        else:
            vals = w.reshape(-1)[torch.tensor(idx, device=w.device)]
        h.update(_norm_name(name).encode())
        h.update(str(shape).encode())
        h.update(vals.detach().float().to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _slice_entry(sl, shape, flat_index: int) -> torch.Tensor:
    """One entry of a safetensors slice, by flat (row-major) index, reading only that entry."""
    sel = []
    for d in reversed(shape):
        sel.append(flat_index % d)
        flat_index //= d
    sel.reverse()
    return sl[tuple(slice(i, i + 1) for i in sel)].reshape(())


def _norm_name(name: str) -> str:
    return name if name.startswith(PREFIX) else PREFIX + name


def kohya_name(layer: str) -> str:
    path = layer[len(PREFIX):] if layer.startswith(PREFIX) else layer
    return KOHYA_PREFIX + path.replace(".", "_")


def resolve_layers(state: ParaState, model_layers: Iterable[str]) -> ParaState:
    """Map kohya-style ``lora_unet_*`` names (and bare paths) onto the model's layer names."""
    model_layers = list(model_layers)
    lookup = {}
    for l in model_layers:
        lookup[l] = l
        lookup[kohya_name(l)] = l
        if l.startswith(PREFIX):
            lookup[l[len(PREFIX):]] = l
    mapping = {l: lookup[l] for l in state.layers if l in lookup and lookup[l] != l}
    return state.renamed(mapping) if mapping else state


def check_fits(state: ParaState, shapes: Mapping[str, Sequence[int]], family: str = "this model") -> ParaState:
    """Check every layer exists in the model and has a matching output size.

    ``shapes``: {layer name: weight shape} of the model. Returns the state with names resolved.
    Raises ParaError naming the file and the first layer that does not fit.
    """
    where = state.source or state.name
    state = resolve_layers(state, shapes)
    for layer in state.layers:
        if layer not in shapes:
            raise ParaError(
                f"{where}: layer {layer} does not exist in {family}. This adapter was made for another model "
                f"(its base: {state.metadata.get('para.base_arch') or 'unknown'}); pick the checkpoint it was trained on."
            )
        shape = tuple(shapes[layer])
        check_layer_fits(where, layer, state.kind, state.out_dim(layer), state.rank(layer), shape, family,
                         state.metadata.get("para.base_arch", ""))
        inner = 1
        for d in shape[1:]:
            inner *= int(d)
        if state.kind == "reference" and state.D[layer].shape[1] != inner:
            raise ParaError(
                f"{where}: layer {layer}: para_D has {state.D[layer].shape[1]} input columns but the weight in {family} "
                f"has shape {shape} ({inner} = in*kh*kw). This adapter was made for another model "
                f"(its base: {state.metadata.get('para.base_arch') or 'unknown'}); pick the checkpoint it was trained on.")
    return state


def check_fingerprint(state: ParaState, model_fingerprint: str) -> Optional[str]:
    """Warn (and return the message) when the file was made against other base weights."""
    theirs = state.metadata.get("para.base_fingerprint", "")
    if theirs and model_fingerprint and theirs != model_fingerprint:
        msg = (f"{state.name}: made against base weights with fingerprint {theirs}, this model has {model_fingerprint}. "
               "Fine for fine-tunes of the same base; results may differ.")
        warnings.warn(msg, FingerprintWarning, stacklevel=2)
        return msg
    return None
