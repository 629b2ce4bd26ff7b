"""Registry packaging: pyproject.toml read the way ComfyUI's own comfy_config reads a custom
node's; the workflow templates where the server serves them, with their pictures; and what the
registry archive holds: `comfy node pack` / `comfy node publish` archive the git-tracked files
minus the gitignore-style patterns of .comfyignore (checked here with git's own matcher, the
syntax comfy-cli reads)."""
import json
import re
import shutil
import subprocess

import pytest

from harness import comfyui
from workflow_helpers import UI_DIR, WORKFLOWS_DIR, ui_workflows

ROOT = comfyui.PACK_ROOT
TEMPLATES = sorted(p.stem for p in UI_DIR.glob("*.json"))


@pytest.mark.comfyui
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


@pytest.mark.parametrize("name", TEMPLATES)
def test_each_template_has_the_picture_the_templates_menu_shows(name):
    """ComfyUI's templates menu (0.3.64's and 0.33's frontends) shows <name>.jpg from the folder
    of <name>.json on each template's card."""
    image = pytest.importorskip("PIL.Image")
    path = UI_DIR / f"{name}.jpg"
    assert path.is_file(), f"no {path.name} beside {name}.json (python workflows/make_ui.py --thumbnails)"
    with image.open(path) as im:
        assert im.format == "JPEG" and min(im.size) >= 256


@pytest.mark.comfyui
def test_templates_route_lists_and_serves_the_shipped_workflows_and_no_tool(comfy_server):
    """GET /api/workflow_templates lists this pack's templates, and /api/workflow_templates/<pack>/
    serves each one's JSON and picture; the Python tools, API graphs, sweeps and screenshots in
    workflows/ (a folder name ComfyUI also serves templates from) are neither listed nor served."""
    def get(path):
        status, body = comfy_server.client.request("GET", path)
        return status, body if status == 200 else b""

    status, body = get("/api/workflow_templates")
    assert status == 200
    pack = comfyui.PACK_DIR_NAME
    assert UI_DIR.name == "example_workflows"  # the folder name current ComfyUI asks for
    assert sorted(json.loads(body)[pack]) == TEMPLATES == sorted(ui_workflows())
    for name in TEMPLATES:
        status, body = get(f"/api/workflow_templates/{pack}/{name}.json")
        assert status == 200 and json.loads(body) == ui_workflows()[name]
        assert get(f"/api/workflow_templates/{pack}/{name}.jpg") == (200, (UI_DIR / f"{name}.jpg").read_bytes())
    tools = sorted(p.relative_to(WORKFLOWS_DIR).as_posix() for p in WORKFLOWS_DIR.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts)
    assert "demo.py" in tools and "batch.py" in tools
    served = [t for t in tools if get(f"/api/workflow_templates/{pack}/{t}")[0] != 404]
    assert served == []


# ------------------------------------------------------------------------------------------
# The registry archive
# ------------------------------------------------------------------------------------------

LEFT_OUT = ("tests/", ".ci/", "bench/results/", "workflows/screenshots/")


def git(*args: str) -> list[str]:
    out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


@pytest.fixture(scope="module")
def archive() -> set[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the registry archive is made from git-tracked files")
    tracked = set(git("ls-files"))
    ignored = set(git("ls-files", "--cached", "--ignored", "--exclude-from=.comfyignore"))
    return tracked - ignored


def test_archive_holds_what_a_user_runs(archive):
    needed = {"__init__.py", "pyproject.toml", "requirements.txt", "LICENSE", "README.md", "workflows/demo.py",
              "workflows/batch.py"}
    needed |= {p for p in git("ls-files", "para_core", "nodes", "example_workflows", "docs", "workflows/api",
                              "harness")}  # harness/: the demo's and batch tool's server and client
    assert any(p.endswith(".jpg") for p in needed) and any(p.startswith("docs/") for p in needed)
    assert sorted(needed - archive) == []


def test_archive_leaves_out_tests_ci_benchmark_results_and_screenshots(archive):
    assert sorted(p for p in archive if p.startswith(LEFT_OUT)) == []


def test_no_shipped_tool_needs_a_folder_the_archive_leaves_out(archive):
    reaches = re.compile(r"sys\.path\.(?:insert|append)\(.*[\"'](?:tests|\.ci)[\"']")
    needing = sorted(p for p in archive if p.endswith(".py") and reaches.search((ROOT / p).read_text()))
    assert needing == []
