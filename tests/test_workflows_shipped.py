"""The shipped workflows: every UI workflow is valid against the running server's
/object_info, every API workflow runs on the server with the test checkpoint."""
import json
import math

import pytest

from harness.client import Client, Result
from workflow_helpers import UI_DIR, api_workflows, install_placeholders, ui_workflows
from workflows import api_graph, make_ui

EXPECTED = ["1_train_subject", "1_train_subject_comfyui-0.3.64", "2_generate_with_para_file",
            "3_merge_two_subjects", "4_single_image_edit", "5_export_as_lora"]
FRONTEND_ONLY = {"Note", "MarkdownNote"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def test_each_workflow_ships_in_both_formats():
    assert sorted(api_workflows()) == EXPECTED
    assert sorted(ui_workflows()) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_ui_workflow_has_notes_and_uses_only_stock_and_pack_nodes(name):
    ui = ui_workflows()[name]
    notes = [n for n in ui["nodes"] if n["type"] in FRONTEND_ONLY]
    assert notes and all(n["widgets_values"][0].strip() for n in notes), f"{name} has no note saying what to change"
    api = api_workflows()[name]
    assert {n["type"] for n in ui["nodes"]} - FRONTEND_ONLY == {n["class_type"] for n in api.values()}


# ------------------------------------------------------------------------------------------
# Against the server
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def placed(comfy_server, sd15_checkpoint):
    """The files the workflows name, in place on the server (so every combo value is valid)."""
    return install_placeholders(comfy_server, sd15_checkpoint)


@pytest.fixture(scope="module")
def object_info(comfy_server, placed):
    return comfy_server.client.object_info()


def skip_unless_for_this_version(name, version):
    """A workflow made for another ComfyUI version (<name>_comfyui-<version>), or one whose
    variant stands in for it on this version, is skipped (with the reason)."""
    chosen = api_graph.for_comfyui(name, version)
    if chosen != name:
        pytest.skip(f"{name} is not for ComfyUI {version}: {chosen} is (see README, workflows)")


def test_each_workflow_runs_here_or_a_variant_for_this_version_does(object_info, comfyui_version):
    """Every shipped workflow either runs on this ComfyUI or, provably, cannot (nodes missing)
    and its variant for this version stands in for it."""
    for name in EXPECTED:
        chosen = api_graph.for_comfyui(name, comfyui_version)
        assert not api_graph.missing_nodes(api_graph.load(chosen), object_info), \
            f"{chosen} (for {name}) needs nodes ComfyUI {comfyui_version} lacks"
        if chosen != name:
            assert api_graph.missing_nodes(api_graph.load(name), object_info), \
                f"{name} runs on ComfyUI {comfyui_version}: its variant {chosen} is not needed"
        assert api_graph.pick(name, object_info) == chosen
    assert api_graph.for_comfyui("1_train_subject", comfyui_version) in EXPECTED


def widget_inputs(info):
    """(name, type, options) of a node's widgets in input_order; None for sockets."""
    for _section, name, type_, opts in make_ui.input_specs(info):
        yield name, type_, opts, make_ui.is_widget(type_, opts)


def check_value(where, value, type_, opts):
    problems = []
    if isinstance(type_, list) or type_ == "COMBO":
        options = type_ if isinstance(type_, list) else opts.get("options", [])
        if value not in options:
            problems.append(f"{where}: {value!r} is not one of {options[:8]}{'...' if len(options) > 8 else ''}")
    elif type_ == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not an integer")
    elif type_ == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            problems.append(f"{where}: {value!r} is not a number")
    elif type_ == "BOOLEAN":
        if not isinstance(value, bool):
            problems.append(f"{where}: {value!r} is not true/false")
    elif type_ == "STRING":
        if not isinstance(value, str):
            problems.append(f"{where}: {value!r} is not a string")
    if type_ in ("INT", "FLOAT") and not problems:
        if "min" in opts and value < opts["min"]:
            problems.append(f"{where}: {value} is below the minimum {opts['min']}")
        if "max" in opts and value > opts["max"]:
            problems.append(f"{where}: {value} is above the maximum {opts['max']}")
    return problems


def ui_problems(ui: dict, object_info: dict) -> list[str]:
    """Everything in a UI workflow that the server's node schemas contradict."""
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        where = f"node {n['id']} ({n['type']})"
        info = object_info.get(n["type"])
        if info is None:
            problems.append(f"{where}: node type not on the server")
            continue
        # widget values, in the order the frontend reads them
        values = list(n.get("widgets_values", []))
        for name, type_, opts, widget in widget_inputs(info):
            if not widget:
                continue
            if not values:
                problems.append(f"{where}: no widget value for {name!r}")
                break
            problems += check_value(f"{where} {name}", values.pop(0), type_, opts)
            if make_ui.has_control_widget(name, type_, opts):
                v = values.pop(0) if values else None
                if v not in CONTROL_VALUES:
                    problems.append(f"{where} {name}: control_after_generate value {v!r}")
            if opts.get("image_upload"):
                values.pop(0) if values else problems.append(f"{where}: no upload widget value")
        if values:
            problems.append(f"{where}: {len(values)} widget values too many: {values}")
        # sockets: every required one linked, every declared one known
        declared = {name: (type_, section) for section, name, type_, opts in make_ui.input_specs(info)}
        for slot in n.get("inputs", []):
            if slot["name"] not in declared:
                problems.append(f"{where}: input {slot['name']!r} is not in its schema")
            elif declared[slot["name"]][1] == "required" and slot.get("link") is None and "widget" not in slot:
                problems.append(f"{where}: required input {slot['name']!r} is not connected")
        slots = {s["name"] for s in n.get("inputs", [])}
        for section, name, type_, opts in make_ui.input_specs(info):
            if section == "required" and not make_ui.is_widget(type_, opts) and name not in slots:
                problems.append(f"{where}: required socket {name!r} missing")
    for link in ui["links"]:
        lid, src, sslot, dst, dslot, ltype = link
        if src not in nodes or dst not in nodes:
            problems.append(f"link {lid}: joins missing nodes {src} -> {dst}")
            continue
        s, d = nodes[src], nodes[dst]
        s_info, d_info = object_info.get(s["type"]), object_info.get(d["type"])
        if s_info is None or d_info is None:
            continue
        if sslot >= len(s_info["output"]):
            problems.append(f"link {lid}: {s['type']} has no output {sslot}")
            continue
        out_type = s_info["output"][sslot]
        if dslot >= len(d.get("inputs", [])):
            problems.append(f"link {lid}: {d['type']} has no input slot {dslot}")
            continue
        slot = d["inputs"][dslot]
        declared = {name: type_ for _s, name, type_, _o in make_ui.input_specs(d_info)}
        in_type = declared.get(slot["name"])
        in_type = "COMBO" if isinstance(in_type, list) else in_type
        if not (ltype == out_type and (in_type == out_type or "*" in (in_type, out_type))):
            problems.append(f"link {lid}: {s['type']} output {sslot} ({out_type}) -> {d['type']}.{slot['name']} "
                            f"({in_type}); link says {ltype}")
        if slot.get("link") != lid:
            problems.append(f"link {lid}: {d['type']}.{slot['name']} says link {slot.get('link')}")
        if lid not in (s["outputs"][sslot].get("links") or []):
            problems.append(f"link {lid}: {s['type']} output {sslot} does not list it")
    return problems


@pytest.mark.parametrize("name", EXPECTED)
def test_ui_workflow_is_valid_for_the_server(name, object_info, comfyui_version):
    skip_unless_for_this_version(name, comfyui_version)
    problems = ui_problems(ui_workflows()[name], object_info)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", EXPECTED)
def test_workflow_uses_only_comfyui_and_this_pack(name, object_info, comfyui_version):
    skip_unless_for_this_version(name, comfyui_version)
    for node in api_workflows()[name].values():
        module = object_info[node["class_type"]]["python_module"]
        assert module in ("nodes", "custom_nodes.ComfyUI-PaRa") or module.startswith("comfy_extras."), \
            f"{node['class_type']} comes from {module}"


def test_ui_checker_catches_a_bad_workflow(object_info):
    ui = json.loads(json.dumps(ui_workflows()["2_generate_with_para_file"]))
    ks = next(n for n in ui["nodes"] if n["type"] == "KSampler")
    ks["widgets_values"][2] = 0  # steps below its minimum
    loader = next(n for n in ui["nodes"] if n["type"] == "PaRaLoader")
    loader["widgets_values"][0] = "no_such_file.safetensors"
    ui["links"][0][5] = "LATENT"
    ui["nodes"].append(dict(ks, id=99, type="NoSuchNode"))
    text = "\n".join(ui_problems(ui, object_info))
    for expected in ("steps: 0 is below the minimum 1", "no_such_file.safetensors", "link says LATENT",
                     "NoSuchNode): node type not on the server"):
        assert expected in text, text


def test_committed_ui_workflows_are_generated_from_the_api_ones(object_info, comfyui_version):
    built = make_ui.build_all(object_info, comfyui_version)
    if not built:
        pytest.skip(f"no UI file is made with ComfyUI {comfyui_version}'s schemas (make_ui.made_with)")
    stale = [f for f, text in built.items() if (UI_DIR / f).read_text() != text]
    assert not stale, (f"out of date, run with ComfyUI {comfyui_version}: python workflows/make_ui.py  "
                       f"({', '.join(stale)})")


# ------------------------------------------------------------------------------------------
# Running the API workflows
# ------------------------------------------------------------------------------------------

SMALL = dict(size=64, sample_steps=2, train_steps=2)


@pytest.fixture(scope="module")
def client(comfy_server, placed):
    c = Client(comfy_server.url)
    yield c
    c.close()


def run_ok(client, graph, timeout=600) -> Result:
    res = client.run(graph, timeout=timeout)
    assert res.ok, res.error
    return res


def images_of(res, graph, title):
    nid = api_graph.find(graph, title)
    return [item for n, item in res.files(("images",)) if n == nid]


def newest(folder, pattern):
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    assert files, f"no {pattern} in {folder}"
    return files[-1]


@pytest.mark.parametrize("name", ["1_train_subject", "1_train_subject_comfyui-0.3.64"])
def test_api_1_train_subject_runs(client, comfy_server, comfyui_version, name):
    skip_unless_for_this_version(name, comfyui_version)
    g = api_graph.shrink(api_graph.load(name), **SMALL)
    res = run_ok(client, g)
    assert len(images_of(res, g, "Save Image")) == 1
    (loss_png,) = images_of(res, g, "Plot Loss Graph")
    assert (comfy_server.temp_dir / loss_png["filename"]).stat().st_size > 0
    saved = newest(comfy_server.models_dir / "para", "my_subject_*_step*.safetensors")
    meta = core_metadata(saved)
    assert meta["para.kind"] == "subject" and json.loads(meta["para.train"])["trigger_words"] == "sks toy"


def test_api_1_train_subject_trains_on_the_dataset_nodes_lists(client, comfy_server, comfyui_version):
    """ComfyUI 0.33's dataset nodes: three images, scaled, encoded one latent per image."""
    skip_unless_for_this_version("1_train_subject", comfyui_version)
    g = api_graph.shrink(api_graph.load("1_train_subject"), **SMALL)
    assert api_graph.get_input(g, "PaRa Trainer.latents") == [api_graph.find(g, "MakeTrainingDataset"), 0]
    run_ok(client, g)
    saved = newest(comfy_server.models_dir / "para", "my_subject_*_step*.safetensors")
    train = json.loads(core_metadata(saved)["para.train"])
    assert train["images"] == 3 and train["captions"] == 3 and train["resolution"] == "104x104", train


def test_api_2_generate_with_para_file_runs(client):
    g = api_graph.shrink(api_graph.load("2_generate_with_para_file"), **SMALL)
    res = run_ok(client, g)
    assert len(images_of(res, g, "Save Image")) == 1


def test_api_3_merge_two_subjects_runs(client, comfy_server):
    g = api_graph.shrink(api_graph.load("3_merge_two_subjects"), **SMALL)
    res = run_ok(client, g)
    assert len(images_of(res, g, "Save Image")) == 1
    merged = newest(comfy_server.models_dir / "para" / "PaRa", "merged_*.safetensors")
    assert core_metadata(merged)["para.kind"] == "merged"


def test_api_4_single_image_edit_runs(client):
    g = api_graph.shrink(api_graph.load("4_single_image_edit"), **SMALL)
    assert api_graph.get_input(g, "PaRa Trainer.layers") == "noxattn-hspace-last"
    res = run_ok(client, g)
    assert len(images_of(res, g, "Save Image (edit)")) == 1
    assert len(images_of(res, g, "Save Image (caption)")) == 1


def test_api_5_export_as_lora_runs_in_two_queues_as_its_note_says(client, comfy_server):
    g = api_graph.shrink(api_graph.load("5_export_as_lora"), **SMALL)
    run_ok(client, g)
    lora = newest(comfy_server.models_dir / "loras" / "PaRa", "my_subject_lora_*.safetensors")
    assert client.object_info("LoraLoader")["input"]["required"]["lora_name"][0].count(f"PaRa/{lora.name}") == 1
    api_graph.set_input(g, "Load LoRA (exported file).lora_name", f"PaRa/{lora.name}")
    res = run_ok(client, g)
    assert len(images_of(res, g, "Save Image")) == 1


def test_ui_5_first_queue_validates_before_the_lora_exists(client, comfy_server):
    """The UI file ships the LoRA half muted (mode 2, which the frontend leaves out of the prompt):
    its first queue validates although the LoRA it loads is not exported yet."""
    ui = ui_workflows()["5_export_as_lora"]
    muted = {str(n["id"]) for n in ui["nodes"] if n.get("mode") == make_ui.MODE_MUTED}
    g = api_graph.shrink(api_graph.load("5_export_as_lora"), **SMALL)
    assert api_graph.find(g, "Load LoRA (exported file)") in muted and api_graph.find(g, "PaRa Export LoRA") not in muted
    api_graph.set_input(g, "Load LoRA (exported file).lora_name", "PaRa/not_exported_yet.safetensors")
    first = {nid: node for nid, node in g.items() if nid not in muted}
    assert all(not (isinstance(v, list) and v and v[0] in muted) for n in first.values() for v in n["inputs"].values())
    assert run_ok(client, first).node_errors == {}
    # unmuted, the same graph shows the validation error users read as a failure
    assert client.run(g, timeout=600).node_errors


def core_metadata(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata()
