"""A tiny GGUF FLUX for the real-Forge tier, made and loaded the way a user's .gguf file is.

The random weights (harness_conventions.random_weights) are written to a .gguf file with the gguf package Forge
bundles (packages_3rdparty/gguf): every Linear weight quantised (Q8_0 and Q4_0 with gguf's own quantiser; K-quants,
which it cannot quantise, as valid Q4_K blocks drawn at random), everything else F32. The file is read back with
Forge's ``backend.utils.load_torch_file`` (one ``ParameterGGUF`` per tensor, its shape in numpy integers) and the
model is built as backend/loader.py builds a pre-quantised one: ``using_forge_operations(bnb_dtype="gguf")``,
``load_state_dict``, then the KModel / UnetPatcher wrapping of harness_flux.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tests.forge.harness_common import parameter_shapes
from tests.forge_common.harness_conventions import flux_predictor, random_weights

Q4_K_BLOCK = 256  # values per Q4_K block: 2 bytes d, 2 bytes dmin, 12 bytes scales, 128 bytes of 4-bit values


def _q4_k_blocks(rows: int, cols: int, gen: np.random.Generator) -> np.ndarray:
    """Random, well-formed Q4_K data for a [rows, cols] weight: small scales, centred values."""
    n_blocks = rows * cols // Q4_K_BLOCK
    d = np.full((n_blocks, 1), 1e-4, dtype=np.float16).view(np.uint8)
    dmin = np.full((n_blocks, 1), 7e-4, dtype=np.float16).view(np.uint8)
    scales = gen.integers(0, 64, size=(n_blocks, 12), dtype=np.uint8)
    values = gen.integers(0, 256, size=(n_blocks, 128), dtype=np.uint8)
    return np.concatenate([d, dmin, scales, values], axis=1).reshape(rows, cols // Q4_K_BLOCK * 144)


def _quantised(gguf, array: np.ndarray, qtype, gen: np.random.Generator) -> np.ndarray:
    """gguf's own quantiser where it has one; random well-formed blocks for Q4_K, which it cannot quantise."""
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return _q4_k_blocks(*array.shape, gen)
    return gguf.quants.quantize(array, qtype)


def write_gguf(forge, weights: dict[str, torch.Tensor], path: Path, qtype_name: str, seed: int) -> None:
    import gguf  # Forge's bundled package (packages_3rdparty is on sys.path once the harness imported Forge)

    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    block = Q4_K_BLOCK if qtype_name.endswith("_K") else 32
    gen = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, value in weights.items():
        array = value.float().numpy()
        if array.ndim == 2 and key.endswith(".weight") and array.shape[1] % block == 0:
            writer.add_tensor(key, _quantised(gguf, array, qtype, gen), raw_dtype=qtype)
        else:
            writer.add_tensor(key, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_gguf_flux_unet(forge, config: dict, seed: int, qtype_name: str, path: Path):
    """A UnetPatcher around a FLUX loaded from a .gguf of random weights (see the module docstring)."""

    def make():
        return forge.flux.IntegratedFluxTransformer2DModel(**config)

    write_gguf(forge, random_weights(parameter_shapes(make), seed, torch.float32), path, qtype_name, seed)
    state_dict = forge.utils.load_torch_file(str(path))
    mm = forge.memory_management
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    computation_dtype = torch.float32
    with forge.operations.using_forge_operations(
        device=load_device, dtype=computation_dtype, manual_cast_enabled=False, bnb_dtype="gguf"
    ):
        dm = make()
    forge.state_dict.load_state_dict(dm, state_dict)
    dm.config = config
    dm.storage_dtype = "gguf"
    dm.computation_dtype = computation_dtype
    dm.load_device = load_device
    dm.initial_device = load_device
    dm.offload_device = offload_device
    repo, predictor_kwargs = flux_predictor(config["guidance_embed"])
    return forge.unet.UnetPatcher.from_model(
        model=dm,
        diffusers_scheduler=None,
        k_predictor=forge.k_prediction.PredictionFlux(**predictor_kwargs),
        config=SimpleNamespace(huggingface_repo=repo, unet_config=config),
    )
