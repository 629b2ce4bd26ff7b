"""Writing PaRa files and every other file the pack writes: atomically (a temporary file in the
same folder, then a rename), so a crash never leaves a half-written file (docs/spec.md section 2),
plus the spec's metadata and the cleanup of what a crashed write left behind.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import re
import secrets
import socket
import stat
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
from safetensors.torch import save_file

from .errors import ParaError
from .functional.base import check_finite

__all__ = ["FORMAT_VERSION", "ARCHITECTURES", "TEMP_SUFFIX", "temp_path_for", "atomic_write", "check_replaceable",
           "NameTaken", "numbered", "claim_run", "refresh_run", "release_run", "remove_stale_temp_files",
           "atomic_save_safetensors", "build_metadata", "save_para"]

FORMAT_VERSION = "1"
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
    removed: List[str] = []
    now = time.time()
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


def save_para(state, path, dtype: torch.dtype = torch.float32, exclusive: bool = False) -> str:
    """Save ``state`` (a ParaState) in the spec's format (atomic). Returns the path. With
    ``exclusive``, ``path`` may be a list of names: the first free one is claimed, nothing is
    replaced (atomic_write)."""
    if state.kind not in ("subject", "merged", "reference"):
        raise ParaError(f"unknown PaRa kind {state.kind!r}")
    where = os.fspath(path[0] if isinstance(path, (list, tuple)) else path)
    tensors = {f"{l}.{n}": t.detach().to(dtype) for l in state.layers for n, t in state.tensors(l).items()}
    for key, t in tensors.items():
        check_finite(t, where, f"{key} in {str(dtype).replace('torch.', '')}")
    md = dict(state.metadata)
    md.setdefault("para.format", FORMAT_VERSION)
    md["para.kind"] = state.kind
    if "para.ranks" not in md:
        md["para.ranks"] = json.dumps(state.ranks(), sort_keys=True)
    return atomic_save_safetensors(tensors, path, md, exclusive=exclusive)
