"""The pack's ComfyUI harness, shared by the tests, the demo, the batch tool and the benchmarks.

    harness.comfyui   find a ComfyUI checkout, configure and import it in this process, import the pack
    harness.server    start and stop a ComfyUI server (main.py in a subprocess, its folders in a temp dir)
    harness.client    one HTTP + websocket client for a running server (aiohttp)
    harness.models    test models built without downloads: a tiny in-process SD1.5, the SD1.5 test checkpoint
    harness.families  small SDXL / SD2-v / SD3 / Flux / Lumina 2 models that ComfyUI detects as those families

Import the module you need (``from harness import server``). Every module imports only the
standard library at module level (client.py: aiohttp too), so importing one never imports torch
or ComfyUI; the functions that need them import them.
"""
