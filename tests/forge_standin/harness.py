"""The test Harness (see notes/harness_interface.md) on top of the stand-in Forge backend.

Build the harness only while the stand-in is installed (the `harness` fixture does); it imports the
`backend` modules when constructed, never at import time.

Conventions shared with the real tier (tests/forge/harness*.py), so both draw the same numbers:
- weights drawn in state-dict order from one generator seeded with `seed`: Linear/Conv weights
  N(0, std^2) with std = clamp(0.5/sqrt(fan_in), 0.02, 0.1), fan_in = prod(shape[1:]); biases
  N(0, 0.02^2); norm scales (RMSNorm `.scale`, GroupNorm/LayerNorm 1-D `.weight`) 1 + N(0, 0.1^2);
- tiny FLUX: in_channels 16 (x 2 x 2 patch = 64 features), axes_dim from `axes_dim_for(head_dim)`, theta
  10000, qkv_bias True, mlp_ratio 4;
- tiny SDXL: see harness_sdxl.py (EPS predictor, 4 latent channels, kohya LoRAs incl. conv LoCon);
- predictor as Forge's diffusion_engine/flux.py picks it: dev (guidance) the resolution-shift
  PredictionFlux (mu 1.15), schnell mu=1.0; sigmas from Forge's "Simple" scheduler;
- LoRAs: per layer in module order, down then up: down [r, in(, kh, kw)] ~ N(0, scale^2/fan_in), up
  [out, r(, 1, 1)] ~ N(0, scale^2/rank); kohya files carry alpha = rank / 2, diffusers files carry no
  alpha (factor 1);
- conds: noise [B, C_latent, H/8, W/8], then crossattn, vector ~ N(0, 1) (and guidance 3.5 per row for
  FLUX dev); an uncond (drawn after the cond) only when cfg != 1, otherwise None as in Forge's txt2img;
- sigmas: Forge's "Simple" schedule from the predictor's table (PredictionFlux or the EPS Prediction).
"""

import importlib
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .harness_sdxl import SDXL_REPO, SDXL_SCHEDULER, is_unet, sdxl_conds, sdxl_lora_layers, sdxl_unet_config

LATENT_CHANNELS = 16
DISTILLED_GUIDANCE = 3.5
DEV_REPO = "black-forest-labs/FLUX.1-dev"
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"


@dataclass
class LoraFile:
    filename: str
    name: str
    state_dict: dict = field(repr=False)


def axes_dim_for(head_dim: int) -> list[int]:
    """Even RoPE axis sizes summing to head_dim, split like FLUX's [16, 56, 56] of 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head dim {head_dim} must be even and at least 6")
    first = max(2, 2 * (head_dim // 16))
    second = 2 * ((head_dim - first) // 4)
    return [first, second, head_dim - first - second]


def _weight_std(fan_in: int) -> float:
    return min(0.1, max(0.02, 0.5 / math.sqrt(fan_in)))


def _random_state_dict(model: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        noise = torch.randn(value.shape, generator=gen)
        if key.endswith(".scale") or (key.endswith(".weight") and value.ndim == 1):  # norm scales
            state[key] = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            state[key] = 0.02 * noise
        else:
            state[key] = _weight_std(math.prod(value.shape[1:])) * noise
    return state


def _lora_factors(weight_shape, rank: int, scale: float, gen: torch.Generator):
    """(down, up), down drawn first. Linear [out, in]: down [r, in], up [out, r]; conv [out, in, kh, kw]
    (LoCon): down [r, in, kh, kw] (fan_in = in*kh*kw), up [out, r, 1, 1]."""
    n_out, n_in, *kernel = weight_shape
    fan_in = n_in * math.prod(kernel)
    down = torch.randn(rank, n_in, *kernel, generator=gen) * (scale / math.sqrt(fan_in))
    up = torch.randn(n_out, rank, *[1] * len(kernel), generator=gen) * (scale / math.sqrt(rank))
    return down, up


# diffusers names -> (stand-in module inside the block, rows it feeds: None = all, else "h" or "mlp")
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", "h"),
    "attn.to_k": ("img_attn.qkv", "h"),
    "attn.to_v": ("img_attn.qkv", "h"),
    "attn.add_q_proj": ("txt_attn.qkv", "h"),
    "attn.add_k_proj": ("txt_attn.qkv", "h"),
    "attn.add_v_proj": ("txt_attn.qkv", "h"),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", "h"),
    "attn.to_k": ("linear1", "h"),
    "attn.to_v": ("linear1", "h"),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_DIFFUSERS_ATTN_ONLY = {
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
}
_KOHYA_ATTN_ONLY = ("_attn.qkv", "_attn.proj", ".linear1")


def _lora_layers(model, fmt: str, attn_only: bool, get_attr) -> list:
    """(lora key prefix, [out, in] of the delta) for every targeted FLUX layer, in module order."""
    layers = []
    if fmt == "kohya":
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            in_blocks = name.startswith(("double_blocks.", "single_blocks."))
            if not in_blocks or weight is None or weight.ndim != 2:
                continue
            if attn_only and not name.endswith(_KOHYA_ATTN_ONLY):
                continue
            layers.append(("lora_unet_" + name.replace(".", "_"), weight.shape))
        return layers
    hidden = model.hidden_size
    for kind, blocks, table in (
        ("transformer_blocks", model.double_blocks, _DIFFUSERS_DOUBLE),
        ("single_transformer_blocks", model.single_blocks, _DIFFUSERS_SINGLE),
    ):
        for i, block in enumerate(blocks):
            for diffusers_name, (module_name, rows) in table.items():
                if attn_only and diffusers_name.removeprefix("attn.") not in _DIFFUSERS_ATTN_ONLY:
                    continue
                n_out, n_in = get_attr(block, module_name).weight.shape
                n_out = {None: n_out, "h": hidden, "mlp": int(hidden * 4)}[rows]
                layers.append((f"transformer.{kind}.{i}.{diffusers_name}", (n_out, n_in)))
    return layers


class StandinHarness:
    name = "standin"

    def __init__(self):
        self.flux_module = importlib.import_module("backend.nn.flux")
        self._utils = importlib.import_module("backend.utils")
        self._lora = importlib.import_module("backend.patcher.lora")
        self._unet = importlib.import_module("backend.patcher.unet")
        self.unet_module = importlib.import_module("backend.nn.unet")
        self._prediction = importlib.import_module("backend.modules.k_prediction")
        self._memory = importlib.import_module("backend.memory_management")
        self._condition = importlib.import_module("backend.sampling.condition")
        self._sampling = importlib.import_module("backend.sampling.sampling_function")

    # --- model -------------------------------------------------------------------------------------

    def make_flux_unet(
        self,
        *,
        n_double: int = 3,
        n_single: int = 2,
        hidden: int = 64,
        heads: int = 2,
        context_dim: int = 32,
        vec_dim: int = 16,
        guidance: bool = True,
        seed: int = 0,
        dtype=torch.float32,
    ):
        config = dict(
            in_channels=LATENT_CHANNELS,
            vec_in_dim=vec_dim,
            context_in_dim=context_dim,
            hidden_size=hidden,
            mlp_ratio=4.0,
            num_heads=heads,
            depth=n_double,
            depth_single_blocks=n_single,
            axes_dim=axes_dim_for(hidden // heads),
            theta=10000,
            qkv_bias=True,
            guidance_embed=guidance,
        )
        model = self.flux_module.IntegratedFluxTransformer2DModel(**config)
        model.load_state_dict(_random_state_dict(model, seed))
        self._set_loader_attributes(model, config, dtype)
        if guidance:  # diffusion_engine/flux.py: dev gets the resolution-shift predictor, schnell mu=1
            repo, predictor = (
                DEV_REPO,
                self._prediction.PredictionFlux(
                    seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15
                ),
            )
        else:
            repo, predictor = SCHNELL_REPO, self._prediction.PredictionFlux(mu=1.0)
        return self._unet.UnetPatcher.from_model(
            model,
            diffusers_scheduler=None,
            config=SimpleNamespace(huggingface_repo=repo),
            k_predictor=predictor,
        )

    def make_sdxl_unet(
        self,
        *,
        model_channels: int = 32,
        transformer_depth=(0, 0, 1, 1, 2, 2),
        transformer_depth_middle: int = 1,
        transformer_depth_output=(0, 0, 0, 1, 1, 1, 2, 2, 2),
        channel_mult=(1, 2, 4),
        num_head_channels: int = 16,
        context_dim: int = 32,
        adm_in_channels: int = 16,
        seed: int = 0,
        dtype=torch.float32,
    ):
        """A tiny random SDXL-layout UNet, wrapped as diffusion_engine/sdxl.py does (EPS predictor from the
        scheduler config, KModel, UnetPatcher)."""
        config = sdxl_unet_config(
            model_channels=model_channels,
            transformer_depth=transformer_depth,
            transformer_depth_middle=transformer_depth_middle,
            transformer_depth_output=transformer_depth_output,
            channel_mult=channel_mult,
            num_head_channels=num_head_channels,
            context_dim=context_dim,
            adm_in_channels=adm_in_channels,
        )
        model = self.unet_module.IntegratedUNet2DConditionModel(**config)
        model.load_state_dict(_random_state_dict(model, seed))
        self._set_loader_attributes(model, config, dtype)
        return self._unet.UnetPatcher.from_model(
            model,
            diffusers_scheduler=SDXL_SCHEDULER,
            config=SimpleNamespace(huggingface_repo=SDXL_REPO, unet_config=config),
        )

    @staticmethod
    def _set_loader_attributes(model, config: dict, dtype) -> None:
        """What backend/loader.py sets on a freshly loaded diffusion model (all on the CPU here)."""
        model.to(dtype)
        cpu = torch.device("cpu")
        model.storage_dtype = model.computation_dtype = dtype
        model.load_device = model.offload_device = model.initial_device = cpu
        model.config = config

    # --- LoRAs ---------------------------------------------------------------------------------------

    def make_lora(
        self,
        unet,
        *,
        name: str,
        rank: int = 4,
        fmt: str = "kohya",
        seed: int = 0,
        targets: str = "all",
        scale: float = 0.5,
    ) -> LoraFile:
        """FLUX: kohya or diffusers, targets "all" / "attn". SDXL: kohya only, targets "all" (Linears of
        the transformers + ResBlock conv LoCon), "linear" or "attn" (see harness_sdxl.py)."""
        model = unet.model.diffusion_model
        if is_unet(model):
            if fmt != "kohya":
                raise ValueError(f"SDXL LoRAs are kohya files here, not {fmt!r}")
            layers = sdxl_lora_layers(model, targets)
        elif fmt not in ("kohya", "diffusers") or targets not in ("all", "attn"):
            raise ValueError(f"unknown fmt {fmt!r} or targets {targets!r}")
        else:
            layers = _lora_layers(model, fmt, targets == "attn", self._utils.get_attr)
        gen = torch.Generator().manual_seed(seed)
        state = {}
        for prefix, weight_shape in layers:
            down, up = _lora_factors(weight_shape, rank, scale, gen)  # [r, in(, kh, kw)], [out, r(, 1, 1)]
            if fmt == "kohya":
                state[f"{prefix}.lora_down.weight"] = down
                state[f"{prefix}.lora_up.weight"] = up
                state[f"{prefix}.alpha"] = torch.tensor(rank / 2.0)
            else:
                state[f"{prefix}.lora_A.weight"] = down
                state[f"{prefix}.lora_B.weight"] = up
        return LoraFile(filename=f"{name}.safetensors", name=name, state_dict=state)

    def add_loras(self, unet, loras: list):
        """As Forge's networks.load_lora_for_models does for the unet, one LoRA after another."""
        for lora, weight in loras:
            key_map = self._lora.model_lora_keys_unet(unet.model, {})
            patches, unmatched = self._lora.load_lora(lora.state_dict, key_map)
            if len(unmatched) > 12:  # networks.py: "version mismatch", the LoRA is skipped
                continue
            clone = unet.clone()
            loaded = clone.add_patches(
                filename=lora.filename, patches=patches, strength_patch=weight, online_mode=False
            )
            if len(patches) - len(loaded) <= 12:  # networks.py: too many skipped keys -> not applied
                unet = clone
        return unet

    def merged_weight(self, unet, key: str) -> torch.Tensor:
        """Parameter `key` (relative to the KModel) as the shared model holds it now."""
        return self._utils.get_attr(unet.model, key).detach().float().clone()

    # --- sampling ------------------------------------------------------------------------------------

    def sigmas(self, unet, steps: int) -> torch.Tensor:
        """Forge's "Simple" schedule: `steps` sigmas evenly picked from the predictor's table, then 0."""
        table = unet.model.predictor.sigmas
        stride = len(table) / steps
        return torch.FloatTensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])

    @staticmethod
    def _random_conds(unet, batch: int, n_txt: int, gen: torch.Generator) -> dict:
        """FLUX conds as diffusion_engine/flux.py builds them: T5 crossattn, CLIP pooled vector, guidance;
        SDXL conds from harness_sdxl.sdxl_conds."""
        if is_unet(unet.model.diffusion_model):
            return sdxl_conds(unet.model.diffusion_model, batch, n_txt, gen)
        config = unet.model.diffusion_model.config
        cond = dict(
            crossattn=torch.randn(batch, n_txt, config["context_in_dim"], generator=gen),  # [B, n_txt, ctx]
            vector=torch.randn(batch, config["vec_in_dim"], generator=gen),  # [B, vec]
        )
        if config["guidance_embed"]:
            cond["guidance"] = torch.full((batch,), DISTILLED_GUIDANCE)  # [B]
        return cond

    def _denoise(self, unet, x, sigma, cond, uncond, cfg: float, seed: int):
        """What Forge's sampling_function does per call, for a single-prompt txt2img."""
        model = unet.model
        model_options = unet.model_options
        uncond_c = self._condition.compile_conditions(uncond)
        cond_c = self._condition.compile_conditions(cond)
        cond_c[0]["strength"] = 1.0  # compile_weighted_conditions with one prompt of weight 1
        timestep = sigma
        for modifier in model_options.get("conditioning_modifiers", []):
            model, x, timestep, uncond_c, cond_c, cfg, model_options, seed = modifier(
                model, x, timestep, uncond_c, cond_c, cfg, model_options, seed
            )
        return self._sampling.sampling_function_inner(model, x, timestep, uncond_c, cond_c, cfg, model_options, seed)

    def sample(
        self,
        unet,
        *,
        steps: int = 4,
        cfg: float = 1.0,
        batch: int = 1,
        height: int = 64,
        width: int = 64,
        n_txt: int | None = None,
        seed: int = 0,
        before_sampling=None,
        on_step=None,
        raise_at_step: int | None = None,
    ) -> torch.Tensor:
        """Euler txt2img sampling through the stand-in's sampling_function_inner; the final latent
        [B, C, H/8, W/8] (C = 16 for FLUX, 4 for SDXL). n_txt defaults to 8 (FLUX) / 77 (SDXL)."""
        unet_kind = is_unet(unet.model.diffusion_model)
        if n_txt is None:
            n_txt = 77 if unet_kind else 8
        channels = unet.model.diffusion_model.in_channels if unet_kind else LATENT_CHANNELS
        with torch.inference_mode():  # Forge samples inside inference_mode (processing.py)
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(batch, channels, height // 8, width // 8, generator=gen)
            cond = self._random_conds(unet, batch, n_txt, gen)
            uncond = self._random_conds(unet, batch, n_txt, gen) if cfg != 1.0 else None
            sigmas = self.sigmas(unet, steps)
            x = unet.model.predictor.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
            if before_sampling is not None:
                unet = before_sampling(unet, sigmas, x, cond, uncond)
            self._memory.load_models_gpu([unet])  # sampling_prepare: merges this patcher's LoRA set
            ones = x.new_ones([batch])
            for i in range(steps):
                if on_step is not None:
                    on_step(i)
                if raise_at_step == i:
                    raise RuntimeError("interrupted")
                denoised = self._denoise(unet, x, sigmas[i] * ones, cond, uncond, cfg, seed)
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # Euler
        return x.float().clone()  # a normal tensor again (cloned outside inference mode)
