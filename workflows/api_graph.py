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


def names() -> list[str]:
    """The shipped API workflows (file stems in workflows/api)."""
    return sorted(p.stem for p in API_DIR.glob("*.json"))


def load(name_or_path) -> dict:
    """A shipped workflow by name ("1_train_subject") or any API-format JSON file."""
    p = Path(name_or_path)
    if not p.suffix and not p.exists():
        p = API_DIR / f"{name_or_path}.json"
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
        if sample_steps is not None and ct in ("KSampler", "KSamplerAdvanced"):
            inp["steps"] = sample_steps
        if train_steps is not None and ct == "PaRaTrainer":
            inp["steps"] = train_steps
            if inp.get("save_every", 0):
                inp["save_every"] = save_every if save_every is not None else train_steps
    return g
