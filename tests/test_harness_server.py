"""harness.server and harness.client against a real ComfyUI server: prompts run, fail, are
rejected and interrupted; outputs come back; /ws reports progress (aiohttp: no websocket-client)."""
import sys
import threading

import pytest

from harness import models
from harness.client import Client, PromptRejected, ServerError
from harness.server import load_latent

pytestmark = pytest.mark.server


def test_server_runs_txt2img_and_saves_an_image(comfy_server):
    result = comfy_server.run(models.txt2img_graph(save="image", prefix="harness"))
    assert result.ok and result.status == "success" and result.error is None
    images = comfy_server.output_files(result, "images")
    assert len(images) == 1 and images[0].is_file() and images[0].suffix == ".png"


def test_the_client_downloads_what_a_prompt_wrote(comfy_server, tmp_path):
    result = comfy_server.run(models.txt2img_graph(save="image", prefix="harness_dl", seed=2))
    [(node, item)] = result.files()
    assert node == "save_image"
    got = comfy_server.client.download(item, tmp_path / "copy.png")
    assert got.read_bytes() == comfy_server.output_files(result, "images")[0].read_bytes()


def test_server_saves_a_latent_that_loads_back(comfy_server, sd15_checkpoint):
    import torch
    import nodes
    result = comfy_server.run(models.txt2img_graph(save="latent", prefix="harness", seed=5))
    files = comfy_server.output_files(result, "latents")
    assert len(files) == 1 and files[0].parent.name == "latents" and files[0].suffix == ".latent"
    latent = load_latent(files[0])
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    # The server and this process compute the same thing from the same file.
    model, clip, _ = nodes.CheckpointLoaderSimple().load_checkpoint(sd15_checkpoint.name)
    (pos,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    (neg,) = nodes.CLIPTextEncode().encode(clip, "")
    here = models.sample_latent(model, pos, neg, seed=5, steps=2, cfg=2.0)
    torch.testing.assert_close(latent, here)


def test_server_reports_progress_on_the_websocket(comfy_server):
    graph = models.txt2img_graph(save="latent", prefix="harness_ws", seed=11, steps=3)
    with comfy_server.client.listen() as ws:
        prompt_id = comfy_server.client.queue(graph)
        comfy_server.wait(prompt_id)
        ws.wait_for(lambda m: m["type"] == "executing" and m.get("node") is None
                    and m.get("prompt_id") == prompt_id, timeout=10)
    progress = ws.of_type("progress", prompt_id)
    assert [p["value"] for p in progress if p.get("node") == "sampler"][-1] == 3


def test_run_hands_each_progress_message_to_on_event_without_websocket_client(comfy_server, monkeypatch):
    # ComfyUI 0.3.64's own Python has no websocket-client: /ws must not need it
    monkeypatch.setitem(sys.modules, "websocket", None)  # `import websocket` raises ImportError
    with Client(comfy_server.url) as c:
        events = []
        res = c.run(models.txt2img_graph(steps=3, seed=12, prefix="ws_check"), timeout=300, on_event=events.append)
        assert c.ws_error is None
    assert res.ok, res.error
    progress = [e for e in events if e["type"] == "progress"]
    assert [e["value"] for e in progress][-1] == 3 and {e["max"] for e in progress} == {3}
    assert any(e["type"] == "executing" and e.get("node") == "sampler" for e in events)


def test_server_rejects_an_invalid_graph_with_its_json_error(comfy_server):
    graph = models.txt2img_graph()
    graph["ckpt"]["inputs"]["ckpt_name"] = "missing.safetensors"
    with pytest.raises(PromptRejected, match="ckpt_name") as err:
        comfy_server.client.queue(graph)
    assert "ckpt" in err.value.body["node_errors"]


def test_server_reports_an_execution_error_message(comfy_server):
    graph = models.txt2img_graph(save="latent", prefix="harness_err", width=64, height=64)
    # A batch index beyond the batch fails inside the node, after validation.
    graph["pick"] = {"class_type": "LatentFromBatch",
                     "inputs": {"samples": ["sampler", 0], "batch_index": 0, "length": 1}}
    graph["bad"] = {"class_type": "LatentUpscaleBy",
                    "inputs": {"samples": ["pick", 0], "upscale_method": "nearest-exact", "scale_by": 0.01}}
    graph["save_latent"]["inputs"]["samples"] = ["bad", 0]
    result = comfy_server.run(graph, check=False)
    assert result.status == "error" and not result.ok
    assert result.message and result.error_node == "bad"
    assert result.error.startswith("LatentUpscaleBy (node bad): ")


def test_server_interrupt_stops_a_running_prompt(comfy_server):
    graph = models.txt2img_graph(save="latent", prefix="harness_cancel", seed=21, steps=500, width=128, height=128)
    with comfy_server.client.listen() as ws:
        prompt_id = comfy_server.client.queue(graph)
        ws.wait_for(lambda m: m["type"] == "progress" and m.get("prompt_id") == prompt_id, timeout=60)
        comfy_server.client.interrupt()
        result = comfy_server.wait(prompt_id, timeout=60)
    assert result.status == "error"
    assert result.message == "interrupted" and result.error_details["event"] == "execution_interrupted"
    assert max(p["value"] for p in ws.of_type("progress", prompt_id)) < 500


# ------------------------------------------------------------------------------------------
# When the server is not there, or its /ws is not
# ------------------------------------------------------------------------------------------

def test_no_server_is_a_server_error():
    from harness.server import free_port
    with Client(f"127.0.0.1:{free_port()}", timeout=5) as c:
        assert not c.alive()
        with pytest.raises(ServerError, match="/queue"):
            c.queue_ids()
        with pytest.raises(ServerError, match="/ws did not answer"):
            c.listen()
        assert c.ws_error


@pytest.fixture
def server_without_ws():
    """An HTTP server that answers /prompt and /history like ComfyUI but has no /ws (as behind a
    proxy that does not pass websockets): the real ComfyUI always has /ws."""
    import asyncio
    from aiohttp import web

    polls = []

    async def prompt(request):
        body = await request.json()
        return web.json_response({"prompt_id": "p1", "number": 0, "node_errors": {}, "client": body["client_id"]})

    async def history(request):
        polls.append(request.match_info["pid"])
        if len(polls) < 3:
            return web.json_response({})
        return web.json_response({"p1": {"status": {"status_str": "success", "messages": []},
                                         "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "",
                                                                      "type": "output"}]}}}})

    app = web.Application()
    app.add_routes([web.post("/prompt", prompt), web.get("/history/{pid}", history)])
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", polls
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_without_ws_run_polls_the_history_and_says_why_there_is_no_progress(server_without_ws):
    url, polls = server_without_ws
    events = []
    with Client(url) as c:
        res = c.run({"9": {"class_type": "SaveImage", "inputs": {}}}, timeout=30, on_event=events.append)
        assert "404" in c.ws_error
    assert res.ok and res.files() == [("9", {"filename": "a.png", "subfolder": "", "type": "output"})]
    assert polls == ["p1"] * 3 and events == []
