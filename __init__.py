"""ComfyUI-PaRa: PaRa (Parameter Rank Reduction, ICLR 2025) for ComfyUI.

ComfyUI imports this file as a custom node pack and calls ``comfy_entrypoint``. Imported anywhere
else (tests, tools) it defines nothing, so the pure-torch core stays usable without ComfyUI.
"""
try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = None
