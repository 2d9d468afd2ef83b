"""FreeFuse for Forge: the txt2img and img2img accordion, its arguments, infotext paste-back and XYZ axes.

Thin glue: arguments become a validated ``FreeFuseSettings`` and each Forge callback is handed to
``freefuse.forge.generation.Generation``. No maths here.
"""

from __future__ import annotations

import functools

from modules import script_callbacks, scripts

from freefuse.forge import accordion, live_preview
from freefuse.forge import session as sessions
from freefuse.forge.families import family_name
from freefuse.forge.generation import MASKS_KEY, Generation, start, tell
from freefuse.script_args import (
    FAMILY_LABELS,
    INPUTS,
    VALUES_FOR,
    XYZ_AXES,
    positional_names,
    settings_from_args,
)
from freefuse.settings import INFOTEXT_KEY, FreeFuseSettings

TITLE = "FreeFuse"


def _ui_family() -> str:
    """The family whose defaults the accordion starts with: Forge's UI preset ("xl" -> SDXL, else FLUX)."""
    from modules import shared

    return "sdxl" if getattr(getattr(shared, "opts", None), "forge_preset", "") == "xl" else "flux"


class FreeFuseScript(scripts.Script):
    sorting_priority = 14

    def __init__(self):
        self.generation: Generation | None = None
        self.prompt_box = None  # txt2img's prompt textbox, for the live preview
        self._watching_prompt = False

    def title(self):
        return TITLE

    def show(self, is_img2img):
        if not self._watching_prompt:  # show() is called again and again (Script.elem_id calls it)
            self._watching_prompt = True
            tab = "img2img" if getattr(self, "is_img2img", is_img2img) else "txt2img"  # this instance's own tab
            self.on_after_component(self._remember_prompt, elem_id=f"{tab}_prompt")
        return scripts.AlwaysVisible

    def _remember_prompt(self, created):
        self.prompt_box = created.component

    def ui(self, is_img2img):
        built = accordion.build(self.elem_id, _ui_family())
        c = built.components
        if self.prompt_box is not None:
            watched = [c["enabled"], self.prompt_box, c["subjects"], c["style_loras"]]
            for box in watched:
                box.change(
                    live_preview.preview_markdown,
                    inputs=watched,
                    outputs=[built.preview],
                    show_progress=False,
                    trigger_mode="always_last",
                )
        readers = {name: _from_infotext(name) for name in c if name not in ("enabled", *INPUTS)}
        readers.update(enabled=lambda d: INFOTEXT_KEY in d, locked_masks=_locked_masks, masks_from=_masks_from)
        for name in ("layout", "layout_masks", "style_reference", "subject_references"):
            readers[name] = _untouched  # images are not in the infotext: a paste leaves them as they are
        order = positional_names()  # the positional API's order: a contract
        self.infotext_fields = [(c[name], readers[name]) for name in order]
        self.paste_field_names = []
        return [c[name] for name in order]

    # ------------------------------------------------------------------ Forge callbacks
    def process(self, p, *args):
        sessions.close_active("a new generation started")
        self.generation = None
        start(p)
        family = _model_family(p)
        parsed = settings_from_args(args, family, overrides=getattr(p, "freefuse_xyz", None))
        if parsed.problems:
            tell(p, "not used for this generation: " + "; ".join(parsed.problems))
            return
        settings = parsed.settings
        if settings is None or not settings.enabled:
            return
        for note in parsed.notes:
            tell(p, note)
        self.generation = Generation(settings, family, parsed.inputs)
        self.generation.record_settings(p)
        p.freefuse = self.generation  # the image_saved callback finds the generation through its p

    def process_before_every_sampling(self, p, *args, **kwargs):
        if self.generation is not None:
            self.generation.before_sampling(p)

    def postprocess_batch(self, p, *args, images=None, batch_number=0, **kwargs):
        if self.generation is not None:
            self.generation.after_batch(p, images, batch_number)

    def postprocess_image_after_composite(self, p, pp, *args):
        if self.generation is not None:
            self.generation.final_image(pp.image, pp.index)  # pp.index: the image's index in the job

    def postprocess(self, p, processed, *args):
        if self.generation is not None:
            self.generation.finish(p, processed)
        self.generation = None
        sessions.close_active()


def _model_family(p) -> str:
    """The loaded checkpoint's family for the defaults ("flux" when it is neither; the plan says so)."""
    try:
        return family_name(p.sd_model.forge_objects.unet.model.diffusion_model) or "flux"
    except AttributeError:
        return "flux"


@functools.lru_cache(maxsize=8)
def _pasted(text: str) -> dict | None:
    """A pasted FreeFuse infotext value as {setting or "values_for": value} (parsed once for all the
    components), or None if unusable. Its values are for the family it was recorded on."""
    try:
        settings, family = FreeFuseSettings.from_infotext(text)
    except ValueError:
        return None
    return {**settings.to_dict(), VALUES_FOR: family if family in FAMILY_LABELS else "flux"}


def _guard_sampling(params) -> None:
    """Every denoiser step of every generation, any tab: a FreeFuse session never acts on another model."""
    denoiser = getattr(params, "denoiser", None)
    try:
        unet = denoiser.inner_model.inner_model.forge_objects.unet
    except AttributeError:
        return
    sessions.guard_sampling(unet, getattr(denoiser, "step", None))


def _save_mask_picture(params) -> None:
    """Every saved image: if FreeFuse drew masks for it, save the picture beside it (when asked to)."""
    generation = getattr(params.p, "freefuse", None)
    if generation is not None:
        generation.image_saved(params.image, params.filename)


def _untouched(params: dict):
    return None  # None: Forge leaves the input as it is


def _locked_masks(params: dict):
    """A pasted image's masks (its "FreeFuse masks" entry) go to the locked-masks box; nothing pasted: cleared,
    so the masks of an earlier paste never stay behind."""
    return params.get(MASKS_KEY, "")


def _masks_from(params: dict):
    """Pasting an image that carries masks locks them ("Masks from: image"): its layout comes back exactly."""
    if params.get(MASKS_KEY):
        return "image"
    return _from_infotext("masks_from")(params)


def _from_infotext(name: str):
    def read(params: dict):
        values = _pasted(params[INFOTEXT_KEY]) if params.get(INFOTEXT_KEY) else None
        return None if values is None else values[name]  # None: Forge leaves the input as it is (UI and API)

    return read


def _add_xyz_axes():
    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py" and hasattr(data.module, "AxisOptionTxt2Img"):
            module = data.module
            existing = {getattr(a, "label", None) for a in module.axis_options}
            for label, name, kind, choices in XYZ_AXES:
                if label in existing:
                    continue
                extra = {"choices": (lambda c=choices: c)} if choices else {}
                module.axis_options.append(module.AxisOptionTxt2Img(label, kind, _xyz_apply(name), **extra))


def _xyz_apply(name: str):
    def apply(p, value, values):
        overrides = dict(getattr(p, "freefuse_xyz", None) or {})
        overrides[name] = value
        p.freefuse_xyz = overrides

    return apply


_add_xyz_axes()  # xyz_grid.py (a root script) is loaded before extension scripts
script_callbacks.on_before_ui(_add_xyz_axes)  # and again after a UI reload; adding is idempotent
script_callbacks.on_script_unloaded(lambda: sessions.close_active("scripts reloaded"))
script_callbacks.on_cfg_denoiser(_guard_sampling)
script_callbacks.on_image_saved(_save_mask_picture)
