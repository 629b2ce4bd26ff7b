"""Registry packaging (issue 12 item 7): pyproject.toml read the way ComfyUI's own comfy_config
reads a custom node's, and the workflow templates where the server serves them."""
import json
import urllib.request

import pytest

import comfy_env

pytestmark = pytest.mark.comfyui


def test_comfy_config_reads_the_registry_fields(comfy_in_process):
    from comfy_config import config_parser
    cfg = config_parser.extract_node_configuration(str(comfy_env.PACK_ROOT))
    assert cfg.project.name == "comfyui-para"
    assert cfg.project.urls.repository.startswith("https://github.com/")
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name == "ComfyUI-PaRa"
    assert cfg.project.supported_comfyui_version == ">=0.3.64"
    assert cfg.project.supported_os == ["OS Independent"]
    # an unknown accelerator string would make comfy_config drop the whole list
    assert "GPU :: NVIDIA CUDA" in cfg.project.supported_accelerators


def test_the_server_lists_and_serves_the_ui_workflows_as_templates(comfy_server):
    from workflow_helpers import UI_DIR, ui_workflows
    with urllib.request.urlopen(comfy_server.url + "/workflow_templates", timeout=30) as r:
        listed = json.loads(r.read())
    assert sorted(listed.get(comfy_env.PACK_DIR_NAME, [])) == sorted(ui_workflows())
    assert UI_DIR.name == "example_workflows"
    name = "2_generate_with_para_file"
    url = f"{comfy_server.url}/api/workflow_templates/{comfy_env.PACK_DIR_NAME}/{name}.json"
    with urllib.request.urlopen(url, timeout=30) as r:
        assert json.loads(r.read()) == ui_workflows()[name]
