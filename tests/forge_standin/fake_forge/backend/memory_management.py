"""The part of Forge's memory_management that decides WHEN LoRAs are merged.

Forge's `load_models_gpu(models)` (called by `sampling_prepare` at the start of every sampler run)
skips a patcher object that is already loaded (identity of the patcher, not of the model); for any
other patcher it first unloads loaded clones of the same model, then `model_load` calls
`patcher.refresh_loras()`. Simplified: everything stays on the CPU; no memory accounting, no offload,
no object patches.
"""

import torch

current_loaded_models = []  # patchers, most recently used first
signal_empty_cache = False


def get_torch_device():
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for patcher in models:
        if any(loaded is patcher for loaded in current_loaded_models):
            current_loaded_models.remove(patcher)
            current_loaded_models.insert(0, patcher)
            continue
        current_loaded_models[:] = [m for m in current_loaded_models if not patcher.is_clone(m)]
        patcher.refresh_loras()
        current_loaded_models.insert(0, patcher)


def load_model_gpu(model):
    return load_models_gpu([model])


def unload_all_models():
    current_loaded_models.clear()
