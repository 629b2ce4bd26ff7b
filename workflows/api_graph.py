"""Read and edit API-format workflows ({node id: {"class_type", "inputs", "_meta"}}), the format
that POST /prompt takes. Used by demo.py, batch.py and the tests.

A node is named by its id ("9"), its title ("KSampler", "PaRa Trainer"; _meta.title) or its
class_type when that is unique in the graph. An input path is NODE.inputs.NAME or NODE.NAME.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
API_DIR = HERE / "api"


class GraphError(ValueError):
    pass


# A workflow made for one ComfyUI version only is named <name>_comfyui-<version>: it stands in for
# <name> there (1_train_subject_comfyui-0.3.64: ComfyUI 0.3.64 has no MakeTrainingDataset, and
# 0.33 removed the LoadImageTextSetFromFolderNode it uses instead). Every other workflow runs on
# every supported version.
VARIANT_MARK = "_comfyui-"


def names() -> list[str]:
    """The shipped API workflows (file stems in workflows/api)."""
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def base_name(name: str) -> str:
    """'1_train_subject_comfyui-0.3.64' -> '1_train_subject'."""
    return name.split(VARIANT_MARK, 1)[0]


def variant_version(name: str) -> str | None:
    """The ComfyUI version a variant is made for, None for a workflow for every version."""
    return name.split(VARIANT_MARK, 1)[1] if VARIANT_MARK in name else None


def for_comfyui(name: str, version: str) -> str:
    """The shipped workflow to run as `name` on ComfyUI `version`: its variant for that version
    when there is one, else `name` itself."""
    variant = f"{base_name(name)}{VARIANT_MARK}{version}"
    return variant if variant in names() else base_name(name)


def missing_nodes(graph: dict, node_types) -> list[str]:
    """The node types of graph that a server (its /object_info keys) does not have."""
    return sorted({n["class_type"] for n in graph.values()} - set(node_types))


def pick(name: str, node_types) -> str:
    """Of `name` and its variants, the first whose nodes the server has (e.g. the 0.3.64 training
    workflow on a ComfyUI without MakeTrainingDataset); GraphError when none fits."""
    candidates = [base_name(name)] + [n for n in names() if n.startswith(base_name(name) + VARIANT_MARK)]
    for candidate in candidates:
        if not missing_nodes(load(candidate), node_types):
            return candidate
    raise GraphError(f"no version of workflow {base_name(name)!r} runs on this ComfyUI: "
                     f"{base_name(name)} needs {', '.join(missing_nodes(load(candidates[0]), node_types))}")


def load(name_or_path) -> dict:
    """A shipped workflow by name ("1_train_subject") or any API-format JSON file."""
    p = Path(name_or_path)
    if (API_DIR / f"{name_or_path}.json").is_file() or (p.suffix != ".json" and not p.exists()):
        p = API_DIR / f"{name_or_path}.json"  # a shipped name (variant names hold dots: _comfyui-0.3.64)
    try:
        graph = json.loads(p.read_text())
    except FileNotFoundError:
        raise GraphError(f"no workflow {name_or_path!r} (shipped: {', '.join(names())})") from None
    except ValueError as e:
        raise GraphError(f"{p} is not valid JSON: {e}") from None
    check_api_format(graph, str(p))
    return graph


def check_api_format(graph, where: str = "workflow") -> None:
    if isinstance(graph, dict) and "nodes" in graph and "links" in graph:
        raise GraphError(f"{where} is a UI-format workflow; use the API format (workflows/api/, or in ComfyUI: "
                         "Workflow > Export (API))")
    if not isinstance(graph, dict) or not graph or not all(
            isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise GraphError(f"{where} is not an API-format workflow ({{id: {{class_type, inputs}}}})")


def title(node: dict) -> str:
    return (node.get("_meta") or {}).get("title") or node["class_type"]


def describe(graph: dict) -> str:
    return ", ".join(f"{nid}: {title(n)} ({n['class_type']})" for nid, n in graph.items())


def find(graph: dict, ref: str) -> str:
    """The id of the node named ref (id, title, or a class_type unique in the graph)."""
    ref = str(ref)
    if ref in graph:
        return ref
    for key in (title, lambda n: n["class_type"]):
        hits = [nid for nid, n in graph.items() if key(n) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise GraphError(f"{ref!r} names several nodes ({', '.join(hits)}); use the node id")
    raise GraphError(f"no node {ref!r} in the workflow; nodes: {describe(graph)}")


def split_path(path: str) -> tuple[str, str]:
    """'9.inputs.seed' / '9.seed' / 'KSampler.seed' -> (node ref, input name)."""
    if ".inputs." in path:
        node, name = path.rsplit(".inputs.", 1)
    elif "." in path:
        node, name = path.rsplit(".", 1)
    else:
        raise GraphError(f"{path!r} is not NODE.inputs.NAME (e.g. 3.inputs.seed or KSampler.seed)")
    if not node or not name:
        raise GraphError(f"{path!r} is not NODE.inputs.NAME (e.g. 3.inputs.seed or KSampler.seed)")
    return node, name


def get_input(graph: dict, path: str):
    node, name = split_path(path)
    nid = find(graph, node)
    try:
        return graph[nid]["inputs"][name]
    except KeyError:
        raise GraphError(f"node {nid} ({title(graph[nid])}) has no input {name!r}; it has "
                         f"{', '.join(graph[nid]['inputs'])}") from None


def set_input(graph: dict, path: str, value, create: bool = False) -> str:
    """Set one input; returns the canonical path 'ID.inputs.NAME'. An input the node does not
    list is an error unless create=True (optional inputs are often left out)."""
    node, name = split_path(path)
    nid = find(graph, node)
    inputs = graph[nid].setdefault("inputs", {})
    if name not in inputs and not create:
        raise GraphError(f"node {nid} ({title(graph[nid])}) has no input {name!r}; it has {', '.join(inputs)}")
    inputs[name] = value
    return f"{nid}.inputs.{name}"


def shrink(graph: dict, size: int | None = None, sample_steps: int | None = None, train_steps: int | None = None,
           save_every: int | None = None) -> dict:
    """A copy with smaller work: image size (empty latents and dataset loaders), sampler steps,
    trainer steps (and checkpoint interval, default: only the final one). For tests, the
    demo's quick mode and small machines."""
    g = copy.deepcopy(graph)
    for nid, n in g.items():
        inp, ct = n.get("inputs", {}), n["class_type"]
        if size is not None and ct in ("EmptyLatentImage", "LoadImageTextSetFromFolderNode"):
            inp["width"] = inp["height"] = size
        if size is not None and ct == "ImageScaleToTotalPixels":
            # about size x size (its minimum is 0.01 megapixels, ~100 x 100)
            inp["megapixels"] = max(0.01, round(size * size / 2 ** 20, 2))
            inp["resolution_steps"] = 64 if size >= 512 else 8
        if sample_steps is not None and ct in ("KSampler", "KSamplerAdvanced"):
            inp["steps"] = sample_steps
        if train_steps is not None and ct == "PaRaTrainer":
            inp["steps"] = train_steps
            if inp.get("save_every", 0):
                inp["save_every"] = save_every if save_every is not None else train_steps
    return g
