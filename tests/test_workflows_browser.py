"""The shipped UI workflows in the real ComfyUI frontend (the comfyui-frontend-package the server
serves), in headless Chromium: each loads with no missing-nodes dialog and no console error,
the frontend reads back the same nodes, links and widget values, and a screenshot of it is
saved: into workflows/screenshots/<name>.png (the pictures the docs show) when
PARA_UPDATE_SCREENSHOTS=1 is set, else into the test's temporary folder, so a test run never
changes the checkout.

The browser is Debian's chromium (or $CHROMIUM), driven by Playwright (pip package playwright;
its own browser downloads are never needed)."""
import io
import json
import os
import shutil
import time

import pytest

from workflow_helpers import WORKFLOWS_DIR, install_placeholders, ui_workflows

pytestmark = [pytest.mark.comfyui, pytest.mark.server, pytest.mark.slow]

SHOTS = WORKFLOWS_DIR / "screenshots"


@pytest.fixture(scope="module")
def shots_dir(tmp_path_factory):
    """Where the screenshots go: the committed pictures only when asked to update them."""
    if os.environ.get("PARA_UPDATE_SCREENSHOTS") == "1":
        return SHOTS
    return tmp_path_factory.mktemp("screenshots")
# Settings for a clean first start: no template browser, no minimap, no canvas statistics, the
# open workflows listed in the side bar rather than as tabs above the canvas.
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "Comfy.Validation.Workflows": True, "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"}
# The canvas part of a screenshot (left of it: the side bar, whose open-workflow count changes;
# above it: the menu bar with the workflow's name).
CANVAS_BOX = (64, 40)
# Visible dialogs (0.3.64's frontend reports missing nodes in one), and 0.33's notification
# panel, whose title reads "Missing node: <type>".
DIALOGS_JS = ("Array.from(document.querySelectorAll('.p-dialog')).filter(d => d.offsetParent !== null)"
              ".map(d => d.innerText.trim().slice(0, 400)).concat("
              "Array.from(document.querySelectorAll('span, div')).filter(e => e.children.length === 0 && "
              "e.offsetParent !== null && /^Missing node/.test((e.innerText || '').trim()))"
              ".map(e => e.innerText.trim().slice(0, 400)))")


CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in ((os.environ.get("CHROMIUM"),) if os.environ.get("CHROMIUM") else ()) + CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Frontend:
    """One Playwright page on the ComfyUI frontend; collects console errors, uncaught exceptions
    and failed loads (Chromium reports those on the console) as they come."""

    def __init__(self, page):
        self.page = page
        self.events: list[str] = []
        page.on("console", lambda m: self.events.append(f"console: {m.text} {m.location.get('url', '')}".strip())
                if m.type in ("error", "assert") else None)
        page.on("pageerror", lambda e: self.events.append(f"exception: {e}"))

    def evaluate(self, expression: str):
        return self.page.evaluate(expression)

    def wait_for(self, expression: str, timeout: float = 60):
        self.page.wait_for_function(expression, timeout=timeout * 1000, polling=200)

    def screenshot(self) -> bytes:
        return self.page.screenshot()

    def console_errors(self, since: int = 0) -> list[str]:
        """The errors seen since event index `since` (use len(frontend.events) as a mark)."""
        return list(self.events[since:])


def frontend_present() -> bool:
    try:
        import comfyui_frontend_package  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def browser(comfy_server, sd15_checkpoint):
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("Chromium not found: apt-get install chromium (or set CHROMIUM=/path/to/chrome)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install -r requirements-dev.txt")
    if not frontend_present():
        pytest.skip("the ComfyUI frontend (pip package comfyui-frontend-package) is not installed")
    install_placeholders(comfy_server, sd15_checkpoint)
    comfy_server.client.post("/settings", SETTINGS)
    from workflows import make_ui
    width, height = make_ui.WINDOW
    with sync_playwright() as pw:
        chrome = pw.chromium.launch(executable_path=chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            b = Frontend(chrome.new_page(viewport={"width": width, "height": height}, device_scale_factor=1))
            b.page.goto(comfy_server.url + "/")
            b.wait_for("!!(window.app && window.app.graph && document.querySelector('canvas'))", timeout=120)
            time.sleep(1.0)
            b.page_errors = b.console_errors()
            yield b
        finally:
            chrome.close()


def load(browser, workflow: dict, name: str):
    mark = len(browser.events)
    browser.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()); true")
    # 0.33's frontend resolves loadGraphData only once its missing-nodes dialog is closed: wait
    # for the promise or for a dialog, whichever comes first.
    browser.evaluate(f"window.__paraLoaded = false; app.loadGraphData({json.dumps(workflow)}, true, true, "
                     f"{json.dumps(name)}).then(() => {{ window.__paraLoaded = true; }}); true")
    browser.wait_for(f"window.__paraLoaded || ({DIALOGS_JS}).length > 0", timeout=60)
    time.sleep(0.8)  # dialogs open and the canvas draws after the promise resolves
    return browser.console_errors(mark), browser.evaluate(DIALOGS_JS)


def test_page_loads_the_pack_without_errors(browser):
    ours = [e for e in browser.page_errors if "PaRa" in e or "custom_nodes" in e or "extensions" in e]
    assert not ours, ours
    assert browser.evaluate("Object.keys(LiteGraph.registered_node_types).filter(t => t.startsWith('PaRa')).length") == 7


@pytest.mark.parametrize("name", sorted(ui_workflows()))
def test_workflow_loads_in_the_frontend(browser, name, comfyui_version, shots_dir):
    from workflows import api_graph
    from workflows import make_ui
    chosen = api_graph.for_comfyui(name, comfyui_version)
    if chosen != name:  # its nodes are not in this ComfyUI (test_workflows checks that)
        pytest.skip(f"{name} is not for ComfyUI {comfyui_version}: {chosen} is")
    workflow = ui_workflows()[name]
    errors, dialogs = load(browser, workflow, name)
    assert not dialogs, f"dialog after loading {name}: {dialogs}"
    assert not errors, f"console errors while loading {name}: {errors}"
    # what the frontend holds now is what the file says
    graph = json.loads(browser.evaluate("JSON.stringify(app.graph.serialize())"))
    ours = {n["id"]: n for n in workflow["nodes"]}
    theirs = {n["id"]: n for n in graph["nodes"]}
    assert set(theirs) == set(ours)
    for nid, n in ours.items():
        assert theirs[nid]["type"] == n["type"]
        assert theirs[nid].get("widgets_values", []) == n.get("widgets_values", []), f"node {nid} ({n['type']})"

    def by_name(g):
        nodes = {n["id"]: n for n in g["nodes"]}
        return sorted((l[1], l[2], l[3], nodes[l[3]]["inputs"][l[4]]["name"], l[5]) for l in g["links"])
    assert by_name(graph) == by_name(workflow)
    # The README's pictures come from the frontend of the version whose schemas made the file.
    if make_ui.made_with(name) == comfyui_version:
        save_screenshot(browser.screenshot(), shots_dir / f"{name}.png")


def test_a_missing_node_is_reported_by_the_frontend(browser):
    """The check above would see the frontend's missing-nodes dialog."""
    workflow = json.loads(json.dumps(ui_workflows()["2_generate_with_para_file"]))
    node = next(n for n in workflow["nodes"] if n["type"] == "PaRaLoader")
    node["type"] = "PaRaLoaderThatDoesNotExist"
    _errors, dialogs = load(browser, workflow, "missing_node_check")
    assert any("PaRaLoaderThatDoesNotExist" in d for d in dialogs), dialogs
    browser.evaluate("document.querySelectorAll('.p-dialog-close-button').forEach(b => b.click()); true")


def save_screenshot(png: bytes, path):
    """Save as a small palette PNG; leave the file alone when its canvas is unchanged (so test
    runs do not rewrite committed pictures for nothing). The palette comes from the picture
    without the parts that change from run to run (the workflow's name, the side bar's count),
    so an unchanged canvas quantizes to the same pixels."""
    from PIL import Image, ImageDraw
    full = Image.open(io.BytesIO(png)).convert("RGB")
    ref = full.copy()
    d = ImageDraw.Draw(ref)
    d.rectangle([0, 0, CANVAS_BOX[0], full.height], fill=(34, 34, 34))
    d.rectangle([0, 0, 400, CANVAS_BOX[1]], fill=(34, 34, 34))
    palette = ref.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    img = full.quantize(palette=palette, dither=Image.Dither.NONE)
    if path.exists():
        try:
            old = Image.open(path).convert("RGB")
        except OSError:
            old = None
        box = (*CANVAS_BOX, img.width, img.height)
        if old is not None and old.size == img.size and \
                old.crop(box).tobytes() == img.convert("RGB").crop(box).tobytes():
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
