"""``export-lora --format peft``: a PaRa file written as a PEFT DEFT adapter folder (peft.py)."""
from __future__ import annotations

import os


def cmd_export_peft(args, warn) -> int:
    import torch
    from .base_model import Checkpoint, fit_states
    from .cli import DTYPES
    from .errors import ParaError, printable
    from .read import load_para
    from .peft import CONFIG_NAME, WEIGHTS_NAME, diffusers_unet_names, peft_paths, report_text, save_peft
    from .write import check_replaceable
    out = args.output
    if os.path.isfile(out):
        raise ParaError(f"{out}: is a file; --format peft writes a folder (adapter_config.json + "
                        "adapter_model.safetensors): give a folder path")
    found = peft_paths(args.para)  # a PEFT adapter in: never write over its own folder
    if found and os.path.isdir(out) and os.path.samefile(out, os.path.dirname(os.path.abspath(found[1]))):
        raise ParaError(f"{out}: the output would overwrite the input adapter; choose another output folder")
    for name in (WEIGHTS_NAME, CONFIG_NAME):  # a read-only file in the folder: refused before any work
        check_replaceable(os.path.join(out, name))
    state = load_para(args.para)
    with Checkpoint(args.base) as ckpt:
        (state,), messages = fit_states(ckpt, [state])
        for m in messages:
            warn(m)
        shapes = ckpt.layer_shapes()
        names = {layer: path for path, layer in diffusers_unet_names(shapes).items()}
        if not names:
            raise ParaError(f"{args.base}: not an SD-style UNet; the command line maps layer names to diffusers for "
                            "UNets only (through diffusers' conversion). Export other models' adapters in ComfyUI "
                            "(PaRa Export LoRA, format peft-deft).")
        report = save_peft(state, out, names, shapes, args.strength, getattr(torch, DTYPES[args.dtype]))
    if report["left_out_conv"] or report["left_out_unnamed"]:
        warn(f"{len(report['left_out_conv']) + len(report['left_out_unnamed'])} layer(s) of {state.name} are not in "
             "the PEFT adapter (see below): on those layers it differs from the PaRa file")
    print(printable(f"wrote {out}: " + report_text(report, args.strength)))
    return 0
