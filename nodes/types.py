"""The PARA socket type (carries a para_core.ParaState between nodes), and the checks that what
arrives on a MODEL or PARA socket is one: through the API a client can put any literal value
there (``"para": {"a": 1}``, ``"model": "abc"``) and ComfyUI passes it on unchecked."""
from comfy_api.latest import io

from ..para_core import ParaError, ParaState

PARA = io.Custom("PARA")


def _what(value) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text if len(text) <= 40 else text[:37] + '...'})"


def check_para(value, input_name: str = "para"):
    """``value`` if it is a PaRa adapter, else a ParaError naming the input."""
    if isinstance(value, ParaState) or (type(value).__name__ == "ParaState" and hasattr(value, "kind")
                                        and hasattr(value, "layers")):
        return value
    raise ParaError(f"input '{input_name}' got {_what(value)}, not a PaRa adapter (PARA): connect it to the PARA "
                    "output of PaRa Load, PaRa Merge or PaRa Trainer (a value typed into an API prompt cannot be one).")


def check_model(value, input_name: str = "model"):
    """``value`` if it is a ComfyUI model (ModelPatcher), else a ParaError naming the input."""
    import comfy.model_patcher
    if isinstance(value, comfy.model_patcher.ModelPatcher):
        return value
    raise ParaError(f"input '{input_name}' got {_what(value)}, not a MODEL: connect it to a MODEL output (e.g. Load "
                    "Checkpoint or Load Diffusion Model; a value typed into an API prompt cannot be one).")
