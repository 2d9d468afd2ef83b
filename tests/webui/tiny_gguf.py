"""GGUF FLUX transformers (city96 layout: bare transformer keys, 1-D tensors F32) written with the gguf package
Forge bundles (packages_3rdparty/gguf), read back and dequantised with it as a self-check.

Q8_0 and Q4_0 use gguf's own quantisers. gguf has no K-quant quantiser, so Q4_K blocks are packed here
(d, dmin, 6-bit scales/mins, 4-bit values, laid out as gguf's Q4_K.dequantize_blocks reads them); a
tensor whose rows are not a multiple of 256 values stays Q8_0, as in mixed *_K_S files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

QK_K = 256


def _pack_q4_k(rows: np.ndarray) -> np.ndarray:
    """float32 [..., n * 256] -> Q4_K bytes [..., n * 144]."""
    blocks = rows.reshape(-1, 8, 32).astype(np.float32)  # [n_blocks, sub-block, value]
    low = np.minimum(blocks.min(-1), 0.0)  # [n_blocks, 8], the value of q = 0 (<= 0: mins are >= 0)
    step = (blocks.max(-1) - low) / 15.0  # [n_blocks, 8]
    d = np.maximum(step.max(-1), 1e-8) / 63.0  # [n_blocks]
    dmin = np.maximum((-low).max(-1), 1e-8) / 63.0
    d, dmin = d.astype(np.float16), dmin.astype(np.float16)
    sc = np.clip(np.round(step / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)  # [n_blocks, 8]
    mn = np.clip(np.round(-low / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    scale = d.astype(np.float32)[:, None] * sc  # what dequantisation multiplies q by
    offset = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.round((blocks + offset[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    q = q.reshape(-1, 4, 2, 32)  # sub-blocks 2g (low nibbles) and 2g+1 (high nibbles) share 32 bytes
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    packed_scales = np.concatenate(
        [
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=-1,
    )
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed_scales, qs], -1)
    return out.reshape(*rows.shape[:-1], rows.shape[-1] // QK_K * 144)


def _encode(gguf, array: np.ndarray, wanted: str):
    """(bytes or float array, GGML type) for one tensor of a `wanted` (Q8_0 | Q4_0 | Q4_K) file."""
    types = gguf.GGMLQuantizationType
    if array.ndim < 2:
        return array.astype(np.float32), types.F32
    if wanted == "Q4_K" and array.shape[-1] % QK_K == 0:
        return _pack_q4_k(array), types.Q4_K
    qtype = types.Q8_0 if wanted == "Q4_K" else getattr(types, wanted)
    if array.shape[-1] % 32:
        return array.astype(np.float16), types.F16
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(path: Path, weights: dict[str, torch.Tensor], wanted: str) -> dict[str, int]:
    """Write `weights` (bare FLUX transformer keys) as a `wanted` GGUF file; return {type name: tensor count}."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    counts: dict[str, int] = {}
    for name, tensor in weights.items():
        data, qtype = _encode(gguf, tensor.float().numpy(), wanted)
        writer.add_tensor(name, data, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _check_readback(gguf, path, weights)
    return counts


def _check_readback(gguf, path: Path, weights: dict[str, torch.Tensor]) -> None:
    """Every tensor dequantises (gguf's reference code) to its original shape and values, within 4-bit error."""
    reader = gguf.GGUFReader(str(path))
    assert len(reader.tensors) == len(weights), f"{path}: {len(reader.tensors)} tensors, wrote {len(weights)}"
    for tensor in reader.tensors:
        original = weights[tensor.name].float().numpy()
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
        error = float(np.abs(values - original).max())
        limit = 0.15 * float(np.abs(original).max()) + 1e-6
        assert error <= limit, f"{path}: {tensor.name} ({tensor.tensor_type.name}) dequantises off by {error}"
