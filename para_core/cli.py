"""The command line: ``python -m para_core {inspect,merge,export-lora,bake}`` (docs/spec.md section 4).

Errors exit with status 1 (2 for usage errors) and one line on stderr, ``error: ...``; outputs
are written atomically, so a failed command leaves no file behind.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import signal
import sys
import threading
import textwrap
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import FingerprintWarning, ParaError, printable
from .presets import PresetError

# torch and the modules that need it are imported inside the commands: importing torch takes
# about 4 s, and a usage error, --help or a wrong path should answer at once (measured on 2 CPU
# cores: a missing file took 4.5 s before, 0.1 s after).

PROG = "python -m para_core"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # name -> torch dtype attribute
# The argument choices, the same as para_core.merge.MERGE_MODES (importing that module here would
# import torch); tests/test_core_cli.py runs a merge with each mode of either list.
MERGE_MODES = ("sum", "union", "sequential")


class InputError(Exception):
    """A command-line argument that is wrong before any file is read (a path that does not exist,
    a non-finite strength)."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2) instead of usage + error."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _fail(message: str) -> int:
    sys.stderr.write("error: " + printable(" ".join(str(message).split())) + "\n")
    return 1


def _warn(message: str) -> None:
    sys.stderr.write("warning: " + printable(" ".join(str(message).split())) + "\n")


def _print(line: str) -> None:
    print(printable(line))


# -------------------------------------------------------------------------------- arguments

def parse_file_strength(text: str) -> Tuple[str, float]:
    """``FILE[:S]`` -> (FILE, S). S is the text after the last colon, only if it is a number,
    so Windows paths (``C:\\models\\a.safetensors``) keep their drive colon."""
    path, sep, tail = text.rpartition(":")
    if not sep or not path:
        return text, 1.0
    try:
        strength = float(tail)
    except ValueError:
        return text, 1.0
    if os.path.exists(text) and not os.path.exists(path):
        return text, 1.0
    if not math.isfinite(strength):
        raise InputError(f"strength {tail!r} in {text!r} is not a finite number")
    return path, strength


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _check_output(out: str, inputs: Sequence[str]) -> None:
    from .write import check_replaceable
    if os.path.isdir(out):
        raise ParaError(f"{out}: is a folder; give an output file name (e.g. {os.path.join(out, 'out.safetensors')})")
    check_replaceable(out)
    for p in inputs:
        if os.path.exists(out) and os.path.exists(p) and os.path.samefile(out, p):
            raise ParaError(f"{out}: the output would overwrite an input file; choose another output path")


def _input_paths(args) -> List[Tuple[str, str]]:
    """(path, what it is) of every input file the command reads."""
    if args.command == "inspect":
        out = [(args.file, "PaRa file")]
    elif args.command == "merge":
        out = [(parse_file_strength(s)[0], "PaRa file") for s in args.inputs]
    else:
        paras = args.para if isinstance(args.para, list) else [args.para]
        out = [(parse_file_strength(s)[0], "PaRa file") for s in paras]
    base = getattr(args, "base", None)
    if base:
        out.append((base, "base checkpoint"))
    return out


def check_inputs(args) -> None:
    """Every input path names an existing file; checked before torch is imported, so a typo
    fails at once. The message names the path as given (no advice about models/para: the
    command line reads any path)."""
    from .peft import is_peft_folder  # standard library only
    for path, what in _input_paths(args):
        if what == "PaRa file" and is_peft_folder(path):
            continue  # a PEFT DEFT adapter folder (adapter_config.json + adapter_model.safetensors)
        if os.path.isdir(path):
            raise InputError(f"{path}: is a folder; give the path of a {what} (.safetensors)")
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such file; check the path of the {what} (relative paths start at "
                             f"{os.getcwd()})")


def _load_all(specs: Sequence[str]):
    from .read import load_para
    pairs = [parse_file_strength(s) for s in specs]
    return [(load_para(p), s) for p, s in pairs], [p for p, _ in pairs]


# -------------------------------------------------------------------------------- inspect

def _fmt_int(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n:,}"


def _decoded_metadata(md: Dict[str, str]) -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k in sorted(md):
        v = md[k]
        if k in ("para.train", "para.ranks", "para.merge_inputs", "para.baked"):
            try:
                v = json.loads(v)
                json.dumps({"metadata": {k: v}}, indent=2)  # printable too (the indenting encoder recurses in Python)
            except (ValueError, RecursionError):
                v = md[k]  # shown as stored (e.g. nested too deeply to decode)
        out[k] = v
    return out


def _inspect_data(args) -> Tuple[Dict, List[str]]:
    import torch
    from .base_model import Checkpoint, fit_states
    from .functional import projection, reference
    from .read import load_para
    state = load_para(args.file)
    messages: List[str] = []
    base_info = None
    shapes = None
    per_layer: Dict[str, Dict] = {}
    if args.base:
        with Checkpoint(args.base) as ckpt:
            (state,), messages = fit_states(ckpt, [state])
            shapes = ckpt.layer_shapes()
            factors = state.factors() if state.kind != "reference" else None
            for layer in state.layers:
                W0 = ckpt.weight(layer).float()
                if factors is None:  # reference parametrization: W0 - U D
                    W1 = reference.reduce_weight(W0, state.U[layer], state.D[layer], 1.0)
                else:
                    U, V = factors[layer]
                    W1 = projection.reduce_weight(W0, U, V, 1.0)
                m0, m1 = W0.reshape(W0.shape[0], -1), W1.reshape(W1.shape[0], -1)
                energy = float(m0.pow(2).sum())
                per_layer[layer] = {
                    "base_shape": list(W0.shape),
                    "rank_W0": int(torch.linalg.matrix_rank(m0)),
                    "rank_W": int(torch.linalg.matrix_rank(m1)),
                    "energy_removed": float((m0 - m1).pow(2).sum()) / energy if energy > 0 else 0.0,
                }
            theirs = state.metadata.get("para.base_fingerprint", "")
            ours = ckpt.fingerprint(state.layers)
            base_info = {"file": args.base, "family": ckpt.family(), "layout": ckpt.layout,
                         "fingerprint": ours, "file_fingerprint": theirs or None,
                         "fingerprint_matches": (theirs == ours) if theirs else None}
    layers = []
    lora = 0
    for layer in state.layers:
        t = state.B[layer] if state.kind == "subject" else state.U[layer]
        entry = {"name": layer, "shape": list(t.shape), "rank": state.rank(layer)}
        entry.update(per_layer.get(layer, {}))
        layers.append(entry)
        if shapes is not None:
            shape = shapes[layer]
            lora += state.rank(layer) * (shape[0] + math.prod(shape[1:]))
    data = {
        "file": args.file,
        "kind": state.kind,
        "merge_mode": state.metadata.get("para.merge_mode") if state.kind == "merged" else None,
        "layers": layers,
        "parameters": state.num_params(),
        "lora_equivalent_parameters": lora if shapes is not None else None,
        "metadata": _decoded_metadata(state.metadata),
        "base": base_info,
    }
    return data, messages


def cmd_inspect(args) -> int:
    data, messages = _inspect_data(args)
    for m in messages:
        _warn(m)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    kind = data["kind"] + (f" (merge mode {data['merge_mode']})" if data["merge_mode"] else "")
    _print(f"file:       {data['file']}")
    _print(f"kind:       {kind}")
    _print(f"layers:     {len(data['layers'])}")
    _print(f"parameters: {_fmt_int(data['parameters'])}")
    lora = data["lora_equivalent_parameters"]
    _print(f"LoRA at the same rank: {_fmt_int(lora)}" + ("" if lora is not None else " (needs --base)"))
    base = data["base"]
    if base:
        _print(f"base:       {base['file']} ({base['family']}, layout {base['layout']})")
        match = {True: "matches", False: "DIFFERS", None: "not recorded in the file"}[base["fingerprint_matches"]]
        _print(f"fingerprint: base {base['fingerprint']}, file {base['file_fingerprint'] or '-'} ({match})")
    _print("")
    width = max(len(l["name"]) for l in data["layers"])
    head = f"  {'layer':<{width}}  {'shape':<12} {'rank':>4}"
    if base:
        head += f"  {'weight shape':<18} {'rank W0':>7} {'rank W' + chr(39):>7} {'energy removed':>14}"
    _print(head)
    for l in data["layers"]:
        line = f"  {l['name']:<{width}}  {str(tuple(l['shape'])):<12} {l['rank']:>4}"
        if base:
            line += (f"  {str(tuple(l['base_shape'])):<18} {l['rank_W0']:>7} {l['rank_W']:>7}"
                     f" {100 * l['energy_removed']:>13.3f}%")
        _print(line)
    _print("")
    _print("metadata:")
    for k, v in data["metadata"].items():
        if k == "para.ranks" and isinstance(v, dict):
            _print(f"  {k}: {len(v)} layers (see the table)")
        elif isinstance(v, (dict, list)):
            body = json.dumps(v, indent=2, sort_keys=True).replace("\n", "\n    ")
            _print(f"  {k}:\n    {body}")
        else:
            _print(f"  {k}: {v}")
    return 0


# -------------------------------------------------------------------------------- merge

def cmd_merge(args) -> int:
    from .merge import merge_states
    from .write import save_para
    items, paths = _load_all(args.inputs)
    _check_output(args.output, paths)
    merged = merge_states([st for st, _ in items], [s for _, s in items], args.mode)
    save_para(merged, args.output)
    _print(f"wrote {args.output}: {len(merged.layers)} layers, merge mode {args.mode}, "
          f"inputs {', '.join(f'{st.name}:{s:g}' for st, s in items)}")
    return 0


# -------------------------------------------------------------------------------- export-lora

def cmd_export_lora(args) -> int:
    import torch
    from .base_model import Checkpoint, fit_states
    from .export import export_lora
    from .read import load_para
    from .write import ARCHITECTURES, atomic_save_safetensors
    if getattr(args, "format", "lora") == "peft":
        from .peft_cli import cmd_export_peft
        return cmd_export_peft(args, _warn)
    state = load_para(args.para)
    _check_output(args.output, [args.para, args.base])
    with Checkpoint(args.base) as ckpt:
        (state,), messages = fit_states(ckpt, [state])
        for m in messages:
            _warn(m)
        tensors = export_lora(state, ckpt.weight, args.strength, getattr(torch, DTYPES[args.dtype]))
        if not tensors:
            raise ParaError(f"{args.para}: every layer has rank 0 at this strength; there is nothing to export")
        ranks = [state.rank(l) for l in state.layers if state.rank(l) > 0]
        fp = ckpt.fingerprint(state.layers)
        arch = ckpt.family()
        if arch == "unknown":
            arch = state.metadata.get("para.base_arch") or arch
        name = os.path.basename(args.para)
        metadata = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": str(max(ranks)),
            "para.exported_from": name,
            "para.export_strength": f"{args.strength:g}",
            "para.base_checkpoint": ckpt.name,
            "para.base_fingerprint": fp,
            "para.base_arch": arch,
            "para.note": (f"Exact LoRA export of the PaRa adapter {name} at strength {args.strength:g}. It only fits "
                          f"the base it was exported against ({ckpt.name}, {arch}, fingerprint {fp}): the LoRA holds "
                          "V^T W0 of that base, so on other weights it does not reproduce the adapter."),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{ARCHITECTURES.get(arch, arch.lower())}/lora",
            "modelspec.implementation": "https://github.com/CCRobert1997/PaRa",
            "modelspec.title": f"{os.path.splitext(name)[0]} (LoRA export)",
            "modelspec.date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        }
        if "para.train" in state.metadata:
            metadata["para.train"] = state.metadata["para.train"]
    atomic_save_safetensors(tensors, args.output, metadata)
    _print(f"wrote {args.output}: LoRA of {len(ranks)} layers, rank up to {max(ranks)}, {args.dtype}, "
          f"strength {args.strength:g}; only fits {ckpt.name}")
    return 0


# -------------------------------------------------------------------------------- bake

def cmd_bake(args) -> int:
    from .base_model import Checkpoint, bake
    items, paths = _load_all(args.para)
    _check_output(args.output, paths + [args.base])
    with Checkpoint(args.base) as ckpt:
        report = bake(ckpt, items, args.mode, args.output)
    for m in report["warnings"]:
        _warn(m)
    _print(f"wrote {args.output}: {report['layers']} layers of {os.path.basename(args.base)} reduced by "
          f"{', '.join(f'{st.name}:{s:g}' for st, s in items)}" + (f" ({args.mode})" if len(items) > 1 else ""))
    return 0


# -------------------------------------------------------------------------------- parser

def _wrap(text: str) -> str:
    return textwrap.fill(text, 88)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog=PROG, formatter_class=fmt,
                     description=_wrap("PaRa (parameter rank reduction) adapters: inspect, merge, export to LoRA, bake "
                                 "into a checkpoint."),
                     epilog=f"example:\n  {PROG} inspect models/para/dog.safetensors --base sd15.safetensors\n"
                            f"run '{PROG} COMMAND --help' for each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("inspect", formatter_class=fmt, help="layers, ranks, shapes, metadata, parameters",
                       description=_wrap("Show a PaRa file's layers, ranks, shapes, metadata and parameter counts. With "
                                   "--base: per layer the rank of W0 and of W' and the share of W0's energy "
                                   "removed, and whether the base fingerprint matches."),
                       epilog=f"examples:\n  {PROG} inspect dog.safetensors\n"
                              f"  {PROG} inspect dog.safetensors --base v1-5-pruned-emaonly.safetensors --json")
    p.add_argument("file", metavar="FILE", help="PaRa file (.safetensors), or a PEFT DEFT adapter (its folder)")
    p.add_argument("--base", metavar="CKPT", help="the base checkpoint, for ranks of W0/W', energy and fingerprint")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", formatter_class=fmt, help="merge several PaRa files into one",
                       description=_wrap("Merge PaRa files into one merged file (para_U/para_V). Modes: sum (the "
                                   "reference code: W0 - sum s_i Q_i Q_i^T W0), union (projection onto the span "
                                   "of all subspaces), sequential (in the given order). Reference-parametrization "
                                   "files (para_U/para_D, W0 - U D) merge with sum only, into a reference file. "
                                   "FILE:S sets a strength (default 1)."),
                       epilog=f"example:\n  {PROG} merge --mode union dog.safetensors:1 cat.safetensors:0.8 "
                              "-o dog_cat.safetensors")
    p.add_argument("--mode", choices=MERGE_MODES, required=True, help="how the subspaces combine")
    p.add_argument("inputs", nargs="+", metavar="FILE[:S]", help="PaRa files, each with an optional strength")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="merged PaRa file to write")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-lora", formatter_class=fmt, help="export exactly as a standard LoRA",
                       description=_wrap("Write a standard LoRA (kohya keys: lora_up/lora_down/alpha) that gives exactly "
                                   "the PaRa weights at the given strength: lora_up = -s U, lora_down = V^T W0, "
                                   "alpha = rank. It only fits the base it was exported against."),
                       epilog=f"example:\n  {PROG} export-lora --base sd15.safetensors --para dog.safetensors "
                              "--strength 1 --dtype fp16 -o models/loras/dog_lora.safetensors")
    p.add_argument("--base", required=True, metavar="CKPT", help="the base checkpoint the adapter was made for")
    p.add_argument("--para", required=True, metavar="FILE", help="PaRa file")
    p.add_argument("--strength", type=_finite, default=1.0, metavar="S", help="strength baked into the LoRA (default 1)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="storage dtype (default fp32)")
    p.add_argument("--format", choices=("lora", "peft"), default="lora",
                   help="lora (default): a LoRA file; peft: a PEFT DEFT adapter folder (para=true) at OUT, for "
                        "diffusers + peft (Linear layers only; needs the diffusers package for the names)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="LoRA file (or, with --format peft, folder) to write")
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser("bake", formatter_class=fmt, help="write a checkpoint with adapters applied",
                       description=_wrap("Write a copy of the checkpoint with W' = W0 - U V^T W0 applied to the adapted "
                                   "weights; every other tensor is copied bit-identically, key names and dtypes are "
                                   "kept. Several --para are merged with --mode."),
                       epilog=f"example:\n  {PROG} bake --base sd15.safetensors --para dog.safetensors:1 "
                              "--para cat.safetensors:0.7 --mode union -o sd15_dog_cat.safetensors")
    p.add_argument("--base", required=True, metavar="CKPT", help="SD-style or diffusion-model-only checkpoint")
    p.add_argument("--para", required=True, action="append", metavar="FILE[:S]",
                   help="PaRa file with optional strength; repeat for several")
    p.add_argument("--mode", choices=MERGE_MODES, default="sum", help="merge mode for several files (default sum)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="checkpoint to write")
    p.set_defaults(func=cmd_bake)
    return parser


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like Ctrl-C, so the temporary file of a write is removed."""


# main()'s status when SIGTERM stopped it; __main__ then ends the process by that signal.
TERMINATED = 128 + signal.SIGTERM


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns the exit status. SIGTERM is turned into an exception while it
    runs (when called from the main thread), so an interrupted write leaves nothing behind."""
    installed = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if installed else None
    try:
        return _main(argv)
    except Terminated:  # arrived outside the commands' own handling
        _fail("terminated (SIGTERM); no output was written")
        return TERMINATED
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_inputs(args)
    except InputError as e:
        return _fail(str(e))
    try:
        with warnings.catch_warnings():
            # check_fingerprint warns and returns the message; the commands print it themselves.
            warnings.simplefilter("ignore", FingerprintWarning)
            return int(args.func(args) or 0)
    except (ParaError, PresetError, InputError) as e:
        return _fail(str(e))
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Terminated:
        _fail("terminated (SIGTERM); no output was written")
        return TERMINATED
    except Exception as e:  # no traceback for users; PARA_DEBUG=1 shows it
        if os.environ.get("PARA_DEBUG"):
            raise
        return _fail(f"unexpected {type(e).__name__}: {e} (set PARA_DEBUG=1 for a traceback)")
