"""One FreeFuse generation inside Forge: install every hook transactionally, remove all of them on any exit.

Only one session is active at a time (Forge never runs two generations at once). Every hook holds its session
and does nothing unless that session is the active one, so a hook that somehow survived is a no-op.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from dataclasses import dataclass

import torch

from freefuse import call_weights as cw
from freefuse.forge import hooks
from freefuse.forge.attention_bias import SessionBias
from freefuse.forge.families import detect_family
from freefuse.forge.loras import (
    RuntimeLoras,
    build_runtime_loras,
    dora_merged_after_subjects,
    put_back_kept,
    resolve_module,
    take_out,
)
from freefuse.forge.style_fusion import StyleFusion
from freefuse.layouts import Layout
from freefuse.masks import Capture, compute_masks, partition_maps, similarity_maps, x0_picture
from freefuse.partition import SubjectMasks
from freefuse.schedule import euler_step, is_step_start, step_index
from freefuse.settings import FreeFuseSettings

log = logging.getLogger("freefuse")

_ACTIVE: Session | None = None
TOKEN_KEY = "freefuse_session"


@dataclass
class SubjectSpec:
    lora: str  # the name the user wrote in <lora:NAME:w>
    filename: str  # Forge's identifier[0] for that LoRA
    phrase: str
    positions: list[int]  # trigger-token positions in the cond prompt's text sequence


@dataclass
class Plan:
    """Everything one sampling pass needs, resolved before any hook is installed."""

    settings: FreeFuseSettings
    subjects: list[SubjectSpec]
    background_positions: list[int] | None
    n_txt_cond: int  # text tokens of the cond prompt
    sigmas: torch.Tensor  # [steps + 1] the sampler's schedule
    masks: SubjectMasks | None = None  # given (hires pass, a complete layout): used, resized, no capture
    layout: Layout | None = None  # the user's drawing, hint or locked masks (freefuse.layout_inputs)
    styles: list[SubjectSpec] = dataclasses.field(default_factory=list)  # LoRAs fused as one style branch
    refinement: object | None = None  # freefuse.forge.refinement.Refinement: latent refinement, when it can run


@dataclass
class _Call:
    shape: cw.CallShape
    grid_hw: tuple[int, int]
    step: int
    sigma: float
    mode: str
    capture: bool


def active() -> Session | None:
    return _ACTIVE


def close_active(reason: str = "") -> None:
    """Remove every hook of the active session, if any (safe to call at any time, any number of times)."""
    if _ACTIVE is not None:
        if reason:
            log.info("FreeFuse: closing the previous session (%s)", reason)
        _ACTIVE.close()


def guard_sampling(unet, step: int | None = None) -> Session | None:
    """Called at every denoiser step of every generation (any tab, any model), before its model call.

    When the model about to run does not carry the active session (a generation that raised left the session
    open, a refiner took over, another extension swapped the model), the session closes first, so nothing
    of FreeFuse acts on a model it did not patch. Returns the session it closed, if any.
    """
    session = _ACTIVE
    if session is None or session.owns(unet):
        return None
    close_active("the model being sampled is not the one FreeFuse patched")
    at = f" at step {step}" if step is not None else ""
    session.messages.append(
        f"the model changed during sampling{at} (a refiner, or another extension replaced it); FreeFuse stopped "
        "there, and the remaining steps ran with the subject LoRAs merged as usual"
    )
    return session


class Session:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.settings = plan.settings
        self.messages: list[str] = []
        self._masks: SubjectMasks | None = None
        self.pending_maps = None
        self.call: _Call | None = None
        self.current_block: tuple[str, int] | None = None
        self.in_phase1 = False
        self.arm_phase1_capture = False
        self.step_input: torch.Tensor | None = None  # the x of this step's sampling_function (not a modifier's)
        self.in_main_eval = False  # inside the generation's own evaluation of this step
        self.phase1_done = plan.masks is not None or plan.settings.schedule != "restart"
        self.runtime: RuntimeLoras | None = None
        self.fusion: StyleFusion | None = None  # subject + style selection, when a style LoRA is marked
        self.style_report: list[float | None] | None = None  # per region: the share the subject won
        self.style_map: torch.Tensor | None = None  # [steps, layers, C]: the style's share (NaN: undecided)
        self.refinement = plan.refinement  # corrects each step's x0 in its window (post-CFG)
        self.family = None  # FluxFamily / SdxlFamily, chosen at install
        self.level_grid: tuple[int, int] | None = None  # UNet: image grid of the transformer running now
        self.in_cross = False  # UNet: inside a cross-attention (attn2) call
        self._handles: list = []
        self._restore: list = []
        self.positions = [s.positions for s in plan.subjects]
        self._pattern = cw.exclusion_pattern(self.positions, plan.n_txt_cond) if self.settings.token_exclusion else None
        self._cache: dict = {}  # token weights and bias per call shape: built once, reused every step
        self.bias = SessionBias(self)  # the attention bias: where it applies, its form
        self.open = False
        self.token = uuid.uuid4().hex  # travels in the clone's transformer_options; other models lack it

    @property
    def masks(self) -> SubjectMasks | None:
        return self._masks

    @masks.setter
    def masks(self, value: SubjectMasks | None) -> None:
        self._masks = value
        self._cache.clear()  # weights and bias derived from the old masks are stale

    # ------------------------------------------------------------------ lifecycle
    def install(self, unet):
        """Clone ``unet``, take the subject LoRAs out of its merge, hook the shared model; return the clone.

        On any failure everything installed so far is removed and the original ``unet`` is returned
        untouched, with the reason in ``messages``.
        """
        global _ACTIVE
        close_active("a new generation started")
        clone = unet.clone()
        try:
            diffusion_model = clone.model.diffusion_model
            self.family = detect_family(diffusion_model)
            if self.family is None:
                raise UnsupportedModel(
                    f"this model ({type(diffusion_model).__name__}) is neither FLUX nor SDXL-family; FreeFuse "
                    "supports FLUX.1 and SDXL (Pony, Illustrious, NoobAI) checkpoints, not SD 1.x/2.x or Chroma"
                )
            problem = self.family.prepare(self.settings, diffusion_model)
            if problem:
                raise UnsupportedModel(problem)
            steps = self.plan.sigmas.numel() - 1
            if self.plan.masks is None and self.settings.capture_step >= steps:
                raise UnsupportedModel(
                    f"capture_step {self.settings.capture_step} is not below the number of steps ({steps}); "
                    f"lower capture_step (for example {max(0, steps // 4)}) or sample more steps"
                )
            if self.plan.masks is not None:
                self.masks = self.plan.masks
            clone.model_options.setdefault("transformer_options", {})[TOKEN_KEY] = self.token
            self._install_loras(clone)
            self.family.install(self, diffusion_model)
            self._install_sampler_functions(clone)
            self.open = True
            _ACTIVE = self
            return clone
        except Exception as err:  # noqa: BLE001 - any failure leaves Forge as it was
            self._remove_hooks()
            self.messages.append(f"not applied to this image: {err}")
            if not isinstance(err, UnsupportedModel):
                log.exception("FreeFuse: install failed")
            return unet

    def close(self) -> None:
        global _ACTIVE
        self._remove_hooks()
        self.open = False
        self.call = None
        self.step_input = None
        self.in_main_eval = False
        self.pending_maps = None
        self.runtime = None
        if self.fusion is not None:
            self.style_report, self.style_map = self.fusion.report()
            self.fusion = None
        if self.refinement is not None:
            self.refinement.close()
            self.messages.append(self.refinement.report(self.plan.sigmas.numel() - 1))
            self.refinement = None
        self._cache.clear()
        if _ACTIVE is self:
            _ACTIVE = None

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for restore in reversed(self._restore):
            restore()
        self._restore.clear()

    def live(self) -> bool:
        """True while this session is installed and is the active one (hooks act only then)."""
        return self.open and _ACTIVE is self

    def owns(self, unet) -> bool:
        """True when ``unet`` is this session's patched clone or a clone of it (the token travels along)."""
        options = getattr(unet, "model_options", None) or {}
        return (options.get("transformer_options") or {}).get(TOKEN_KEY) == self.token

    # ------------------------------------------------------------------ installation
    def _install_loras(self, clone) -> None:
        from backend.patcher.lora import merge_lora_to_weight

        subjects = [s.filename for s in self.plan.subjects]
        filenames = subjects + [s.filename for s in self.plan.styles]
        original_order = list(clone.lora_patches)
        taken = take_out(clone, filenames)
        missing = [s.lora for s in self.plan.subjects if s.filename not in taken]
        if missing:
            raise UnsupportedModel(f"LoRA {', '.join(missing)} has no weights for this model's denoiser")
        owners = {s.filename: i for i, s in enumerate(self.plan.subjects)}
        owners.update({s.filename: len(subjects) for s in self.plan.styles})  # one style branch: the last owner
        self.runtime, keep = build_runtime_loras(
            clone.model, taken, owners, self.family.layout_of, merge_lora_to_weight
        )
        put_back_kept(clone, original_order, keep)
        dora = dora_merged_after_subjects(clone.lora_patches, original_order, filenames)
        if self.plan.styles:
            self.fusion = StyleFusion(self, self.runtime.layers)
        if dora:
            names = ", ".join(sorted({name.rsplit("/", 1)[-1] for name in dora}))
            self.messages.append(
                f"DoRA LoRA {names} is merged on weights without the subject LoRAs, so its effect can differ "
                "slightly from a plain merge"
            )
        if self.runtime.left_merged:
            shown = "; ".join(self.runtime.left_merged[:3])
            more = len(self.runtime.left_merged) - 3
            self.messages.append(
                f"{len(self.runtime.left_merged)} LoRA patches stay merged (not masked): {shown}"
                + (f" and {more} more" if more > 0 else "")
            )
        if hasattr(clone, "add_extra_preserved_memory_during_sampling"):
            clone.add_extra_preserved_memory_during_sampling(self.runtime.nbytes)
        for layer in self.runtime.layers:
            module = resolve_module(clone.model, layer.module_path)
            self._handles.append(module.register_forward_hook(hooks.lora_hook(self, layer)))

    def add_handle(self, handle) -> None:
        """A hook handle to remove when the session closes."""
        self._handles.append(handle)

    def add_restore(self, restore) -> None:
        """A function that undoes a swap when the session closes (run in reverse order)."""
        self._restore.append(restore)

    def cached(self, key, build):
        """A per-session cache for tensors derived from the masks (cleared when the masks change)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def _install_sampler_functions(self, clone) -> None:
        """Mark the generation's own evaluation of each step; run phase 1 / paper x0 only from there.

        Other code may evaluate the model inside a step first (reference ControlNet runs it on a noised
        reference latent from a conditioning modifier): masks must never come from such a call.
        """
        options = clone.model_options
        options["conditioning_modifiers"] = [
            hooks.step_input_modifier(self),
            *options.get("conditioning_modifiers", []),
        ]
        options["sampler_pre_cfg_function"] = [
            hooks.main_eval_mark(self),
            *options.get("sampler_pre_cfg_function", []),
        ]
        clone.add_sampler_pre_cfg_function(hooks.phase1_runner(self))
        if self.refinement is not None:
            clone.set_model_sampler_post_cfg_function(hooks.refine_step(self))
        clone.set_model_sampler_post_cfg_function(hooks.main_eval_end(self))

    # ------------------------------------------------------------------ per call
    def begin_call(self, rows: int, options: dict, n_txt: int, grid: tuple[int, int]) -> None:
        """Called by the family's model pre-hook at the start of every model call.

        A call without this session's token comes from a model FreeFuse did not patch (the next generation
        after one that raised, an img2img run): the session closes itself there and then.
        """
        if options.get(TOKEN_KEY) != self.token:
            log.info("FreeFuse: a model call from outside this generation; removing the leftover hooks")
            self.close()
            return
        cond_or_uncond = tuple(options.get("cond_or_uncond") or (0,))
        shape = cw.CallShape(cond_or_uncond, rows // len(cond_or_uncond), grid[0] * grid[1], n_txt)
        sigmas = options.get("sigmas")
        sigma = float(sigmas.max()) if sigmas is not None else float(self.plan.sigmas[0])
        step = step_index(self.plan.sigmas, sigma)
        if self.in_phase1:
            mode, capture = cw.OFF, self.arm_phase1_capture
        elif self.masks is not None:
            mode, capture = cw.MASKED, False
        else:
            mode = cw.FULL
            capture = (
                self.settings.schedule == "continue"
                and self.in_main_eval
                and self.pending_maps is None
                and step == self.settings.capture_step
                and is_step_start(self.plan.sigmas, sigma)
                and 0 in cond_or_uncond
            )
        self.level_grid = None  # set again by each UNet level's pre-hook
        self.call = _Call(shape, grid, step, sigma, mode, capture)

    def masks_at(self, grid: tuple[int, int]) -> SubjectMasks:
        """The masks on another token grid (a hires pass, another UNet level), nearest so they stay hard. A
        layout that gives every subject's mask is taken to each grid from the drawing itself."""
        if tuple(self.masks.grid_hw) == tuple(grid):
            return self.masks
        layout = self.plan.layout
        if layout is not None and layout.complete:
            batch = self.masks.masks.shape[0]
            return self.cached(("masks", tuple(grid)), lambda: layout.given(tuple(grid), batch))
        return self.cached(("masks", tuple(grid)), lambda: self.masks.resized(grid))

    def token_weights(self, layout: str, like: torch.Tensor, grid: tuple[int, int] | None = None):
        """Weights of the subject LoRAs for a layer in the current call; None means all ones.

        Linear layouts: [rows, L, C] (``grid`` = the layer's image grid, default the call's). "conv":
        [rows, C, h, w] for a conv layer whose output grid is ``grid``.
        """
        call = self.call
        if layout == "global" or call.mode == cw.FULL:
            return None  # all ones: the delta is added unweighted
        grid = tuple(grid or call.grid_hw)
        key = (layout, call.shape, call.mode, grid, like.dtype, like.device)
        if key in self._cache:
            return self._cache[key]
        n_subjects = len(self.plan.subjects)
        shape = dataclasses.replace(call.shape, n_img=grid[0] * grid[1])
        styled = bool(self.plan.styles)  # one more column, the style branch: 1 wherever the subjects' is set
        masks = self.masks_at(grid).masks if call.mode == cw.MASKED else None
        if layout in ("image", "conv"):
            weights = cw.image_weights(shape, masks, n_subjects, call.mode)  # [rows, N, C]
            if layout == "conv":
                weights = weights.transpose(1, 2).reshape(shape.rows, n_subjects, *grid)
        elif layout == "text":
            weights = cw.text_weights(shape, self._pattern, n_subjects, call.mode)
        else:
            weights = torch.cat(
                [
                    cw.text_weights(shape, self._pattern, n_subjects, call.mode),
                    cw.image_weights(shape, masks, n_subjects, call.mode),
                ],
                dim=1,
            )
        if styled:
            column = 1 if layout == "conv" else -1
            style_on = torch.full_like(weights.narrow(column, 0, 1), 0.0 if call.mode == cw.OFF else 1.0)
            weights = torch.cat([weights, style_on], dim=column)
        weights = weights.to(device=like.device, dtype=like.dtype)
        self._cache[key] = weights
        return weights

    # ------------------------------------------------------------------ capture
    def on_capture(self, capture: Capture) -> None:
        """Maps from the capture block; masks now (official) or once the predicted x0 is known (paper)."""
        call = self.call
        call.capture = False
        self.arm_phase1_capture = False
        bg = self.plan.background_positions
        log.info("FreeFuse: capturing masks at step %d (sigma %.4f)", call.step, call.sigma)
        try:
            if self.settings.mask_method == "paper":
                self.pending_maps = (
                    similarity_maps(capture, self.positions, bg, self.settings, self.family.traits),
                    capture.grid_hw,
                )
            else:
                self.masks = compute_masks(
                    capture, self.positions, bg, self.settings, self.family.traits, layout=self.plan.layout
                )
        except Exception as err:  # noqa: BLE001 - a failed capture must not break the generation
            log.exception("FreeFuse: mask computation failed")
            self.messages.append(f"could not compute masks ({err}); the subject LoRAs ran unmasked")

    def finish_with_x0(self, x0: torch.Tensor) -> None:
        """Paper method: superpixel voting on the predicted x0 latent of the capture step (no VAE decode)."""
        if self.pending_maps is None or self.masks is not None:
            return
        maps, grid = self.pending_maps
        self.pending_maps = None
        traits = self.family.traits
        try:
            picture, n_segments = x0_picture(x0)
            self.masks = partition_maps(maps, grid, self.settings, traits, picture, n_segments, layout=self.plan.layout)
        except Exception as err:  # noqa: BLE001
            log.exception("FreeFuse: superpixel voting failed")
            self.messages.append(f"superpixel voting failed ({err}); used the balanced argmax instead")
            self.masks = partition_maps(maps, grid, self.settings, traits, layout=self.plan.layout)

    def refine_x0(self, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Latent refinement of the generation's own evaluation of a step, once the masks are known."""
        sigmas = self.plan.sigmas
        step = step_index(sigmas, float(sigma.max()))
        return self.refinement.step(denoised, step, sigmas.numel() - 1, self.masks)

    # ------------------------------------------------------------------ restart schedule
    def run_phase1(self, model, cond, x, timestep, model_options) -> None:
        """The restart schedule's extra cond-only evaluations, subject LoRAs off, on a copy of the noise."""
        from backend.sampling.sampling_function import calc_cond_uncond_batch

        sigmas = self.plan.sigmas
        last = self.settings.capture_step
        self.in_phase1 = True
        try:
            x_k = x.clone()
            for k in range(last + 1):
                self.arm_phase1_capture = k == last
                t_k = torch.full_like(timestep, float(sigmas[k]))
                cond_pred, _ = calc_cond_uncond_batch(model, cond, None, x_k, t_k, model_options)
                if k < last:
                    x_k = euler_step(x_k, cond_pred, float(sigmas[k]), float(sigmas[k + 1]))
                elif self.pending_maps is not None:
                    self.finish_with_x0(cond_pred)
        finally:
            self.in_phase1 = False
            self.arm_phase1_capture = False
            self.phase1_done = True
        if self.masks is None:
            self.messages.append("found no masks in the extra evaluations; the subject LoRAs ran unmasked")


class UnsupportedModel(RuntimeError):
    """A user-facing reason FreeFuse cannot run on this model or with these settings."""
