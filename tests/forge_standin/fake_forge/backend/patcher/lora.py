"""Stand-in of Forge's backend/patcher/lora.py: LoRA key map, patch loading, weight merging, LoraLoader.

Layouts mirrored from Forge (dfdcbab6):
- `model_lora_keys_unet(model)` -> {lora key prefix: target}; target = "diffusion_model.X.weight" or
  (model_key, (dim, start, size)) for diffusers q/k/v/proj_mlp slices of fused weights, or
  (model_key, None, swap_scale_shift) for norm_out.linear.
- `load_lora(lora_sd, key_map)` -> (patch_dict, unmatched_sd); patch_dict[target] =
  ("lora", (up, down, alpha, mid, dora_scale)).
- `merge_lora_to_weight(patches, weight, key)` with patch entries [strength, v, strength_model, offset,
  function]: W[offset] += function(strength * alpha / rank * up @ down), computed in float32.
- `LoraLoader.refresh(lora_patches)`: hashes the identifiers only, restores its own backups, then
  merges every (key, online_mode) group; online groups are attached as `forge_online_loras`.
- SD/SDXL UNets: every parameter answers to its kohya name through the generic rule, e.g.
  "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_q" -> "diffusion_model.output_blocks.0.1.
  transformer_blocks.0.attn2.to_q.weight"; conv LoCon (down [r, in, kh, kw], up [out, r, 1, 1]) merges
  as up.flatten(1) @ down.flatten(1) reshaped to the conv weight [out, in, kh, kw], as in Forge; diffusers
  UNet names (unet_lora_keys.unet_to_diffusers) answer as "lora_unet_<diffusers_name>", "lycoris_...",
  and "[unet.]<diffusers.name with .processor.to_*>" (to_out.0 -> to_out).

Simplified: only the "lora" (up/down, no LoCon mid, no DoRA), "diff" and "set" patch types; no loha,
lokr, glora or BFL-control conversion (the stand-in raises NotImplementedError where Forge would
merge them); no bnb / GGUF dequantise-requantise, no parameter device bookkeeping; no CLIP key map;
`key_map` defaults to a fresh dict (Forge's default is a shared mutable dict).
"""

import torch

from backend import utils
from backend.patcher.flux_lora_keys import flux_to_diffusers
from backend.patcher.unet_lora_keys import unet_to_diffusers

CPU = torch.device("cpu")

# (up suffix, down suffix, mid suffix) per naming scheme, in Forge's order of preference
_LORA_NAMES = (
    (".lora_up.weight", ".lora_down.weight", ".lora_mid.weight"),  # kohya
    ("_lora.up.weight", "_lora.down.weight", None),  # diffusers
    (".lora_B.weight", ".lora_A.weight", None),  # diffusers / peft
    (".lora.up.weight", ".lora.down.weight", None),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", None),  # transformers
)


def model_lora_keys_unet(model, key_map=None) -> dict:
    """LoRA key prefixes this KModel answers to (kohya, generic; diffusers names for SD/SDXL UNets and
    for FLUX repos)."""
    key_map = {} if key_map is None else key_map
    prefix = "diffusion_model."
    for k in model.state_dict():
        if not k.startswith(prefix):
            continue
        if k.endswith(".weight"):
            path = k[len(prefix) : -len(".weight")]
            key_map[f"lora_unet_{path.replace('.', '_')}"] = k
            key_map[k[: -len(".weight")]] = k
        else:
            key_map[k] = k
    for name, path in unet_to_diffusers(model.diffusion_model.config).items():  # {} unless a UNet config
        if name.endswith(".weight"):
            stem, target = name[: -len(".weight")], prefix + path
            key_map[f"lora_unet_{stem.replace('.', '_')}"] = target
            key_map[f"lycoris_{stem.replace('.', '_')}"] = target
            peft = stem.replace(".to_", ".processor.to_")  # diffusers attention-processor LoRA names
            if peft.endswith(".to_out.0"):
                peft = peft[: -len(".0")]
            for head in ("", "unet."):
                key_map[head + peft] = target
    if "flux" in model.config.huggingface_repo.lower():
        for name, target in flux_to_diffusers(model.diffusion_model.config, output_prefix=prefix).items():
            if name.endswith(".weight"):
                stem = name[: -len(".weight")]
                key_map[f"transformer.{stem}"] = target
                key_map[f"lycoris_{stem.replace('.', '_')}"] = target
                key_map[f"lora_transformer_{stem.replace('.', '_')}"] = target
    return key_map


def load_lora(lora: dict, to_load: dict):
    """Turn a LoRA state dict into Forge's patch dict; returns (patch_dict, keys it did not use)."""
    patch_dict, used = {}, set()
    for prefix, target in to_load.items():

        def take(suffix, prefix=prefix):
            name = prefix + suffix
            if name in lora:
                used.add(name)
                return lora[name]
            return None

        alpha = take(".alpha")
        alpha = alpha.item() if alpha is not None else None
        dora_scale = take(".dora_scale")
        for up_suffix, down_suffix, mid_suffix in _LORA_NAMES:
            if prefix + up_suffix in lora:
                up, down = take(up_suffix), take(down_suffix)
                mid = take(mid_suffix) if mid_suffix else None
                patch_dict[target] = ("lora", (up, down, alpha, mid, dora_scale))
                break
        for suffix in (".hada_w1_a", ".lokr_w1", ".lokr_w2", ".a1.weight", ".w_norm", ".diff", ".set_weight"):
            if prefix + suffix in lora:
                raise NotImplementedError(f"stand-in load_lora: {suffix} patches are not supported")
    unmatched = {k: v for k, v in lora.items() if k not in used}
    return patch_dict, unmatched


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    """A new tensor: `weight` with every patch entry [strength, v, strength_model, offset, fn] applied."""
    original_dtype = weight.dtype
    weight = weight.clone() if weight.dtype == computation_dtype else weight.to(computation_dtype)
    for strength, v, strength_model, offset, function in patches:
        function = function if function is not None else (lambda a: a)
        target = weight.narrow(offset[0], offset[1], offset[2]) if offset is not None else weight
        if strength_model != 1.0:
            target *= strength_model
        kind, data = ("diff", v) if len(v) == 1 else v
        if kind == "diff":
            target += strength * data[0].to(target.device, target.dtype)
        elif kind == "set":
            target.copy_(data[0])
        elif kind == "lora":
            up, down, alpha, mid, dora_scale = data
            if mid is not None or dora_scale is not None:
                raise NotImplementedError(f"stand-in merge: LoCon mid / DoRA on {key}")
            up = up.to(target.device, computation_dtype)
            down = down.to(target.device, computation_dtype)
            factor = alpha / down.shape[0] if alpha is not None else 1.0
            diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(target.shape)
            target += function(((strength * factor) * diff).type(target.dtype))
        else:
            raise NotImplementedError(f"stand-in merge: patch type {kind!r} on {key}")
    return weight.to(original_dtype)


class LoraLoader:
    """One per model (stored as `model.lora_loader`, shared by every patcher clone)."""

    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=CPU, force_refresh=False):
        hashes = str(list(lora_patches.keys()))  # identifiers only, never the patch contents
        if hashes == self.loaded_hash and not force_refresh:
            return

        grouped = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, entries in patches.items():
                grouped[(key, online_mode)] = grouped.get((key, online_mode), []) + entries

        for module in set(self.online_backup):
            del module.forge_online_loras
        self.online_backup = []
        for key, original in self.backup.items():
            utils.set_attr_raw(self.model, key, utils.tensor2parameter(original))
        self.backup = {}

        for (key, online_mode), entries in grouped.items():
            try:
                parent, child, weight = utils.get_attr_with_parent(self.model, key)
                assert isinstance(weight, torch.nn.Parameter)
            except (AttributeError, AssertionError) as error:
                raise ValueError(f"Wrong LoRA Key: {key}") from error
            if online_mode:
                if not hasattr(parent, "forge_online_loras"):
                    parent.forge_online_loras = {}
                parent.forge_online_loras[child] = entries
                self.online_backup.append(parent)
                continue
            if key not in self.backup:
                self.backup[key] = weight.to(device=offload_device)
            merged = merge_lora_to_weight(entries, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(merged, requires_grad=False))

        self.loaded_hash = hashes
