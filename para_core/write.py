"""Writing PaRa files and every other file the pack writes: atomically (a temporary file in the
same folder, then a rename), so a crash never leaves a half-written file (docs/spec.md section 2),
plus the spec's metadata and the cleanup of what a crashed write left behind.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import secrets
import stat
import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import torch
from safetensors.torch import save_file

from .errors import ParaError
from .functional.base import check_finite

__all__ = ["FORMAT_VERSION", "ARCHITECTURES", "TEMP_SUFFIX", "temp_path_for", "atomic_write",
           "remove_stale_temp_files", "atomic_save_safetensors", "build_metadata", "save_para"]

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


def temp_path_for(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    # the name is cut so that the temporary name is never longer than the final one
    return os.path.join(folder, f".{name[:-30] if len(name) > 150 else name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> str:
    """Call ``write(tmp)`` on a temporary file in the same folder, then rename it to ``path``:
    a crash or an error never leaves a half-written file (the old one, if any, stays), and the
    temporary name is never listed by ComfyUI. The file gets the permissions any other writer
    would give it (0666 minus the umask, or those of the file it replaces), not mkstemp's 0600.
    ``suffix`` is accepted for older callers and ignored."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = None
    tmp = temp_path_for(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        if mode is None:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)  # 0666 minus the umask, read without changing it
    finally:
        os.close(fd)
    try:
        write(tmp)
        # safetensors' save_file (0.8) recreates the file as 0600 itself: set the mode afterwards.
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


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
    writer process is gone (or older than ``max_age_s``), earlier versions' ``.tmp-*`` files, and a
    trainer checkpoint's ``*_stepNNNNNN.trainer.pt`` whose PaRa file was never written. Returns
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
                    elif _OLD_TEMP_NAME.match(name):
                        stale = True
                    elif _ORPHAN_STATE.match(name):
                        para = name[: -len(".trainer.pt")] + ".safetensors"
                        # unless a live process is still writing that PaRa file (a trainer in
                        # another ComfyUI sharing the folder writes the state first)
                        writing = any(_TEMP_NAME.match(n) and n.startswith(f".{para}.")
                                      and _pid_alive(int(_TEMP_NAME.match(n).group(1))) for n in names)
                        stale = para not in names and not writing
                    if stale:
                        os.unlink(full)
                        removed.append(full)
                except OSError:
                    pass
    return removed


_ORPHAN_STATE = re.compile(r"^.+_step\d{6}\.trainer\.pt$")


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: Optional[Mapping[str, str]] = None) -> None:
    """safetensors save_file through atomic_write."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(data, tmp, metadata=dict(metadata or {})), ".safetensors")


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


def save_para(state, path: str, dtype: torch.dtype = torch.float32) -> str:
    """Save ``state`` (a ParaState) in the spec's format (atomic). Returns the path."""
    if state.kind not in ("subject", "merged", "reference"):
        raise ParaError(f"unknown PaRa kind {state.kind!r}")
    tensors = {f"{l}.{n}": t.detach().to(dtype) for l in state.layers for n, t in state.tensors(l).items()}
    for key, t in tensors.items():
        check_finite(t, os.fspath(path), f"{key} in {str(dtype).replace('torch.', '')}")
    md = dict(state.metadata)
    md.setdefault("para.format", FORMAT_VERSION)
    md["para.kind"] = state.kind
    if "para.ranks" not in md:
        md["para.ranks"] = json.dumps(state.ranks(), sort_keys=True)
    atomic_save_safetensors(tensors, path, md)
    return path
