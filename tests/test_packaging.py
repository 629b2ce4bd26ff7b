"""Registry packaging (issue 12 item 7): pyproject.toml read the way ComfyUI's own comfy_config
reads a custom node's, and the workflow templates where the server serves them."""

import pytest

from harness import comfyui

pytestmark = pytest.mark.comfyui


def test_comfy_config_reads_the_registry_fields(comfy_in_process):
    from comfy_config import config_parser
    cfg = config_parser.extract_node_configuration(str(comfyui.PACK_ROOT))
    assert cfg.project.name == "comfyui-para"
    assert cfg.project.urls.repository.startswith("https://github.com/")
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name == "ComfyUI-PaRa"
    assert cfg.project.supported_comfyui_version == ">=0.3.64"
    assert cfg.project.supported_os == ["OS Independent"]
    # an unknown accelerator string would make comfy_config drop the whole list
    assert "GPU :: NVIDIA CUDA" in cfg.project.supported_accelerators


def test_the_server_lists_and_serves_the_ui_workflows_as_templates(comfy_server):
    from workflow_helpers import UI_DIR, ui_workflows
    listed = comfy_server.client.get("/workflow_templates")
    assert sorted(listed.get(comfyui.PACK_DIR_NAME, [])) == sorted(ui_workflows())
    assert UI_DIR.name == "example_workflows"
    name = "2_generate_with_para_file"
    assert comfy_server.client.get(f"/api/workflow_templates/{comfyui.PACK_DIR_NAME}/{name}.json") == ui_workflows()[name]
