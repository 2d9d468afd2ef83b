"""FreeFuse across one ``process_images`` call: every batch and hires pass, the messages, the mask pictures.

The script hands each Forge callback to this object; nothing here raises into Forge. A problem the user can
cause becomes one message (console, the image's Comments, the "FreeFuse notes" infotext entry), and the image
is still generated.

Forge calls ``process_before_every_sampling`` once per first pass and twice per hires pass (once before and once
after resetting the model from its LoRA-applied copy); FreeFuse keeps the first pass's masks here, not in a
session, so any number and order of those calls gives the hires pass the first pass's masks. (When the hires pass
loads other LoRAs or another checkpoint, the first of those calls installs on a model Forge then throws away:
work done twice, not a wrong result.)
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass

import torch

from freefuse.forge import refinement as forge_refinement
from freefuse.forge import session as sessions
from freefuse.forge import subjects as forge_subjects
from freefuse.forge.families import family_name
from freefuse.forge.session import Plan, Session, SubjectSpec
from freefuse.layout_inputs import AUTOMATIC, LayoutChoice, LockedMasks, choose_layout, locked_from, whole_image
from freefuse.masks import TRAITS
from freefuse.partition import SubjectMasks
from freefuse.preview import mask_images, mask_overlay, style_map_picture, tensor_to_image
from freefuse.refine_inputs import read_references
from freefuse.settings import INFOTEXT_KEY, FreeFuseSettings, in_user_words

log = logging.getLogger("freefuse")
SUBJECTS_KEY = "FreeFuse subjects"
NOTES_KEY = "FreeFuse notes"
MASKS_KEY = "FreeFuse masks"  # per image: its masks, to lock them in a later generation
EXPORTED_KEY = "FreeFuse mask images"  # API only: which extra image is which subject's exported mask
STYLE_KEY = "FreeFuse style"  # per image: the style LoRAs, the selector and how often the style won
NOTES_SEPARATOR = " | "
_KEYS = (INFOTEXT_KEY, SUBJECTS_KEY, NOTES_KEY, MASKS_KEY, EXPORTED_KEY, STYLE_KEY)

_last: LockedMasks | None = None  # the masks of the last generation's first image ("Masks from: last")


def last_masks() -> LockedMasks | None:
    return _last


def start(p) -> None:
    """A new generation (the script's process()): forget what an earlier generation on a copy of this ``p``
    left in the shared infotext dict (the XYZ grid copies ``p`` per cell, sharing ``extra_generation_params``)."""
    p.extra_generation_params = {k: v for k, v in p.extra_generation_params.items() if k not in _KEYS}
    p.freefuse_said = []


def tell(p, message: str) -> None:
    """The one path of every FreeFuse message, each said once per generation: the console, the image's
    Comments (web UI) and the "FreeFuse notes" infotext entry (the API response's infotexts and the PNG).
    Settings are named by their label in the web UI, by their key for API clients."""
    message = in_user_words(message, api=bool(getattr(p, "is_api", False)))
    said = getattr(p, "freefuse_said", None)
    if said is None:
        said = p.freefuse_said = []
    if message in said:
        return
    said.append(message)
    p.extra_generation_params[NOTES_KEY] = NOTES_SEPARATOR.join(said)
    print(f"FreeFuse: {message}")
    if hasattr(p, "comment"):
        p.comment(f"FreeFuse: {message}")


def image_index(p=None, index=0, all_prompts=None, use_main_prompt=False, **_) -> int:
    """The job-wide image index of a Forge infotext callable's call (it passes create_infotext's locals).

    The per-image infotexts of a batch come with the batch's prompts and a batch-local index; the grid's with
    ``use_main_prompt`` (the job's first image); ``Processed.infotext`` with the job's prompts and index.
    """
    if use_main_prompt or p is None:
        return 0 if use_main_prompt else index
    if all_prompts is getattr(p, "all_prompts", None):
        return index
    return getattr(p, "iteration", 0) * p.batch_size + index


@dataclass
class FirstPass:
    """What a batch's hires pass needs of its first pass: the masks, and the model and subjects they belong to."""

    family: str
    model: weakref.ref  # the first pass's KModel (weak: a checkpoint switch must be able to free it)
    subjects: list[SubjectSpec]
    choice: LayoutChoice  # the user's layout for this batch and each subject's source
    masks: SubjectMasks | None = None  # set when the first pass's session ends
    style: list | None = None  # [style specs, per region the subject's share of wins, style share [steps, layers, C]]


class Generation:
    def __init__(self, settings: FreeFuseSettings, family: str = "flux", inputs: dict | None = None):
        self.settings = settings
        self.family = family
        self.inputs = inputs or {}  # layout drawing, mask images, pasted masks (freefuse.layout_inputs)
        self.session: Session | None = None
        self.summaries: dict[int, str] = {}  # image index in the job -> "harry: harry_potter 41%, ..."
        self.patched_images: set[int] = set()  # images whose sampling FreeFuse patched
        self.first_pass: FirstPass | None = None  # this batch's first pass, when FreeFuse patched it
        self.pictures: dict[int, object] = {}  # image index in the job -> its mask picture (PIL), to be saved
        self.locked: dict[int, str] = {}  # image index in the job -> its "FreeFuse masks" infotext value
        self.style_lines: dict[int, str] = {}  # image index in the job -> its "FreeFuse style" infotext value
        self.exports: dict[int, list] = {}  # image index in the job -> [(LoRA name, B/W mask PIL)], to be saved
        self.exported: list[tuple[int, int, str]] = []  # (place in p.extra_result_images, image index, LoRA)
        self._choice = LayoutChoice()  # this pass's layout
        self._final_images: dict[int, int] = {}  # id() of each final image Forge will save -> its index
        self._final_ids: dict[int, int] = {}  # id() of every final image -> its index (its place in the response)
        self.sampled = False  # a sampling pass of this batch reached process_before_every_sampling
        self._style_pictures: list = []  # this batch's style map picture, added after its mask pictures
        self._refinement_prepared: tuple | None = None  # (key, Refinement or None, messages): models and anchors

    # ------------------------------------------------------------------ Forge callbacks
    def record_settings(self, p) -> None:
        """Infotext entries, per image: written only for images FreeFuse actually patched."""
        p.extra_generation_params[INFOTEXT_KEY] = self._settings_infotext
        p.extra_generation_params[SUBJECTS_KEY] = self._subjects_infotext
        p.extra_generation_params[MASKS_KEY] = self._masks_infotext
        p.extra_generation_params[STYLE_KEY] = self._style_infotext

    def before_sampling(self, p) -> None:
        """process_before_every_sampling: plan this pass and install the session (or explain why not)."""
        self.sampled = True
        unet = p.sd_model.forge_objects.unet
        if self.session is not None and self.session.live() and self.session.owns(unet):
            return  # the model FreeFuse already patched (hires calls once before Forge resets the model)
        hires = bool(getattr(p, "is_hr_pass", False))
        self._end_session(p)
        sessions.close_active("a new sampling pass started")
        if not hires:
            self.first_pass = None
        elif not self._hires_can_reuse(p, unet):
            return
        try:
            plan = self._plan(p, hires)
        except Exception as err:  # noqa: BLE001 - never break a generation
            log.exception("FreeFuse: planning failed")
            tell(p, f"could not prepare ({err}); generated without FreeFuse")
            return
        if plan is None:
            return
        if hires and [s.filename for s in plan.subjects] != [s.filename for s in self.first_pass.subjects]:
            tell(p, "the hires prompt has other subjects than the first pass; the hires pass ran without FreeFuse")
            return
        session = Session(plan)
        patched = session.install(unet)
        for message in session.messages:
            tell(p, message)
        session.messages.clear()
        if patched is unet:
            return
        self.session = session
        if not hires:
            self.first_pass = FirstPass(session.family.name, weakref.ref(unet.model), plan.subjects, self._choice)
        p.sd_model.forge_objects.unet = patched

    def after_batch(self, p, images: torch.Tensor, batch_number: int) -> None:
        """postprocess_batch: remove every hook, record coverage, add mask pictures."""
        global _last
        try:
            self._end_session(p)
            if not self.sampled:
                tell(p, "Forge's sampling was replaced (by a script such as img2img alternative test or SD upscale's "
                     "own loop), so FreeFuse did not run")  # fmt: skip
            self.sampled = False
            if self.first_pass is None:
                return
            first = batch_number * p.batch_size
            self.patched_images.update(range(first, first + images.shape[0]))
            masks, subjects = self.first_pass.masks, self.first_pass.subjects
            if masks is None:
                tell(p, "no masks were found for this batch; the subject LoRAs ran unmasked")
                return
            loras = [s.lora for s in subjects]
            cropped = _inpaint_region(p) is not None  # masks of the inpainted region, not of the saved image
            if cropped and self.settings.export_masks:
                tell(p, "inpaint area 'only masked': the masks cover the inpainted region only, so they are not "
                     "exported or kept with the image (Masks from: image or last cannot reuse them)")  # fmt: skip
            sources = [f" ({source})" if source != AUTOMATIC else "" for source in self.first_pass.choice.sources]
            coverage = masks.coverage  # [B, C]
            for i in range(coverage.shape[0]):
                parts = [
                    f"{s.lora}: {s.phrase} {100.0 * float(coverage[i, c]):.0f}%{sources[c]}"
                    for c, s in enumerate(subjects)
                ]
                self.summaries[first + i] = ", ".join(parts)
                if not cropped:
                    self.locked[first + i] = locked_from(masks.masks, i, loras, self.first_pass.family).to_text()
            if batch_number == 0 and not cropped:
                _last = locked_from(masks.masks, 0, loras, self.first_pass.family)
            styled = self._report_style(p, first, images.shape[0]) if self.first_pass.style else [""] * len(loras)
            if self.settings.show_masks or self.settings.save_mask_picture:
                labels = [lora + source + share for lora, source, share in zip(loras, sources, styled, strict=True)]
                self._add_pictures(p, images, masks, labels, first)
            p.extra_result_images.extend(self._style_pictures)
            self._style_pictures.clear()
            if self.settings.export_masks and not cropped:
                self._add_exports(p, images, masks, loras, first)
        finally:
            sessions.close_active()
            self.first_pass = None  # nothing of this batch's model may outlive it

    def finish(self, p=None, processed=None) -> None:
        """postprocess: tell API clients which extra image is which exported mask; then nothing of this
        generation stays held by the script (models, pictures)."""
        self._end_session(None)
        self.first_pass = None
        self._refinement_prepared = None
        if processed is not None and self.exported:  # the API returns processed.images, then the extra images
            shown = {self._final_ids.get(id(img)): place for place, img in enumerate(processed.images)}
            processed.extra_generation_params[EXPORTED_KEY] = [
                {"index": len(processed.images) + place, "image": shown.get(image, image), "subject": lora}
                for place, image, lora in self.exported
            ]
        self.exported.clear()
        self.pictures.clear()
        self.exports.clear()
        self._final_images.clear()
        self._final_ids.clear()

    # ------------------------------------------------------------------ helpers
    def _end_session(self, p) -> None:
        """Close this generation's session (if any), keep its masks for the batch and pass on its messages."""
        session, self.session = self.session, None
        if session is None:
            return
        if session.masks is not None and self.first_pass is not None:
            self.first_pass.masks = session.masks
        session.close()
        if session.style_report is not None and self.first_pass is not None:
            self.first_pass.style = [session.plan.styles, session.style_report, session.style_map]
        if p is not None:
            for message in session.messages:
                tell(p, message)
        session.messages.clear()

    def _hires_can_reuse(self, p, unet) -> bool:
        """Whether the hires pass can run with the first pass's masks; says why not."""
        first = self.first_pass
        if first is None:
            if getattr(p, "firstpass_image", None) is not None:  # Forge's hires button on an existing image
                tell(p, "hires fix of an existing image has no first pass to take masks from; it ran without FreeFuse")
            return False  # otherwise FreeFuse did not run in the first pass, and said why there
        if first.masks is None:
            tell(p, "no masks from the first pass; the hires pass ran without FreeFuse")
            return False
        model = unet.model
        family = family_name(model.diffusion_model)
        if family != first.family:
            tell(
                p,
                f"the hires checkpoint is {family or 'not supported'}, the first pass was {first.family}; masks do "
                "not carry across model families, so the hires pass ran without FreeFuse",
            )
            return False
        if model is not first.model():
            tell(p, "the hires pass runs on another checkpoint; it used the first pass's masks, resized")
        return True

    def _settings_infotext(self, **where) -> str | None:
        return self.settings.to_infotext(self.family) if image_index(**where) in self.patched_images else None

    def _subjects_infotext(self, **where) -> str | None:
        return self.summaries.get(image_index(**where))

    def _masks_infotext(self, **where) -> str | None:
        return self.locked.get(image_index(**where))

    def _plan(self, p, hires: bool) -> Plan | None:
        sd_model = p.sd_model
        unet = sd_model.forge_objects.unet
        family = family_name(unet.model.diffusion_model)
        if family is None:
            tell(
                p,
                "this checkpoint is neither FLUX.1 nor SDXL-family (SD 1.x/2.x and Chroma are not supported); "
                "generated without FreeFuse",
            )
            return None
        batch_prompts = getattr(p, "hr_prompts", None) if hires else None
        prompts = list(dict.fromkeys(batch_prompts or p.prompts))
        if len(prompts) != 1:
            tell(p, "the images of this batch have different prompts; FreeFuse needs one prompt per batch")
            return None
        prompt = prompts[0]
        if not hasattr(p.sampler, "get_sigmas"):
            tell(p, "this sampler has no sigma schedule; FreeFuse needs a k-diffusion sampler such as Euler")
            return None
        candidates, notes = forge_subjects.lora_candidates(_tagged_prompt(p, hires) or prompt)
        for note in notes:
            tell(p, note)
        unusable = forge_subjects.without_denoiser_weights(unet, candidates)
        found = forge_subjects.resolve_prompt(self.settings, sd_model, family, prompt, p.steps, candidates, unusable)
        for note in found.messages:
            tell(p, note)
        if not found.active:
            return None
        subjects = [SubjectSpec(s.lora, s.filename, s.phrase, list(s.match.positions)) for s in found.plan.subjects]
        styles = [SubjectSpec(c.name, c.filename, "", []) for c in found.plan.styles]
        if hires:
            self._choice = self.first_pass.choice
            masks = self.first_pass.masks
        else:
            self._choice = self._layout_choice(p, family, [s.lora for s in subjects])
            if len(subjects) == 1 and self._choice.layout is None:  # one subject + style: its region is everything
                self._choice.layout = whole_image(1)
            layout = self._choice.layout
            masks = None
            if layout is not None and layout.complete:  # every mask given: nothing to capture
                masks = layout.given(TRAITS[family].token_grid(p.height, p.width), p.batch_size)
        refinement = None
        if not hires:
            refinement = self._refinement(p, [s.lora for s in subjects])
        return Plan(
            settings=self.settings,
            subjects=subjects,
            background_positions=found.background,
            n_txt_cond=found.tokens.n_txt,
            sigmas=_sigmas(p, hires),
            masks=masks,
            layout=self._choice.layout,
            styles=styles,
            refinement=refinement,
        )

    def _refinement(self, p, loras: list[str]):
        """Latent refinement for this pass, or None (and why) when it cannot run."""
        given = [self.inputs.get(name) for name in ("style_reference", "subject_references")]
        if not self.settings.refine:
            forge_refinement.release()  # free the CLIP / DINO models a refined generation loaded
            if any(value not in (None, "", [], {}) for value in given):
                tell(p, "reference images were given but refine is off, so they are not used")
            return None
        vae = getattr(p.sd_model.forge_objects, "vae", None)
        key = (tuple(loras), id(vae))
        if self._refinement_prepared is None or self._refinement_prepared[0] != key:  # once per job, not per batch
            try:
                refs = read_references(*given, loras, allow_paths=not getattr(p, "is_api", False))
                prepared = forge_refinement.prepare(self.settings, refs, loras, vae)
            except Exception as err:  # noqa: BLE001 - refinement must never cost the generation FreeFuse itself
                log.exception("FreeFuse: preparing latent refinement failed")
                prepared = None, [f"latent refinement could not be prepared ({err}); it did not run"]
            self._refinement_prepared = (key, *prepared)
        _, refinement, messages = self._refinement_prepared
        for message in messages:
            tell(p, message)
        return refinement.fresh() if refinement is not None else None

    def _layout_choice(self, p, family: str, loras: list[str]) -> LayoutChoice:
        """The user's layout for these subjects (drawn, hinted, locked), cropped to an inpaint region."""
        api = bool(getattr(p, "is_api", False))
        choice = choose_layout(self.settings, self.inputs, loras, family, _last, allow_paths=not api)
        if api and self.inputs.get("locked_masks") and self.settings.masks_from == "automatic":
            tell(p, "locked_masks was given but masks_from is automatic, so it is not used (send masks_from: image)")
        for message in choice.messages:
            tell(p, message)
        box = _inpaint_region(p)
        if choice.layout is not None and box is not None:
            choice.layout = choice.layout.cropped(box)
            drawn = choice.layout.drawn
            choice.sources = [s if d else AUTOMATIC for s, d in zip(choice.sources, drawn, strict=True)]
        return choice

    def final_image(self, image, index: int) -> None:
        """postprocess_image_after_composite: the image Forge is about to save for job image ``index``."""
        self._final_ids[id(image)] = index
        if index in self.pictures or index in self.exports:
            self._final_images[id(image)] = index

    def image_saved(self, image, filename: str) -> None:
        """on_image_saved: save the mask picture and exported masks of that image beside it, named after it."""
        index = self._final_images.pop(id(image), None)
        if index is None:
            return
        stem, _ = os.path.splitext(filename)
        if index in self.pictures:
            self.pictures.pop(index).save(f"{stem}-freefuse-masks.png")
        for lora, mask in self.exports.pop(index, []):
            mask.save(f"{stem}-freefuse-{_file_safe(lora)}.png")

    def _add_pictures(self, p, images: torch.Tensor, masks, labels: list[str], first: int) -> None:
        height, width = images.shape[-2:]
        for i in range(masks.masks.shape[0]):
            image = tensor_to_image(images[i]) if i < images.shape[0] else None
            picture = mask_overlay(
                masks.masks[i], (height, width), image=image, background=masks.background[i], labels=labels
            )
            if self.settings.save_mask_picture and _saves_images(p):
                self.pictures[first + i] = picture  # until Forge saves image first + i
            if self.settings.show_masks:
                p.extra_result_images.append(picture)

    def _report_style(self, p, first: int, count: int) -> list[str]:
        """The "FreeFuse style" entry of this batch's images, and a note when a region's choice never varied;
        returns each region's share for the mask picture's legend ("" where nothing was decided)."""
        styles, shares, style_map = self.first_pass.style
        subjects = self.first_pass.subjects
        selector = self.settings.style_selector
        parts, legend = [], []
        for subject, share in zip(subjects, shares, strict=True):
            if share is None:
                parts.append(f"{subject.lora} no decision")
                legend.append("")
                continue
            parts.append(f"{subject.lora} {100.0 * (1.0 - share):.0f}% style")
            legend.append(f", {100.0 * (1.0 - share):.0f}% style")
            if selector != "sum" and share in (0.0, 1.0):
                won = "the style" if share == 0.0 else "the subject"
                tell(p, f"in {subject.lora}'s region the {selector} selector always chose {won}; to balance it, "
                     "change the LoRA weights or try another style_selector")  # fmt: skip
        line = f"{', '.join(s.lora for s in styles)} ({selector}): " + ", ".join(parts)
        if selector == "sum":
            line = f"{', '.join(s.lora for s in styles)} (sum): style and subjects added everywhere"
        for i in range(count):
            self.style_lines[first + i] = line
        if self.settings.style_picture and selector != "sum" and style_map is not None:
            labels = [f"{s.lora}{share}" for s, share in zip(subjects, legend, strict=True)]
            self._style_pictures.append(style_map_picture(style_map, labels))  # shown after the mask picture
        return legend if selector != "sum" else [""] * len(subjects)

    def _style_infotext(self, **where) -> str | None:
        return self.style_lines.get(image_index(**where))

    def _add_exports(self, p, images: torch.Tensor, masks, loras: list[str], first: int) -> None:
        """One black/white mask per subject at the image's size: saved beside it, and in the API response."""
        height, width = images.shape[-2:]
        for i in range(masks.masks.shape[0]):
            per_subject = list(zip(loras, mask_images(masks.masks[i], (height, width)), strict=True))
            if _saves_images(p):
                self.exports[first + i] = per_subject
            elif not getattr(p, "is_api", False):
                tell(p, "Save one mask per subject is on, but Forge does not save this generation's images, so no "
                     "masks were saved")  # fmt: skip
            if getattr(p, "is_api", False):
                for lora, mask in per_subject:
                    self.exported.append((len(p.extra_result_images), first + i, lora))
                    p.extra_result_images.append(mask)


def _sigmas(p, hires: bool) -> torch.Tensor:
    """The schedule this pass samples: the whole one (txt2img), or its tail from the denoising strength
    (img2img, a hires pass), as Forge's sample_img2img cuts it."""
    if not (hires or getattr(p, "init_images", None)):
        return p.sampler.get_sigmas(p, p.steps).detach().float().cpu()
    from modules import sd_samplers_common

    steps, t_enc = sd_samplers_common.setup_img2img_steps(p, (p.hr_second_pass_steps or p.steps) if hires else None)
    sigmas = p.sampler.get_sigmas(p, steps)
    return sigmas[steps - t_enc - 1 :].detach().float().cpu()


def _inpaint_region(p) -> tuple[float, float, float, float] | None:
    """An img2img inpaint "only masked" region as fractions (left, top, right, bottom) of the whole image."""
    paste_to, whole = getattr(p, "paste_to", None), getattr(p, "mask_for_overlay", None)
    if not paste_to or whole is None or not getattr(p, "inpaint_full_res", False):
        return None
    x, y, w, h = paste_to
    width, height = whole.size
    return x / width, y / height, (x + w) / width, (y + h) / height


def _file_safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "subject"


def _saves_images(p) -> bool:
    """Whether Forge will save this generation's images (the API does not by default)."""
    saves = getattr(p, "save_samples", None)
    return bool(saves()) if callable(saves) else True


def _tagged_prompt(p, hires: bool) -> str | None:
    """This batch's prompt with its <lora:...> tags (p.prompts has them stripped; p.prompt may be a list)."""
    index = getattr(p, "iteration", 0) * p.batch_size
    for name in ("all_hr_prompts", "all_prompts") if hires else ("all_prompts",):
        prompts = getattr(p, name, None)
        if prompts and index < len(prompts) and isinstance(prompts[index], str):
            return prompts[index]
    return p.prompt if isinstance(getattr(p, "prompt", None), str) else None
