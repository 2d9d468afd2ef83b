"""Sizes and names of the tiny models the webui tier builds: one place read by the Forge copy (config patches)
and by the builder (weights). No torch here: the pytest side imports it to patch JSON configs.

The bundled component configs of the test copy (text encoders, VAE) are shrunk to these sizes; the
transformer/UNet sizes are read from tensor shapes by the patched huggingface_guess, so flux_a and flux_b
(and sdxl_a and sdxl_b) may differ in width. Tokenizers stay real: the vocab sizes are theirs.
"""

from __future__ import annotations

CLIP_VOCAB = 49408  # the bundled CLIP tokenizers (SDXL's two and FLUX's CLIP-L)
T5_VOCAB = 32128  # the bundled T5 tokenizer (FLUX text_encoder_2)

# CLIP-L, as FLUX's text_encoder and SDXL's text_encoder (one size, so a text-encoder LoRA fits both)
CLIP_L = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, projection_dim=64)
# open-CLIP ViT-bigG, as SDXL's text_encoder_2 (CLIPTextModelWithProjection)
CLIP_G = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, projection_dim=64)
T5 = dict(d_model=64, d_ff=128, d_kv=32, num_heads=2, num_layers=2, num_decoder_layers=2)
CLIP_POSITIONS = 77

# VAEs: 4 levels (8x down-sampling, as Forge assumes), 32 channels (GroupNorm has 32 groups)
VAE_BLOCKS = [32, 32, 32, 32]
VAE_LAYERS_PER_BLOCK = 1
FLUX_LATENT_CHANNELS = 16
SDXL_LATENT_CHANNELS = 4

# FLUX.1-dev layout (guidance_in present) with the real 19 double / 38 single blocks, tiny widths.
FLUX_DOUBLE_BLOCKS = 19
FLUX_SINGLE_BLOCKS = 38
FLUX = {
    "flux_a": dict(hidden=64, heads=2, seed=1),
    "flux_b": dict(hidden=96, heads=3, seed=2),
    "flux_c": dict(hidden=64, heads=2, seed=3),  # flux_a's widths, other weights: a refiner the LoRAs fit
}

# SDXL layout: 3 levels of 2 ResBlocks, linear proj_in/out, label_emb (adm), 64 channels per head as in SDXL.
# output_blocks.0.1 holds 4 transformer blocks (FreeFuse's SDXL capture block defaults to index 3).
SDXL_TRANSFORMER_DEPTH = [0, 0, 1, 1, 4, 4]
SDXL_TRANSFORMER_DEPTH_OUTPUT = [0, 0, 0, 1, 1, 1, 4, 4, 4]
SDXL_TRANSFORMER_DEPTH_MIDDLE = 1
SDXL_CHANNEL_MULT = [1, 2, 4]
SDXL_HEAD_CHANNELS = 64
SDXL_CONTEXT = CLIP_L["hidden_size"] + CLIP_G["hidden_size"]  # cond_l and cond_g side by side
SDXL_ADM = CLIP_G["projection_dim"] + 6 * 256  # pooled CLIP-G + six 256-wide size/crop embeddings
SDXL = {
    "sdxl_a": dict(model_channels=32, seed=11),
    "sdxl_b": dict(model_channels=64, seed=12),
}

# GGUF FLUX transformers (flux_a's weights, quantised) and the separate modules they need.
GGUF = {
    "flux_a_Q8_0": "Q8_0",
    "flux_a_Q4_0": "Q4_0",
    "flux_a_Q4_K": "Q4_K",  # Q4_K where a row is a multiple of 256 values, Q8_0 elsewhere (like *_K_S files)
}
FLUX_TEXT_ENCODER_FILES = ["flux_clip_l.safetensors", "flux_t5.safetensors"]  # models/text_encoder
FLUX_VAE_FILE = "flux_vae.safetensors"  # models/VAE
GGUF_MODULES = [FLUX_VAE_FILE, *FLUX_TEXT_ENCODER_FILES]  # forge_additional_modules for a GGUF checkpoint

# LoRAs (models/Lora). Subject LoRAs fit flux_a (and its GGUF versions) or sdxl_a.
FLUX_SUBJECT_LORAS = {"harry": 101, "daiyu": 102}
FLUX_STYLE_LORAS = {"watercolor": 103}
SDXL_SUBJECT_LORAS = {"asuka": 201, "rei": 202}
SDXL_STYLE_LORAS = {"inkwash": 203}
TEXT_ENCODER_LORAS = {"clip_l_te": 301}  # CLIP-L only (lora_te1_*): fits flux_a, flux_b, sdxl_a and sdxl_b
LORA_RANK = 4
