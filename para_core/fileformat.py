"""The PaRa file (spec section 2): safetensors with ``<layer>.para_B`` (subject),
``<layer>.para_U`` + ``<layer>.para_V`` (merged) or ``<layer>.para_U`` + ``<layer>.para_D``
(reference, spec section 1b), ``para.*`` and ``modelspec.*`` metadata.

``ParaState`` is the in-memory form shared by the CLI and the nodes (the ``PARA`` socket).
Layer names are ComfyUI module paths with the ``diffusion_model.`` prefix.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import secrets
import stat
import struct
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


class ParaError(ValueError):
    """A user-facing error: says what is wrong, where, and what to do."""


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


def save_para(state: ParaState, path: str, dtype: torch.dtype = torch.float32) -> str:
    """Save ``state`` in the spec's format (atomic). Returns the path."""
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
        check_finite_result(t, os.fspath(path), f"{key} in {str(dtype).replace('torch.', '')}")
    md = dict(state.metadata)
    md.setdefault("para.format", FORMAT_VERSION)
    md["para.kind"] = state.kind
    if "para.ranks" not in md:
        md["para.ranks"] = json.dumps(state.ranks(), sort_keys=True)
    atomic_save_safetensors(tensors, path, md)
    return path


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
    from . import peft  # PEFT's DEFT adapters (PaRa trained with diffusers + peft): a folder, its config or weights
    if os.path.isdir(path) and peft.is_peft_folder(path) or path.endswith(".json") and os.path.isfile(path):
        return peft.load_peft(path, device)
    if not os.path.isfile(path):
        raise ParaError(f"{path}: no such PaRa file. Put .safetensors files in models/para.")
    header = _read_header(path)
    keys = [k for k in header if k != "__metadata__"]
    if any(peft.is_deft_key(k) for k in keys) and not any(k.endswith(SUFFIXES) for k in keys):
        return peft.load_peft(path, device)
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
