"""What FreeFuse will do with the prompt, shown in the accordion while the user edits it (nothing generates).

The same resolution as a generation (``freefuse.forge.subjects.resolve_prompt``), on the loaded model's own text
encoders, with the LoRAs found the way Forge's LoRA extension will find them. One tokenisation per edit, no
model evaluation. Whether Forge will give a LoRA weights for this model is known only when it loads it: a
generation says so.
"""

from __future__ import annotations

import logging

from freefuse.forge import subjects as forge_subjects
from freefuse.forge.families import family_name
from freefuse.script_args import FAMILY_LABELS
from freefuse.settings import FreeFuseSettings, in_user_words

log = logging.getLogger("freefuse")
PREVIEW_STEPS = 20  # prompt schedules ([a:b:N]) are judged at a typical step count


def preview_markdown(enabled: bool, prompt: str, subjects: str, styles: str = "") -> str:
    """Markdown for the accordion: the subjects with the phrase each matched and where it came from, the style
    LoRAs, the LoRAs that stay global and why, what is missing or overlaps, or why FreeFuse cannot run on this
    model."""
    if not enabled:
        return ""
    try:
        return _preview(prompt or "", subjects or "", styles or "")
    except Exception as err:  # noqa: BLE001 - a preview must never break the page
        log.exception("FreeFuse: preview failed")
        return f"_FreeFuse could not preview this prompt ({err})._"


def _preview(prompt: str, subjects: str, styles: str) -> str:
    from modules import extra_networks, sd_models

    sd_model = getattr(sd_models.model_data, "sd_model", None)
    if getattr(sd_model, "forge_objects", None) is None:  # None, or Forge's placeholder before the first load
        return "_Forge loads the checkpoint at the first generation; the preview shows from then on._"
    diffusion_model = sd_model.forge_objects.unet.model.diffusion_model
    family = family_name(diffusion_model)
    if family is None:
        return (
            f"**FreeFuse cannot run on the loaded model** ({type(diffusion_model).__name__}): it supports FLUX.1 and "
            "SDXL-family checkpoints; images will be generated without it."
        )
    clean, _ = extra_networks.parse_prompt(prompt)
    candidates, notes = forge_subjects.lora_candidates_on_disk(prompt)
    settings = FreeFuseSettings.defaults(family).replace(subjects=subjects, style_loras=styles)
    found = forge_subjects.resolve_prompt(settings, sd_model, family, clean, PREVIEW_STEPS, candidates, {})
    lines = []
    if found.plan is not None:
        count = len(found.plan.subjects)
        styled = bool(found.plan.styles)
        verdict = "will keep these subjects apart" if found.active else "will not run (it needs two subjects)"
        if styled:
            verdict = "will fuse the style with these subjects" if found.active else "will not run (no subject)"
        lines.append(f"**FreeFuse on {FAMILY_LABELS[family]}** {verdict}:")
        lines += [f'- `{s.lora}`: "{s.phrase}" ({s.source})' for s in found.plan.subjects]
        lines += [f"- `{c.name}`: style" for c in found.plan.styles]
        if not count:
            lines.append("- no subject found yet")
    lines += [f"- {in_user_words(note, api=False)}" for note in [*notes, *found.messages]]
    return "\n".join(lines)
