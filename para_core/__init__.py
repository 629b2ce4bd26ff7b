"""PaRa core: parameter rank reduction for diffusion models, in plain torch.

No ComfyUI imports here (tests and the CLI run without ComfyUI).
"""
from .reduction import (RankCap, basis, basis_batched, effective_rank, reduce_activation, reduce_weight,
                        reduce_weight_general, reduction_delta)
from .merge import MERGE_MODES, merge_factors, merge_sequential, merge_states, merge_sum, merge_union
from .presets import DEFAULT_PRESET, PRESET_NAMES, PRESETS, PresetError, select_layers
from .fileformat import (FORMAT_VERSION, FingerprintWarning, ParaError, ParaState, atomic_save_safetensors,
                         build_metadata, check_fingerprint, check_fits, fingerprint, kohya_name, load_para,
                         resolve_layers, save_para)
from .export import export_lora, lora_keys

__version__ = "0.1.0"
