"""PaRa core: parameter rank reduction for diffusion models, in plain torch.

No ComfyUI imports here (tests and the CLI run without ComfyUI). The math of each
parametrization is in functional/ (projection.py: W0 - s U (V^T W0); reference.py: W0 - s U D);
the file format in state.py, read.py, write.py and fit.py.

The public names are imported on first use (PEP 562), so that `python -m para_core` answers
a usage error or a wrong path without importing torch (about 4 s). A new public name goes
into _EXPORTS.
"""
import importlib

_EXPORTS = {
    "errors": ("FingerprintWarning", "ParaError"),
    "functional.base": ("RankCap", "effective_rank"),
    "functional.projection": ("basis", "basis_batched"),
    "functional.reference": ("DEFAULT_PARAMETRIZATION", "PARAMETRIZATIONS"),
    "state": ("ParaState", "reference_state"),
    "read": ("load_para",),
    "write": ("FORMAT_VERSION", "atomic_save_safetensors", "build_metadata", "save_para"),
    "fit": ("check_fingerprint", "check_fits", "fingerprint", "kohya_name", "resolve_layers"),
    "merge": ("MERGE_MODES", "merge_factors", "merge_sequential", "merge_states", "merge_sum", "merge_union"),
    "presets": ("DEFAULT_PRESET", "PRESET_NAMES", "PRESETS", "PresetError", "select_layers"),
    "export": ("export_lora", "lora_keys"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)

__version__ = "0.1.0"


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_MODULE_OF))
