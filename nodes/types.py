"""The PARA socket type: carries a para_core.ParaState between nodes."""
from comfy_api.latest import io

PARA = io.Custom("PARA")
