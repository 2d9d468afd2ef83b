"""FreeFuse across one ``process_images`` call: every batch and hires pass, the messages, the mask pictures.

The script hands each Forge callback to this object; nothing here raises into Forge. A problem the user can
cause becomes one message (console, the image's Comments, infotext), and the image is still generated.
"""

from __future__ import annotations

import logging

import torch

from freefuse.forge import session as sessions
from freefuse.forge import subjects as forge_subjects
from freefuse.forge.families import family_name
from freefuse.forge.session import Plan, Session, SubjectSpec
from freefuse.preview import mask_overlay, tensor_to_image
from freefuse.settings import INFOTEXT_KEY, FreeFuseSettings

log = logging.getLogger("freefuse")
SUBJECTS_KEY = "FreeFuse subjects"


class Generation:
    def __init__(self, settings: FreeFuseSettings, family: str = "flux"):
        self.settings = settings
        self.family = family
        self.session: Session | None = None
        self.summaries: dict[int, str] = {}  # image index in the job -> "harry: harry_potter 41%, ..."
        self._said: set[str] = set()

    # ------------------------------------------------------------------ messages
    def say(self, p, message: str) -> None:
        """One clear message per problem: console, the image's Comments (UI and API info)."""
        text = f"FreeFuse: {message}"
        if text in self._said:
            return
        self._said.add(text)
        print(text)
        if hasattr(p, "comment"):
            p.comment(text)

    # ------------------------------------------------------------------ Forge callbacks
    def record_settings(self, p) -> None:
        p.extra_generation_params[INFOTEXT_KEY] = self.settings.to_infotext(self.family)
        p.extra_generation_params[SUBJECTS_KEY] = self._subjects_infotext

    def before_sampling(self, p) -> None:
        """process_before_every_sampling: plan this pass and install the session (or explain why not)."""
        hires = getattr(p, "is_hr_pass", False)
        previous = sessions.active()
        reuse = previous.masks if (previous is not None and hires) else None
        first_pass_subjects = [s.filename for s in previous.plan.subjects] if reuse is not None else None
        sessions.close_active()
        self.session = None
        if hires and reuse is None:
            self.say(p, "no masks from a first pass; the hires pass ran without FreeFuse")
            return
        try:
            plan = self._plan(p, reuse)
        except Exception as err:  # noqa: BLE001 - never break a generation
            log.exception("FreeFuse: planning failed")
            self.say(p, f"could not prepare ({err}); generated without FreeFuse")
            return
        if plan is None:
            return
        if first_pass_subjects is not None and [s.filename for s in plan.subjects] != first_pass_subjects:
            self.say(p, "the hires prompt has other subjects than the first pass; the hires pass ran without FreeFuse")
            return
        session = Session(plan)
        unet = p.sd_model.forge_objects.unet
        patched = session.install(unet)
        for message in session.messages:
            self.say(p, message)
        session.messages.clear()
        if patched is unet:
            return
        self.session = session
        p.sd_model.forge_objects.unet = patched

    def after_batch(self, p, images: torch.Tensor, batch_number: int) -> None:
        """postprocess_batch: record coverage, add mask pictures, remove every hook."""
        session = self.session
        if session is None:
            sessions.close_active()
            return
        try:
            for message in session.messages:
                self.say(p, message)
            masks = session.masks
            if masks is not None:
                coverage = masks.coverage  # [B, C]
                for i in range(coverage.shape[0]):
                    parts = [
                        f"{s.lora}: {s.phrase} {100.0 * float(coverage[i, c]):.0f}%"
                        for c, s in enumerate(session.plan.subjects)
                    ]
                    self.summaries[batch_number * p.batch_size + i] = ", ".join(parts)
                if self.settings.show_masks:
                    self._add_pictures(p, images, masks, [s.lora for s in session.plan.subjects])
        finally:
            sessions.close_active()
            self.session = None

    # ------------------------------------------------------------------ helpers
    def _subjects_infotext(self, p=None, index=0, all_prompts=(), **_) -> str | None:
        """Per image: Forge calls this in the batch loop (batch-local index) and again for the job."""
        whole_job = p is None or len(all_prompts) == len(getattr(p, "all_prompts", ()))
        image = index if whole_job else getattr(p, "iteration", 0) * p.batch_size + index
        return self.summaries.get(image)

    def _plan(self, p, reuse) -> Plan | None:
        sd_model = p.sd_model
        family = family_name(sd_model.forge_objects.unet.model.diffusion_model)
        if family is None:
            self.say(
                p,
                "this checkpoint is neither FLUX.1 nor SDXL-family (SD 1.x/2.x and Chroma are not supported); "
                "generated without FreeFuse",
            )
            return None
        hires = getattr(p, "is_hr_pass", False)
        batch_prompts = getattr(p, "hr_prompts", None) if hires else None
        prompts = list(dict.fromkeys(batch_prompts or p.prompts))
        if len(prompts) != 1:
            self.say(p, "the images of this batch have different prompts; FreeFuse needs one prompt per batch")
            return None
        prompt = prompts[0]
        problem = forge_subjects.prompt_problem(prompt, p.steps, family)
        if problem:
            self.say(p, f"{problem}. Generated without FreeFuse")
            return None
        if not hasattr(p.sampler, "get_sigmas"):
            self.say(p, "this sampler has no sigma schedule; FreeFuse needs a k-diffusion sampler such as Euler")
            return None
        if family == "flux":
            tokens = forge_subjects.t5_tokens(sd_model, prompt)
        else:
            tokens = forge_subjects.clip_tokens(sd_model, prompt)
        tagged = _tagged_prompt(p, hires)
        candidates, notes = forge_subjects.lora_candidates(tagged or prompt)
        for note in notes:
            self.say(p, note)
        plan = forge_subjects.resolve(self.settings, tokens, candidates)
        for note in plan.messages:
            self.say(p, note)
        if not plan.active:
            return None
        background = forge_subjects.background_positions(self.settings, tokens, bg_notes := [])
        for note in bg_notes:
            self.say(p, note)
        sigmas = p.sampler.get_sigmas(p, p.steps)
        return Plan(
            settings=self.settings,
            subjects=[SubjectSpec(s.lora, s.filename, s.phrase, list(s.match.positions)) for s in plan.subjects],
            background_positions=background,
            n_txt_cond=tokens.n_txt,
            sigmas=sigmas.detach().float().cpu(),
            masks=reuse,
        )

    def _add_pictures(self, p, images: torch.Tensor, masks, labels: list[str]) -> None:
        height, width = images.shape[-2:]
        for i in range(masks.masks.shape[0]):
            image = tensor_to_image(images[i]) if i < images.shape[0] else None
            p.extra_result_images.append(
                mask_overlay(
                    masks.masks[i],
                    (height, width),
                    image=image,
                    background=masks.background[i],
                    labels=labels,
                )
            )


def _tagged_prompt(p, hires: bool) -> str | None:
    """This batch's prompt with its <lora:...> tags (p.prompts has them stripped; p.prompt may be a list)."""
    index = getattr(p, "iteration", 0) * p.batch_size
    for name in ("all_hr_prompts", "all_prompts") if hires else ("all_prompts",):
        prompts = getattr(p, name, None)
        if prompts and index < len(prompts) and isinstance(prompts[index], str):
            return prompts[index]
    return p.prompt if isinstance(getattr(p, "prompt", None), str) else None
