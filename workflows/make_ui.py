"""Make the UI-format workflows (what users drag into ComfyUI) from the API-format ones.

    python workflows/make_ui.py                 # start ComfyUI headless, rewrite example_workflows/*.json
    python workflows/make_ui.py --server URL    # use a running server's /object_info
    python workflows/make_ui.py --check         # exit 1 if a committed UI file is out of date
    python workflows/make_ui.py --thumbnails    # the templates menu's <name>.jpg from the screenshots

workflows/api/<name>.json is the source of each graph; the node schemas (/object_info) say
which inputs are sockets and which are widgets, and in which order the frontend lists the
widget values. The layout (columns by graph depth) and the Note nodes live in this file, so
the two formats cannot drift apart: after changing an API workflow or a node's inputs, run
this script and commit both.

Node schemas differ a little between ComfyUI versions (0.33's SaveImage has an output, 0.3.64's
does not), so each UI file is made with one version's schemas: a variant made for one version
(<name>_comfyui-<version>, see api_graph.VARIANT_MARK) with that version's, every other workflow
with CURRENT_COMFYUI's. A run writes the files of the version it talks to; run it once per
version, e.g. `COMFYUI_PATH=~/ComfyUI ~/.cache/comfyui-para/venv-0.3.64/bin/python workflows/make_ui.py`
for the 0.3.64 variant. Every UI file is checked against each version's server by the tests.
"""
from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
if __package__ in (None, ""):  # run as a script: the repo root makes harness/ importable
    sys.path.insert(0, str(HERE.parent))
API_DIR = HERE / "api"
# The UI files, where ComfyUI's templates menu looks first (0.3.64 and 0.33 list a pack's
# example_workflows/ and, with a "consider renaming" log line, workflows/ and others).
UI_DIR = HERE.parent / "example_workflows"
# The ComfyUI whose node schemas make the UI files of the workflows for every version.
CURRENT_COMFYUI = "0.33.0"
VARIANT_MARK = "_comfyui-"  # as api_graph.VARIANT_MARK (this script runs without the package)

# Types the frontend draws as widgets (any other type is a socket). A list type is a legacy combo.
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Frontend-only nodes: not in /object_info, nothing to execute.
FRONTEND_ONLY = {"Note", "MarkdownNote"}
NOTE_COLOR, NOTE_BGCOLOR = "#432", "#653"
NODE_W, GAP, TITLE_H = 300, 40, 30
# The stored view fits the graph in the canvas of a 1600 x 900 browser window (the frontend's
# side bar and top menu take the rest); the browser test takes its screenshots in such a window.
WINDOW = (1600, 900)
CANVAS, MARGIN = (1536, 825), 16
# 0.33's frontend draws the canvas under its side bar and its floating top bar (0.3.64's starts
# beside and below them, 1536 x 825): the view keeps clear of both, so it fits in either.
CANVAS_CLEAR = (64, 56)

# What to change, per workflow; the first note is the "read me first" one. Keep them short:
# they are shown inside the graph.
NOTES: dict[str, list[str]] = {
    "1_train_subject": [
        "PaRa: train a subject, then generate with it (ComfyUI 0.33 or newer; on 0.3.64 use "
        "1_train_subject_comfyui-0.3.64.json)\n\n"
        "1. Put 3-10 photos of your subject in ComfyUI/input/<folder>, each with a .txt caption "
        "of the same name that contains your trigger word, e.g. 'a photo of sks toy on a table'.\n"
        "2. Pick that folder in 'Training images + captions' (press R to refresh the list).\n"
        "3. Pick your SD1.5 checkpoint in 'Load Checkpoint'.\n"
        "4. In 'PaRa Trainer' set trigger_words to your trigger word (it is stored in the file).\n"
        "5. Write a new prompt with the trigger word in 'Prompt', then Queue.\n\n"
        "Each photo is scaled to about 512x512 pixels keeping its aspect ratio, so sizes may differ "
        "(PaRa Trainer takes that, and Resolution Bucket's output too). The trainer saves "
        "models/para/<filename_prefix>_NNNNN_.safetensors (use it with PaRa Loader or the stock Load LoRA) "
        "and the loss graph is shown at the bottom.",
        "Paper settings (SD1.5): rank 4, preset noxattn, lr 1e-4, ~1000 steps, batch 1, 512 px. "
        "On a 24 GB GPU that takes a few minutes. Lower steps for a quick look.",
    ],
    "1_train_subject_comfyui-0.3.64": [
        "PaRa: train a subject, then generate with it (for ComfyUI 0.3.64; newer ComfyUI: 1_train_subject.json)\n\n"
        "1. Put 3-10 photos of your subject in ComfyUI/input/<folder>, each with a .txt caption "
        "of the same name that contains your trigger word, e.g. 'a photo of sks toy on a table'.\n"
        "2. Pick that folder in 'Load Image and Text Dataset from Folder' (press R to refresh the list).\n"
        "3. Pick your SD1.5 checkpoint in 'Load Checkpoint'.\n"
        "4. In 'PaRa Trainer' set trigger_words to your trigger word (it is stored in the file).\n"
        "5. Write a new prompt with the trigger word in 'Prompt', then Queue.\n\n"
        "The trainer saves models/para/<filename_prefix>_NNNNN_.safetensors (use it with PaRa Loader "
        "or the stock Load LoRA) and the loss graph is shown at the bottom.",
        "Paper settings (SD1.5): rank 4, preset noxattn, lr 1e-4, ~1000 steps, batch 1, 512 px. "
        "On a 24 GB GPU that takes a few minutes. Lower steps for a quick look.",
    ],
    "2_generate_with_para_file": [
        "PaRa: generate with a saved PaRa file\n\n"
        "1. Pick your checkpoint (the base the PaRa file was trained on, or a fine-tune of it).\n"
        "2. Pick the PaRa file in 'PaRa Loader' (files in models/para; press R to refresh).\n"
        "3. Use the trigger word in the prompt, then Queue.\n\n"
        "strength 1.0 = the paper; 0 = the base model; 0.5 = halfway.\n\n"
        "Size: 512x512 is for SD1.5 checkpoints. The demo's model (demo_base.safetensors) draws "
        "64x64 pictures: set 'Empty Latent Image' to 64 x 64 for it (the demo samples it with "
        "20 steps, cfg 4, dpmpp_2m, karras).",
    ],
    "3_merge_two_subjects": [
        "PaRa: two subjects in one image, no training\n\n"
        "1. Pick two PaRa files (trained on the same base) in 'Subject A' and 'Subject B'.\n"
        "2. Write a prompt with both trigger words, then Queue.\n\n"
        "PaRa Merge modes: sum (what the paper's code does), union (one projection onto both "
        "subspaces; overlaps counted once), sequential (one after the other, in input order). "
        "Up to 6 subjects: connect para_3 ... para_6. 'Save merged' writes models/para/<prefix>_NNNNN_.safetensors.",
    ],
    "4_single_image_edit": [
        "PaRa: single-image editing (no inversion)\n\n"
        "1. Load one image in 'Load Image'.\n"
        "2. Describe it in 'Caption (describes the image)'.\n"
        "3. Write the edit in 'Edited prompt': the same caption with one thing changed.\n"
        "4. Queue. The trainer learns one subspace in the last conv of the middle block "
        "(preset noxattn-hspace-last), so the picture keeps its layout and the prompt changes it.\n\n"
        "Keep the KSampler seed fixed and try several edited prompts: training runs only once.",
    ],
    "5_export_as_lora": [
        "PaRa: export a PaRa file as a standard LoRA\n\n"
        "1. Pick the base checkpoint the PaRa file was trained on, and the PaRa file in 'PaRa Load'.\n"
        "2. Queue once: 'PaRa Export LoRA' writes models/loras/<prefix>_NNNNN_.safetensors "
        "(the image part is muted, greyed out, until step 3: the LoRA it loads does not exist yet).\n"
        "3. Press R, pick the exported file in 'Load LoRA (exported file)', select the greyed nodes, "
        "press Ctrl+M to unmute them, Queue again.\n\n"
        "The LoRA is exact (same weights as the PaRa file at the same strength) but only on the "
        "base it was exported from; on other models use the PaRa file itself (PaRa Loader, or "
        "the stock Load LoRA reads PaRa files too when this pack is installed).",
    ],
}


# --------------------------------------------------------------------------------------------
# Schemas
# --------------------------------------------------------------------------------------------

def input_specs(info: dict) -> list[tuple[str, str, str | list, dict]]:
    """(section, name, type, options) of a node's inputs in the frontend's order
    (input_order: required, then optional); hidden inputs are left out."""
    out = []
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            type_ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((section, name, type_, opts))
    return out


def is_widget(type_, opts: dict) -> bool:
    if opts.get("forceInput"):
        return False
    return isinstance(type_, list) or type_ in WIDGET_TYPES


def combo_options(type_, opts: dict) -> list:
    return list(type_) if isinstance(type_, list) else list(opts.get("options", []))


def has_control_widget(name: str, type_, opts: dict) -> bool:
    """The frontend adds a 'control_after_generate' combo after INT widgets that ask for it, and
    (legacy convention) after INT inputs named seed or noise_seed; V3 combos may ask too."""
    if type_ == "INT":
        return bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))
    return bool(opts.get("control_after_generate")) and (isinstance(type_, list) or type_ == "COMBO")


def default_value(type_, opts: dict):
    if "default" in opts:
        return opts["default"]
    if isinstance(type_, list) or type_ == "COMBO":
        values = combo_options(type_, opts)
        return values[0] if values else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(type_)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# --------------------------------------------------------------------------------------------
# API -> UI
# --------------------------------------------------------------------------------------------

def _node_height(n_slots: int, widgets: list[tuple[str, object, dict]]) -> int:
    h = 6 + 22 * n_slots
    for _name, type_, opts in widgets:
        h += 110 if (type_ == "STRING" and opts.get("multiline")) else 24
        if opts.get("image_upload"):
            h += 300
    return h


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid, stack=()):
        if nid in depth:
            return depth[nid]
        if nid in stack:
            raise ValueError(f"cycle through node {nid}")
        srcs = [v[0] for v in api[nid]["inputs"].values() if is_link(v)]
        depth[nid] = 0 if not srcs else 1 + max(visit(s, stack + (nid,)) for s in srcs)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


# Nodes shipped muted (LiteGraph mode 2: not queued) so that the first queue validates: workflow 5
# loads a LoRA that its own first queue creates. The note says how to unmute them.
MUTED = {"5_export_as_lora": {"4", "5", "6", "7", "8", "9", "10"}}
MODE_MUTED = 2


def api_to_ui(name: str, api: dict, object_info: dict, notes: list[str] | None = None) -> dict:
    """The UI-format workflow (LiteGraph 0.4, as the ComfyUI frontend saves it) of an API graph.

    Node ids must be integers written as strings (as the frontend's "Export (API)" writes them).
    Widget values follow each node's input_order; a seed gets its 'fixed' control value; LoadImage
    gets its upload widget's value. Nodes are laid out in columns by graph depth; notes go in a
    column on the left.
    """
    for nid in api:
        if not nid.isdigit():
            raise ValueError(f"{name}: node id {nid!r} is not an integer string")
    missing = sorted({n["class_type"] for n in api.values()} - set(object_info))
    if missing:
        raise ValueError(f"{name}: node types not in /object_info: {missing}")

    depth = _depths(api)
    ids = sorted(api, key=int)
    # topological execution order, as LiteGraph stores it in "order"
    order = {nid: i for i, nid in enumerate(sorted(ids, key=lambda n: (depth[n], int(n))))}

    nodes, links = {}, []
    pending_links = []  # (target node id, input name, source id, source slot)
    for nid in ids:
        node = api[nid]
        info = object_info[node["class_type"]]
        inputs, widget_inputs, widgets_values, widget_specs = [], [], [], []
        for _section, iname, type_, opts in input_specs(info):
            value = node["inputs"].get(iname)
            if is_widget(type_, opts):
                widget_specs.append((iname, type_, opts))
                if is_link(value):
                    # a widget fed by a link: the frontend keeps a socket for it and a value
                    widget_inputs.append({"name": iname, "type": "COMBO" if isinstance(type_, list) else type_,
                                          "widget": {"name": iname}, "link": None})
                    pending_links.append((nid, iname, value[0], value[1]))
                    value = None
                widgets_values.append(default_value(type_, opts) if value is None else value)
                if has_control_widget(iname, type_, opts):
                    widgets_values.append("fixed")
                if opts.get("image_upload"):
                    widgets_values.append("image")
            else:
                slot = {"name": iname, "type": type_, "link": None}
                if _section == "optional":
                    slot["shape"] = 7  # the frontend draws optional sockets hollow
                inputs.append(slot)
                if is_link(value):
                    pending_links.append((nid, iname, value[0], value[1]))
                elif value is not None:
                    raise ValueError(f"{name}: node {nid} ({node['class_type']}) input {iname!r} is a socket "
                                     f"({type_}) but has the value {value!r}")
        inputs += widget_inputs  # the frontend lists sockets first, then widgets fed by links
        unknown = set(node["inputs"]) - {s[1] for s in input_specs(info)}
        if unknown:
            raise ValueError(f"{name}: node {nid} ({node['class_type']}) has inputs that its schema lacks: {sorted(unknown)}")
        outputs = [{"name": oname, "type": otype, "links": [], "slot_index": i}
                   for i, (oname, otype) in enumerate(zip(info.get("output_name") or info["output"], info["output"]))]
        ui_node = {
            "id": int(nid), "type": node["class_type"], "pos": [0, 0],
            "size": [NODE_W, _node_height(max(len(inputs), len(outputs)), widget_specs)],
            "flags": {}, "order": order[nid], "mode": MODE_MUTED if nid in MUTED.get(name, ()) else 0,
            "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets_values,
        }
        title = (node.get("_meta") or {}).get("title")
        if title and title != info.get("display_name", node["class_type"]):
            ui_node["title"] = title
        nodes[nid] = ui_node

    for link_id, (tid, iname, sid, sslot) in enumerate(pending_links, start=1):
        src, dst = nodes[sid], nodes[tid]
        if sslot >= len(src["outputs"]):
            raise ValueError(f"{name}: node {tid} input {iname!r} links to output {sslot} of node {sid}, which has "
                             f"{len(src['outputs'])} outputs")
        tslot = next(i for i, s in enumerate(dst["inputs"]) if s["name"] == iname)
        otype = src["outputs"][sslot]["type"]
        links.append([link_id, int(sid), sslot, int(tid), tslot, otype])
        dst["inputs"][tslot]["link"] = link_id
        src["outputs"][sslot]["links"].append(link_id)

    # layout: the notes in a row on top, then one column per graph depth
    ui_nodes = [nodes[nid] for nid in ids]
    next_id = max(int(n) for n in ids) + 1
    x, top = 0, 0
    for i, text in enumerate(notes or []):
        width = 520 if i == 0 else 360
        lines = sum(1 + len(line) // (width // 7) for line in text.split("\n"))
        height = 40 + 14 * lines
        ui_nodes.append({
            "id": next_id + i, "type": "Note", "pos": [x, 0], "size": [width, height], "flags": {},
            "order": len(ids) + i, "mode": 0, "inputs": [], "outputs": [],
            "title": "Read me first" if i == 0 else "Note", "properties": {"text": ""},
            "widgets_values": [text], "color": NOTE_COLOR, "bgcolor": NOTE_BGCOLOR,
        })
        x += width + GAP
        top = max(top, height + GAP + TITLE_H)
    y_by_col: dict[int, int] = {}
    for nid in ids:
        col = depth[nid]
        y = y_by_col.get(col, top)
        nodes[nid]["pos"] = [col * (NODE_W + GAP), y]
        y_by_col[col] = y + nodes[nid]["size"][1] + GAP + TITLE_H
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-para/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(n["id"] for n in ui_nodes),
        "last_link_id": len(links),
        "nodes": ui_nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": fit_view(ui_nodes), "para_workflow": name},
        "version": 0.4,
    }


def fit_view(ui_nodes: list[dict]) -> dict:
    """extra.ds (LiteGraph's view: canvas = (pos + offset) * scale) that shows every node in
    the CANVAS area less CANVAS_CLEAR, never zoomed in past 1."""
    x0 = min(n["pos"][0] for n in ui_nodes)
    y0 = min(n["pos"][1] for n in ui_nodes) - TITLE_H
    x1 = max(n["pos"][0] + n["size"][0] for n in ui_nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in ui_nodes)
    left, top = CANVAS_CLEAR[0] + MARGIN, CANVAS_CLEAR[1] + MARGIN
    avail_w, avail_h = CANVAS[0] - MARGIN - left, CANVAS[1] - MARGIN - top
    scale = min(1.0, avail_w / (x1 - x0), avail_h / (y1 - y0))
    off_x = (left + (avail_w - (x1 - x0) * scale) / 2) / scale - x0
    off_y = top / scale - y0
    return {"scale": round(scale, 4), "offset": [round(off_x, 1), round(off_y, 1)]}


def api_workflows() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(API_DIR.glob("*.json"))}


def render(ui: dict) -> str:
    return json.dumps(ui, indent=2, ensure_ascii=False) + "\n"


def made_with(name: str) -> str:
    """The ComfyUI version whose node schemas make this workflow's UI file."""
    return name.split(VARIANT_MARK, 1)[1] if VARIANT_MARK in name else CURRENT_COMFYUI


def build_all(object_info: dict, version: str | None = None) -> dict[str, str]:
    """{UI file name: its text} for every API workflow made with `version`'s schemas (all of
    them when version is None)."""
    out = {}
    for name, api in api_workflows().items():
        if version is None or made_with(name) == version:
            notes = NOTES.get(name) or NOTES.get(name.split(VARIANT_MARK, 1)[0])
            out[f"{name}.json"] = render(api_to_ui(name, api, object_info, notes))
    return out


def fetch_object_info(server: str | None) -> tuple[dict, str]:
    """(/object_info, the ComfyUI version) of a running server, or of one started here."""
    from harness import comfyui  # noqa: PLC0415
    from harness.client import Client  # noqa: PLC0415
    from harness.server import ComfyServer  # noqa: PLC0415

    def info(client):
        return client.object_info(), client.get("/system_stats")["system"]["comfyui_version"]

    if server:
        with Client(server, timeout=120) as client:
            return info(client)
    if comfyui.find_comfyui() is None:
        sys.exit(comfyui.COMFYUI_MISSING)
    with ComfyServer() as srv:
        return info(srv.client)


# ComfyUI's templates menu shows <name>.jpg beside <name>.json in a pack's template folder
# (0.3.64's and 0.33's frontends ask for /api/workflow_templates/<pack>/<name>.jpg), on a
# square card. The picture is the workflow's screenshot, its graph cut out and centred.
SHOTS_DIR = HERE / "screenshots"
THUMB_SIZE = 400


# Where the canvas starts in a screenshot of a 1600 x 900 window: 0.33's frontend draws it under
# its bars, 0.3.64's beside and below them.
CANVAS_ORIGIN = {"0.3.64": (WINDOW[0] - CANVAS[0], WINDOW[1] - CANVAS[1])}


def make_thumbnail(name: str, png: Path, jpg: Path) -> None:
    """example_workflows/<name>.jpg from workflows/screenshots/<name>.png: a square of the
    screenshot around the workflow's PaRa nodes (the menu shows a square card), as tall as the
    graph."""
    from PIL import Image  # ComfyUI's requirements include pillow

    ui = json.loads((UI_DIR / f"{name}.json").read_text())
    scale, (ox, oy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    x0, y0 = CANVAS_ORIGIN.get(made_with(name), (0, 0))
    shot = Image.open(png).convert("RGB")

    def box(n):  # a node's rectangle in the screenshot, title bar included
        (x, y), (w, h) = n["pos"], n["size"]
        return (x0 + (x + ox) * scale, y0 + (y + oy - TITLE_H) * scale,
                x0 + (x + w + ox) * scale, y0 + (y + h + oy) * scale)

    boxes = [box(n) for n in ui["nodes"]]
    para = [box(n) for n in ui["nodes"] if n["type"].startswith("PaRa")] or boxes
    top, bottom = min(b[1] for b in boxes) - MARGIN, max(b[3] for b in boxes) + MARGIN
    side = min(bottom - top, shot.width)
    cx = (min(b[0] for b in para) + max(b[2] for b in para)) / 2
    left = min(max(cx - side / 2, x0, CANVAS_CLEAR[0]), shot.width - side)  # never the side bar
    square = shot.crop((round(left), round(top), round(left + side), round(top + side)))
    square.resize((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS).save(jpg, "JPEG", quality=85, optimize=True)


def make_thumbnails() -> int:
    missing = [p.stem for p in sorted(UI_DIR.glob("*.json")) if not (SHOTS_DIR / f"{p.stem}.png").exists()]
    if missing:
        print("no screenshot for", ", ".join(missing), "(tests/test_workflows_browser.py takes them)")
        return 1
    for ui in sorted(UI_DIR.glob("*.json")):
        make_thumbnail(ui.stem, SHOTS_DIR / f"{ui.stem}.png", UI_DIR / f"{ui.stem}.jpg")
        print(f"wrote example_workflows/{ui.stem}.jpg")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", help="URL of a running ComfyUI with this pack (default: start one)")
    p.add_argument("--object-info", type=Path, help="read /object_info from this JSON file instead")
    p.add_argument("--comfyui-version", default=CURRENT_COMFYUI,
                   help=f"with --object-info: the ComfyUI version it came from (default {CURRENT_COMFYUI})")
    p.add_argument("--check", action="store_true", help="only check that the committed UI files are current")
    p.add_argument("--thumbnails", action="store_true",
                   help="only make the templates menu's pictures, example_workflows/<name>.jpg, from "
                        "workflows/screenshots/<name>.png (no server needed)")
    a = p.parse_args(argv)
    if a.thumbnails:
        return make_thumbnails()
    if a.object_info:
        info, version = json.loads(a.object_info.read_text()), a.comfyui_version
    else:
        info, version = fetch_object_info(a.server)
    files = build_all(info, version)
    others = sorted(f"{n}.json ({made_with(n)})" for n in api_workflows() if f"{n}.json" not in files)
    if others:
        print(f"ComfyUI {version}: the UI files made with another version's schemas are left as they are: "
              + ", ".join(others))
    stale = []
    for fname, text in files.items():
        path = UI_DIR / fname
        if path.exists() and path.read_text() == text:
            continue
        stale.append(fname)
        if not a.check:
            path.write_text(text)
            print(f"wrote example_workflows/{fname}")
    if a.check and stale:
        print("out of date (run python workflows/make_ui.py):", ", ".join(stale))
        return 1
    if not stale:
        print("UI workflows are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
