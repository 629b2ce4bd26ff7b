"""ComfyUI side of the pack: the PaRa weight adapter and the nodes (V3 schema)."""
from __future__ import annotations

import logging

from comfy_api.latest import ComfyExtension, io

from .adapters import register as register_adapters
from .para_nodes import NODES, register_folder, remove_crash_leftovers

log = logging.getLogger("ComfyUI-PaRa")


def all_nodes() -> list:
    nodes = list(NODES)
    try:
        from .trainer_node import PaRaTrainer
        nodes.insert(0, PaRaTrainer)
    except ImportError as e:  # a ComfyUI without what the trainer needs still gets the other nodes
        log.warning("PaRa: trainer unavailable: %s", e)
    return nodes


class PaRaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


def setup() -> None:
    register_folder()
    register_adapters()
    try:
        remove_crash_leftovers()
    except Exception as e:  # a cleanup must never keep the pack from loading
        log.warning("PaRa: could not clean up unfinished files: %s", e)


async def comfy_entrypoint() -> PaRaExtension:
    setup()
    return PaRaExtension()
