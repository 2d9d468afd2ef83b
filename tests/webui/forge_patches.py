"""The test-only changes made to the test copy of Forge (never to a real checkout), each with its reason.

Text patches replace an exact piece of the original source; `apply_patches` asserts the original text is
there once, so a Forge or huggingface_guess change fails loudly here instead of testing something else.
JSON configs are edited as data, again after asserting the original values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.webui import sizes


@dataclass(frozen=True)
class TextPatch:
    path: str  # relative to the Forge copy
    why: str
    old: str
    new: str


HG = "repositories/huggingface_guess/huggingface_guess"

# Each patch anchors on as little of the original as makes it unique, and adds its lines after (or in) it.

# FLUX: huggingface_guess hard-codes FLUX.1's sizes; read them from the tensors instead (after its own lines).
FLUX_SIZES_FROM_SHAPES = TextPatch(
    f"{HG}/detection.py",
    "FLUX detection hard-codes hidden 3072, 24 heads, depths 19/38, context 4096, vec 768: read the shapes",
    old="""        dit_config["axes_dim"] = [16, 56, 56]
""",
    new="""        dit_config["axes_dim"] = [16, 56, 56]
        # freefuse webui tests: sizes from the tensors (a tiny FLUX has the real layout, small widths);
        # int(): a GGUF tensor's shape holds numpy integers, the hard-coded config held Python ints
        def dim(name, axis):
            return int(state_dict['{}{}'.format(key_prefix, name)].shape[axis])

        hidden = dim('img_in.weight', 0)
        head_dim = dim('double_blocks.0.img_attn.norm.key_norm.scale', 0)
        rope_first = max(2, 2 * (head_dim // 16))
        rope_second = 2 * ((head_dim - rope_first) // 4)
        dit_config["in_channels"] = dim('img_in.weight', 1) // 4
        dit_config["vec_in_dim"] = dim('vector_in.in_layer.weight', 1)
        dit_config["context_in_dim"] = dim('txt_in.weight', 1)
        dit_config["hidden_size"] = hidden
        dit_config["mlp_ratio"] = dim('double_blocks.0.img_mlp.0.weight', 0) / hidden
        dit_config["num_heads"] = hidden // head_dim
        dit_config["depth"] = count_blocks(state_dict_keys, '{}double_blocks.'.format(key_prefix) + '{}.')
        dit_config["depth_single_blocks"] = count_blocks(state_dict_keys, '{}single_blocks.'.format(key_prefix) + '{}.')
        dit_config["axes_dim"] = [rope_first, rope_second, head_dim - rope_first - rope_second]
""",
)

# SDXL: the model-config match wants SDXL's exact widths; accept a narrower UNet with SDXL's layout.
SDXL_TINY_MATCH = TextPatch(
    f"{HG}/model_list.py",
    "SDXL matching requires 320 channels / context 2048 / adm 2816 / depths (0,0,2,2,10,10): also accept a "
    "narrower UNet of SDXL's layout (3 levels, linear proj, label_emb, attention in levels 1-2)",
    old="""class SDXL(BASE):
""",
    new="""class SDXL(BASE):
    @classmethod
    def matches(s, unet_config, state_dict=None):
        if BASE.matches.__func__(s, unet_config, state_dict):
            return True
        # freefuse webui tests: a tiny UNet with SDXL's layout (not for subclasses such as SSD-1B)
        depth = list(unet_config.get("transformer_depth") or [])
        return (
            s is SDXL
            and unet_config.get("model_channels", 320) < 320
            and unet_config.get("in_channels") == 4
            and unet_config.get("use_linear_in_transformer") is True
            and unet_config.get("adm_in_channels") is not None
            and unet_config.get("use_temporal_attention") is False
            and len(depth) == 6 and depth[:2] == [0, 0] and min(depth[2:]) > 0
        )

""",
)

# Separate CLIP-L file (a GGUF checkpoint's text encoder): Forge only accepts a 768-wide CLIP-L.
CLIP_L_FILE_WIDTH = TextPatch(
    "backend/loader.py",
    "a separate CLIP-L file is only recognised when 768 wide: also accept the tiny width",
    old="asd[CLIP_key].shape[0] == 768",
    new=f"asd[CLIP_key].shape[0] in (768, {sizes.CLIP_L['hidden_size']})",
)

TEXT_PATCHES = [FLUX_SIZES_FROM_SHAPES, SDXL_TINY_MATCH, CLIP_L_FILE_WIDTH]

FLUX_REPO = "backend/huggingface/black-forest-labs/FLUX.1-dev"
SDXL_REPO = "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0"


def _clip_config(dims: dict) -> dict:
    return {**dims, "max_position_embeddings": sizes.CLIP_POSITIONS, "vocab_size": sizes.CLIP_VOCAB}


def _vae_config(latent_channels: int) -> dict:
    return {
        "block_out_channels": sizes.VAE_BLOCKS,
        "layers_per_block": sizes.VAE_LAYERS_PER_BLOCK,
        "latent_channels": latent_channels,
    }


# (config file, values the original must have, values the copy gets): every component a checkpoint
# brings is built from these bundled configs, so they must match the tiny weights.
CLIP_L_WAS = {"hidden_size": 768, "num_hidden_layers": 12}
CONFIG_PATCHES = [
    (f"{FLUX_REPO}/text_encoder/config.json", CLIP_L_WAS, _clip_config(sizes.CLIP_L)),
    (
        f"{FLUX_REPO}/text_encoder_2/config.json",
        {"d_model": 4096, "num_layers": 24, "vocab_size": sizes.T5_VOCAB},
        sizes.T5,
    ),
    (
        f"{FLUX_REPO}/vae/config.json",
        {"latent_channels": 16, "layers_per_block": 2},
        _vae_config(sizes.FLUX_LATENT_CHANNELS),
    ),
    (f"{SDXL_REPO}/text_encoder/config.json", CLIP_L_WAS, _clip_config(sizes.CLIP_L)),
    (
        f"{SDXL_REPO}/text_encoder_2/config.json",
        {"hidden_size": 1280, "num_hidden_layers": 32},
        _clip_config(sizes.CLIP_G),
    ),
    (
        f"{SDXL_REPO}/vae/config.json",
        {"latent_channels": 4, "layers_per_block": 2},
        _vae_config(sizes.SDXL_LATENT_CHANNELS),
    ),
]


def apply_patches(forge: Path) -> list[str]:
    """Apply every patch to the Forge copy at `forge`; return one line per patch for the log."""
    done = []
    for patch in TEXT_PATCHES:
        file = forge / patch.path
        text = file.read_text(encoding="utf-8")
        count = text.count(patch.old)
        assert count == 1, f"{patch.path}: the text to patch was found {count} times (Forge changed?): {patch.why}"
        file.write_text(text.replace(patch.old, patch.new), encoding="utf-8")
        done.append(f"{patch.path}: {patch.why}")
    for path, expected, values in CONFIG_PATCHES:
        file = forge / path
        config = json.loads(file.read_text(encoding="utf-8"))
        changed = {k: config.get(k) for k in expected if config.get(k) != expected[k]}
        assert not changed, f"{path}: expected {expected}, found {changed} (Forge changed?)"
        config.update(values)
        file.write_text(json.dumps(config, indent=2), encoding="utf-8")
        done.append(f"{path}: tiny sizes {values}")
    return done
