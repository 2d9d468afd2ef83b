"""Real-Forge test harness: a tiny random-weight FLUX built from a Forge checkout's own `backend/` code.

Everything that matters is Forge's: the model classes (`backend.nn.flux`), the operations swap
(`backend.operations.using_forge_operations`), the wrapping (`KModel` in `UnetPatcher.from_model`), the
LoRA key map and patch building (`model_lora_keys_unet`, `load_lora`, `ModelPatcher.add_patches`), the
merge (`sampling_prepare` -> `memory_management.load_models_gpu` -> `LoraLoader.refresh`) and the
denoiser (`backend.sampling.sampling_function.sampling_function`). This file is glue: it makes random
weights and LoRA files, and stands in for the webui objects that `sampling_function` reads
(`CFGDenoiser`, `p`, the stacked prompt conds).

Interface: /work/notes/harness_interface.md (same as tests/forge_standin/harness.py).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace

import torch

FORGE_FLAGS = ("--always-cpu", "--attention-pytorch")
LATENT_CHANNELS = 16
DISTILLED_GUIDANCE = 3.5
DEV_REPO = "black-forest-labs/FLUX.1-dev"
SCHNELL_REPO = "black-forest-labs/FLUX.1-schnell"


@dataclass
class LoraFile:
    """A LoRA 'on disk': Forge keys its patches by `filename`; `state_dict` is what the file holds."""

    filename: str
    name: str
    state_dict: dict[str, torch.Tensor]


def import_forge(forge_dir: str | Path) -> SimpleNamespace:
    """Import Forge's backend from a checkout, on the CPU.

    `backend.args` parses sys.argv once, at import, so the flags are put there for the import only.
    """
    root = Path(forge_dir).resolve()
    if not (root / "backend" / "nn" / "flux.py").is_file():
        raise FileNotFoundError(f"FORGE_DIR={root} does not look like a Forge checkout (no backend/nn/flux.py)")
    for path in (root / "packages_3rdparty", root):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))

    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "forge", *FORGE_FLAGS]
    try:
        import backend.args as forge_args
        import backend.memory_management as memory_management
        import backend.modules.k_prediction as k_prediction
        import backend.nn.flux as flux
        import backend.operations as operations
        import backend.patcher.lora as lora
        import backend.patcher.unet as unet
        import backend.sampling.sampling_function as sampling_function
        import backend.state_dict as state_dict
        import backend.utils as utils
    finally:
        sys.argv = saved_argv

    if not forge_args.args.always_cpu:
        raise RuntimeError("backend.args was parsed before the harness could pass --always-cpu")
    return SimpleNamespace(
        root=root,
        flux=flux,
        operations=operations,
        memory_management=memory_management,
        k_prediction=k_prediction,
        lora=lora,
        unet=unet,
        sampling=sampling_function,
        state_dict=state_dict,
        utils=utils,
    )


class _PromptConds(dict):
    """Stacked prompt conds, as the webui hands them to `sampling_function`.

    Stands in for `modules.prompt_parser.DictWithShape` (that module needs `lark`): a dict of tensors
    with `.shape` (of `crossattn`) and `advanced_indexing(rows)`, which `compile_weighted_conditions` uses.
    """

    @property
    def shape(self) -> torch.Size:
        return self["crossattn"].shape

    def advanced_indexing(self, rows: list[int]) -> _PromptConds:
        return _PromptConds({k: v[rows] for k, v in self.items() if isinstance(v, torch.Tensor)})


def rope_axes_dim(head_dim: int) -> list[int]:
    """Even RoPE axis sizes summing to `head_dim`, split like FLUX's [16, 56, 56] of 128."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head dim {head_dim} must be even and at least 6")
    first = max(2, (head_dim // 8) // 2 * 2)
    second = ((head_dim - first) // 2) // 2 * 2
    return [first, second, head_dim - first - second]


def flux_config(
    *, n_double: int, n_single: int, hidden: int, heads: int, context_dim: int, vec_dim: int, guidance: bool
) -> dict:
    """The keyword arguments of IntegratedFluxTransformer2DModel (what huggingface_guess would give)."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not divisible by heads {heads}")
    return dict(
        in_channels=LATENT_CHANNELS,  # the model multiplies by 4 (2x2 patches): img_in takes 64
        vec_in_dim=vec_dim,
        context_in_dim=context_dim,
        hidden_size=hidden,
        mlp_ratio=4.0,
        num_heads=heads,
        depth=n_double,
        depth_single_blocks=n_single,
        axes_dim=rope_axes_dim(hidden // heads),
        theta=10000,
        qkv_bias=True,
        guidance_embed=guidance,
    )


def simple_sigmas(predictor, steps: int) -> torch.Tensor:
    """Forge's "Simple" schedule (the FLUX preset default): `steps` evenly spaced entries of the
    predictor's sigma table, from the top, then 0. For PredictionFlux that is
    time_shift(mu, 1 - i/steps) when steps divides the table length (10000)."""
    table = predictor.sigmas  # [10000], ascending
    n = len(table)
    picked = [float(table[n - 1 - (i * n) // steps]) for i in range(steps)]
    return torch.tensor([*picked, 0.0], dtype=torch.float32)


@contextlib.contextmanager
def _one_thread():
    """One intra-op thread: on tensors this small, thread hand-offs cost ~10x the maths."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _weight_std(fan_in: int) -> float:
    return min(0.1, max(0.02, 0.5 / math.sqrt(fan_in)))


# Diffusers/ai-toolkit FLUX LoRA names -> (Forge module inside the block, rows of its weight as
# (start, size) in units of `hidden` or `mlp`, or None for the whole weight).
_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", (0, 1)),
    "attn.to_k": ("img_attn.qkv", (1, 1)),
    "attn.to_v": ("img_attn.qkv", (2, 1)),
    "attn.add_q_proj": ("txt_attn.qkv", (0, 1)),
    "attn.add_k_proj": ("txt_attn.qkv", (1, 1)),
    "attn.add_v_proj": ("txt_attn.qkv", (2, 1)),
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
    "attn.to_q": ("linear1", (0, 1)),
    "attn.to_k": ("linear1", (1, 1)),
    "attn.to_v": ("linear1", (2, 1)),
    "proj_mlp": ("linear1", "mlp"),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_DIFFUSERS_ATTN = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj"}
_DIFFUSERS_ATTN |= {"attn.add_v_proj", "attn.to_out.0", "attn.to_add_out"}
_KOHYA_ATTN_SUFFIXES = ("_attn.qkv", "_attn.proj", ".linear1")


class ForgeHarness:
    """The real tier of the harness interface, on Forge's own backend code (CPU, float32)."""

    name = "forge"

    def __init__(self, forge_dir: str | Path):
        self.forge = import_forge(forge_dir)
        self.flux_module: ModuleType = self.forge.flux

    # ------------------------------------------------------------------ model
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
        dtype: torch.dtype = torch.float32,
    ):
        """A tiny random FLUX built and wrapped the way backend/loader.py and diffusion_engine/flux.py do."""
        with _one_thread():
            return self._make_flux_unet(n_double, n_single, hidden, heads, context_dim, vec_dim, guidance, seed, dtype)

    def _make_flux_unet(self, n_double, n_single, hidden, heads, context_dim, vec_dim, guidance, seed, dtype):
        f = self.forge
        config = flux_config(
            n_double=n_double,
            n_single=n_single,
            hidden=hidden,
            heads=heads,
            context_dim=context_dim,
            vec_dim=vec_dim,
            guidance=guidance,
        )
        weights = self._random_weights(config, seed, dtype)

        mm = f.memory_management
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        n_params = sum(t.numel() for t in weights.values())
        initial_device = mm.unet_inital_load_device(parameters=n_params, dtype=dtype)
        with f.operations.using_forge_operations(device=initial_device, dtype=dtype, manual_cast_enabled=False):
            dm = f.flux.IntegratedFluxTransformer2DModel(**config).to(device=initial_device, dtype=dtype)
        f.state_dict.load_state_dict(dm, weights)
        unloaded = [n for n, m in dm.named_modules() if hasattr(m, "dummy")]
        if unloaded:
            raise RuntimeError(f"Forge layers left without weights: {unloaded[:5]}")

        dm.config = config
        dm.storage_dtype = dtype
        dm.computation_dtype = dtype
        dm.load_device = load_device
        dm.initial_device = initial_device
        dm.offload_device = offload_device

        if guidance:  # diffusion_engine/flux.py: dev gets the resolution-shift predictor, schnell mu=1
            repo = DEV_REPO
            predictor = f.k_prediction.PredictionFlux(
                seq_len=4096, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15
            )
        else:
            repo = SCHNELL_REPO
            predictor = f.k_prediction.PredictionFlux(mu=1.0)
        estimated_config = SimpleNamespace(huggingface_repo=repo, unet_config=config)
        return f.unet.UnetPatcher.from_model(
            model=dm, diffusers_scheduler=None, k_predictor=predictor, config=estimated_config
        )

    def _random_weights(self, config: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Seeded normal weights for every parameter of the model (names and shapes from a meta build
        with plain torch layers, which have the same parameters as Forge's)."""
        with torch.device("meta"):
            shapes = {
                k: v.shape for k, v in self.forge.flux.IntegratedFluxTransformer2DModel(**config).state_dict().items()
            }
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for key, shape in shapes.items():
            noise = torch.randn(shape, generator=gen)
            if key.endswith(".scale"):  # RMSNorm of QKNorm
                value = 1.0 + 0.1 * noise
            elif key.endswith(".bias"):
                value = 0.02 * noise
            else:
                value = _weight_std(shape[1]) * noise
            weights[key] = value.to(dtype)
        return weights

    # ------------------------------------------------------------------ LoRAs
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
        """A random LoRA for `unet`'s model. kohya: `lora_unet_<module>` with down/up/alpha (alpha =
        rank/2) on whole double/single-block Linears. diffusers: `transformer.<diffusers name>.lora_A/B`
        without alpha; q/k/v and proj_mlp target row slices of Forge's fused qkv / linear1.
        targets "all": every Linear of the double and single blocks (attention, MLP, modulation);
        "attn": attention only (kohya: *_attn.qkv/proj and single linear1; diffusers: to_q/k/v/out and
        add_* of the double blocks, to_q/k/v of the single blocks)."""
        if fmt not in ("kohya", "diffusers"):
            raise ValueError(f"fmt must be 'kohya' or 'diffusers', not {fmt!r}")
        if targets not in ("all", "attn"):
            raise ValueError(f"targets must be 'all' or 'attn', not {targets!r}")
        shapes = self._lora_targets(unet, fmt, targets)  # {lora key prefix: (out, in)}
        gen = torch.Generator().manual_seed(seed)
        sd: dict[str, torch.Tensor] = {}
        for prefix, (n_out, n_in) in shapes.items():
            down = torch.randn(rank, n_in, generator=gen) * (scale / math.sqrt(n_in))  # [r, in]
            up = torch.randn(n_out, rank, generator=gen) * (scale / math.sqrt(rank))  # [out, r]
            if fmt == "kohya":
                sd[f"{prefix}.lora_down.weight"] = down
                sd[f"{prefix}.lora_up.weight"] = up
                sd[f"{prefix}.alpha"] = torch.tensor(rank / 2.0)
            else:
                sd[f"{prefix}.lora_A.weight"] = down
                sd[f"{prefix}.lora_B.weight"] = up
        return LoraFile(filename=f"{name}.safetensors", name=name, state_dict=sd)

    def _lora_targets(self, unet, fmt: str, targets: str) -> dict[str, tuple[int, int]]:
        dm = unet.model.diffusion_model
        hidden = dm.hidden_size
        out: dict[str, tuple[int, int]] = {}
        if fmt == "kohya":
            for mod_name, module in dm.named_modules():
                if not mod_name.startswith(("double_blocks.", "single_blocks.")):
                    continue
                if getattr(module, "weight", None) is None or module.weight.ndim != 2:
                    continue
                if targets == "attn" and not mod_name.endswith(_KOHYA_ATTN_SUFFIXES):
                    continue
                n_out, n_in = module.weight.shape
                out["lora_unet_" + mod_name.replace(".", "_")] = (n_out, n_in)
            return out

        for kind, table in (
            ("transformer_blocks", _DIFFUSERS_DOUBLE),
            ("single_transformer_blocks", _DIFFUSERS_SINGLE),
        ):
            blocks = dm.double_blocks if kind == "transformer_blocks" else dm.single_blocks
            for i, block in enumerate(blocks):
                for diff_name, (forge_name, rows) in table.items():
                    if targets == "attn" and diff_name not in _DIFFUSERS_ATTN:
                        continue
                    n_out, n_in = self.forge.utils.get_attr(block, forge_name).weight.shape
                    if rows == "mlp":
                        n_out = block.mlp_hidden_dim
                    elif rows is not None:
                        n_out = rows[1] * hidden
                    out[f"transformer.{kind}.{i}.{diff_name}"] = (n_out, n_in)
        return out

    def add_loras(self, unet, loras: list[tuple[LoraFile, float]]):
        """The unet half of extensions-builtin/sd_forge_lora/networks.py load_lora_for_models, per LoRA:
        Forge's key map, Forge's load_lora, clone, add_patches (offline). The input is not modified."""
        lora_mod = self.forge.lora
        for lora_file, weight in loras:
            key_map = lora_mod.model_lora_keys_unet(unet.model)  # called as networks.py:18 calls it
            patches, unmatched = lora_mod.load_lora(lora_file.state_dict, key_map)
            if len(unmatched) > 12:  # networks.py:25-27: "version mismatch", LoRA skipped
                continue
            if not patches:
                continue
            new_unet = unet.clone()
            loaded = new_unet.add_patches(
                filename=lora_file.filename, patches=patches, strength_patch=weight, online_mode=False
            )
            skipped = [k for k in patches if k not in loaded]
            if len(skipped) <= 12:  # networks.py:38-42
                unet = new_unet
        return unet

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        unet,
        *,
        steps: int = 4,
        cfg: float = 1.0,
        batch: int = 1,
        height: int = 64,
        width: int = 64,
        n_txt: int = 8,
        seed: int = 0,
        before_sampling: Callable | None = None,
        on_step: Callable[[int], None] | None = None,
        raise_at_step: int | None = None,
    ) -> torch.Tensor:
        """Euler sampling through Forge's sampling_function, in inference mode as processing.py runs it."""
        with _one_thread():
            return self._sample(
                unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step
            )

    def _sample(self, unet, steps, cfg, batch, height, width, n_txt, seed, before_sampling, on_step, raise_at_step):
        f = self.forge
        dm = unet.model.diffusion_model
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, LATENT_CHANNELS, height // 8, width // 8, generator=gen)  # [B,16,H/8,W/8]
        cond = self._random_conds(dm, batch, n_txt, gen)
        uncond = self._random_conds(dm, batch, n_txt, gen) if cfg != 1.0 else None  # processing.py: uc=None at CFG 1

        with torch.inference_mode():
            predictor = unet.model.predictor
            sigmas = simple_sigmas(predictor, steps)
            x = predictor.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))  # = noise * sigmas[0]
            if before_sampling is not None:
                unet = before_sampling(unet, sigmas, x, cond, uncond)
            f.sampling.sampling_prepare(unet, x=x)  # load_models_gpu -> LoadedModel.model_load -> refresh_loras

            denoiser = SimpleNamespace(  # the parts of CFGDenoiser that sampling_function reads
                inner_model=SimpleNamespace(inner_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=unet))),
                p=SimpleNamespace(seeds=[seed]),
                step=0,
                total_steps=steps,
            )
            composition = [[(row, 1.0)] for row in range(batch)]  # one prompt, weight 1, per image
            image_cond = x.new_zeros(batch, 5, 1, 1)  # txt2img dummy image conditioning (ignored)
            for i in range(steps):
                denoiser.step = i
                if on_step is not None:
                    on_step(i)
                if raise_at_step == i:
                    raise RuntimeError("interrupted")
                sigma = sigmas[i] * x.new_ones(batch)  # [B]
                params = SimpleNamespace(  # fields of modules.script_callbacks.CFGDenoiserParams
                    x=x,
                    image_cond=image_cond,
                    sigma=sigma,
                    sampling_step=i,
                    total_sampling_steps=steps,
                    text_cond=cond,
                    text_uncond=uncond,
                    denoiser=denoiser,
                )
                denoised, _, _ = f.sampling.sampling_function(
                    denoiser, denoiser_params=params, cond_scale=cfg, cond_composition=composition
                )
                x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])  # Euler
            f.sampling.sampling_cleanup(unet)
        return x.float().clone()

    @staticmethod
    def _random_conds(dm, batch: int, n_txt: int, gen: torch.Generator) -> _PromptConds:
        """FLUX conds like diffusion_engine/flux.py get_learned_conditioning: T5 crossattn, CLIP pooled
        vector and (dev only) the distilled guidance per image."""
        conds = _PromptConds(
            crossattn=torch.randn(batch, n_txt, dm.txt_in.in_features, generator=gen),  # [B, n_txt, ctx]
            vector=torch.randn(batch, dm.vector_in.in_layer.in_features, generator=gen),  # [B, vec]
        )
        if dm.guidance_embed:
            conds["guidance"] = torch.full((batch,), DISTILLED_GUIDANCE)
        return conds

    # ------------------------------------------------------------------ inspection
    def merged_weight(self, unet, key: str) -> torch.Tensor:
        """Parameter `key` (relative to the KModel, e.g. "diffusion_model.single_blocks.0.linear1.weight")
        as the shared model holds it now."""
        return self.forge.utils.get_attr(unet.model, key).detach().float().clone()
