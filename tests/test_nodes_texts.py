"""What the nodes tell users in the UI (descriptions and tooltips) points to pages that exist:
every ``*.md`` they name is a file of the pack, and they never send users to a section of the
README that moved to docs/ or bench/."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

ROOT = Path(__file__).resolve().parents[1]


def node_texts(mods):
    """(where, text) of every node's description and every input's and output's tooltip."""
    for cls in mods.nodes.all_nodes():
        schema = cls.define_schema()
        yield schema.node_id, schema.description or ""
        for item in list(schema.inputs) + list(schema.outputs):
            yield f"{schema.node_id}.{getattr(item, 'id', None) or getattr(item, 'display_name', '')}", \
                getattr(item, "tooltip", None) or ""


def test_every_page_a_node_names_exists_and_none_points_into_the_readme(mods):
    texts = list(node_texts(mods))
    assert any(where.startswith("PaRaTrainer") for where, _ in texts)
    for where, text in texts:
        for page in re.findall(r"[\w./-]+\.md\b", text):
            assert (ROOT / page).is_file(), f"{where} names {page}, which is not a file of the pack"
        for m in re.finditer(r"README", text):
            before = text[max(0, m.start() - 20):m.end() + 3]
            assert re.search(r"[\w-]+/README\.md", before), f"{where} sends users to the README: {text!r}"
