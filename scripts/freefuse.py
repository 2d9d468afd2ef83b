"""FreeFuse for Forge: the txt2img accordion, its arguments, infotext paste-back and XYZ axes.

Thin glue: arguments become a validated ``FreeFuseSettings`` and each Forge callback is handed to
``freefuse.forge.generation.Generation``. No maths here.
"""

from __future__ import annotations

import functools

import gradio as gr
from modules import script_callbacks, scripts
from modules.ui_components import InputAccordion

from freefuse.forge import session as sessions
from freefuse.forge.families import family_name
from freefuse.forge.generation import Generation, tell
from freefuse.script_args import FAMILY_LABELS, VALUES_FOR, XYZ_AXES, positional_names, settings_from_args
from freefuse.settings import (
    BIAS_PRESETS,
    INFOTEXT_KEY,
    MASK_METHODS,
    SCHEDULES,
    FreeFuseSettings,
    family_knobs,
    setting_help,
)

TITLE = "FreeFuse"
VALUES_FOR_HELP = (
    "The model family these values are for; switching fills in its defaults. On a model of the other family, "
    "values left at these defaults take that model's defaults (the Comments say which)."
)


def _ui_family() -> str:
    """The family whose defaults the accordion starts with: Forge's UI preset ("xl" -> SDXL, else FLUX)."""
    from modules import shared

    return "sdxl" if getattr(getattr(shared, "opts", None), "forge_preset", "") == "xl" else "flux"


def _tip_for(name: str, defaults: FreeFuseSettings) -> dict:
    return {
        "label": name.replace("_", " ").capitalize(),
        "value": getattr(defaults, name),
        "info": setting_help(name),
    }


class FreeFuseScript(scripts.Script):
    sorting_priority = 14

    def __init__(self):
        self.generation: Generation | None = None

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible if not is_img2img else False

    def ui(self, is_img2img):
        family = _ui_family()
        defaults = FreeFuseSettings.defaults(family)

        tip = functools.partial(_tip_for, defaults=defaults)
        c = {}
        with InputAccordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as enabled:
            c["enabled"] = enabled
            gr.Markdown(
                "Two or more character LoRAs in one picture, each kept to its own subject. Write each LoRA's "
                "trigger phrase in the prompt, e.g. `<lora:harry:1> <lora:daiyu:1> harry_potter and daiyu_lin "
                "hugging`."
            )
            c["subjects"] = gr.Textbox(
                lines=2,
                placeholder="harry: harry_potter\ndaiyu: daiyu_lin",
                **tip("subjects"),
                elem_id=self.elem_id("subjects"),
            )
            with gr.Row():
                c["mask_method"] = gr.Radio(choices=list(MASK_METHODS), **tip("mask_method"))
                c["schedule"] = gr.Radio(choices=list(SCHEDULES), **tip("schedule"))
            c["show_masks"] = gr.Checkbox(**tip("show_masks"))
            with gr.Accordion("Advanced", open=False):
                values_for = gr.Radio(
                    choices=[(label, name) for name, label in FAMILY_LABELS.items()],
                    value=family,
                    label="Values for",
                    info=VALUES_FOR_HELP,
                    elem_id=self.elem_id("values_for"),
                )
                with gr.Row():
                    c["capture_block"] = gr.Slider(minimum=0, maximum=18, step=1, **tip("capture_block"))
                    c["capture_step"] = gr.Slider(minimum=0, maximum=50, step=1, **tip("capture_step"))
                with gr.Row():
                    c["top_k_ratio"] = gr.Slider(minimum=0.01, maximum=1.0, step=0.01, **tip("top_k_ratio"))
                    c["temperature"] = gr.Number(minimum=1, **tip("temperature"))
                with gr.Row():
                    c["background"] = gr.Textbox(**tip("background"))
                    c["eos_background"] = gr.Checkbox(**tip("eos_background"))
                with gr.Row():
                    c["bg_scale"] = gr.Slider(minimum=0.1, maximum=3.0, step=0.01, **tip("bg_scale"))
                    c["morphology"] = gr.Checkbox(**tip("morphology"))
                with gr.Row():
                    c["balance_iterations"] = gr.Slider(minimum=0, maximum=100, step=1, **tip("balance_iterations"))
                    c["balance_lr"] = gr.Number(**tip("balance_lr"))
                    c["gravity"] = gr.Number(**tip("gravity"))
                    c["spatial"] = gr.Number(**tip("spatial"))
                with gr.Row():
                    c["momentum"] = gr.Slider(minimum=0.0, maximum=0.99, step=0.01, **tip("momentum"))
                    c["centroid_margin"] = gr.Slider(minimum=0.0, maximum=0.99, step=0.01, **tip("centroid_margin"))
                    c["border_penalty"] = gr.Number(**tip("border_penalty"))
                    c["anisotropy"] = gr.Slider(minimum=0.5, maximum=2.0, step=0.05, **tip("anisotropy"))
                with gr.Row():
                    c["sink_top_ratio"] = gr.Slider(minimum=0.001, maximum=0.2, step=0.001, **tip("sink_top_ratio"))
                    c["sink_border"] = gr.Slider(minimum=0, maximum=8, step=1, **tip("sink_border"))
                    c["salient_ratio"] = gr.Slider(minimum=0.001, maximum=0.2, step=0.001, **tip("salient_ratio"))
                with gr.Row():
                    c["slic_segments"] = gr.Number(minimum=0, precision=0, **tip("slic_segments"))
                    c["slic_compactness"] = gr.Number(minimum=0.1, **tip("slic_compactness"))
                with gr.Row():
                    c["attention_bias"] = gr.Checkbox(**tip("attention_bias"))
                    c["bias_scale"] = gr.Slider(minimum=0.0, maximum=10.0, step=0.1, **tip("bias_scale"))
                    c["bias_positive_scale"] = gr.Slider(
                        minimum=0.0, maximum=10.0, step=0.1, **tip("bias_positive_scale")
                    )
                with gr.Row():
                    c["bias_positive"] = gr.Checkbox(**tip("bias_positive"))
                    c["bias_bidirectional"] = gr.Checkbox(**tip("bias_bidirectional"))
                    c["bias_blocks"] = gr.Dropdown(
                        choices=list(BIAS_PRESETS), allow_custom_value=True, **tip("bias_blocks")
                    )
                    c["token_exclusion"] = gr.Checkbox(**tip("token_exclusion"))

        names = list(defaults.to_dict())
        assert list(c) == names, "build the settings' components in settings order"
        c[VALUES_FOR] = values_for
        knobs = family_knobs()
        values_for.input(_family_defaults, inputs=[values_for], outputs=[c[name] for name in knobs])
        readers = {name: _from_infotext(name) for name in names[1:]}
        readers.update(enabled=lambda d: INFOTEXT_KEY in d, values_for=_family_from_infotext)
        order = positional_names()  # the positional API's order: a contract
        self.infotext_fields = [(c[name], readers[name]) for name in order]
        self.paste_field_names = []
        return [c[name] for name in order]

    # ------------------------------------------------------------------ Forge callbacks
    def process(self, p, *args):
        sessions.close_active("a new generation started")
        self.generation = None
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
        self.generation = Generation(settings, family)
        self.generation.record_settings(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if self.generation is not None:
            self.generation.before_sampling(p)

    def postprocess_batch(self, p, *args, images=None, batch_number=0, **kwargs):
        if self.generation is not None:
            self.generation.after_batch(p, images, batch_number)

    def postprocess(self, p, processed, *args):
        sessions.close_active()


def _model_family(p) -> str:
    """The loaded checkpoint's family for the defaults ("flux" when it is neither; the plan says so)."""
    try:
        return family_name(p.sd_model.forge_objects.unet.model.diffusion_model) or "flux"
    except AttributeError:
        return "flux"


@functools.lru_cache(maxsize=8)
def _pasted_settings(text: str) -> FreeFuseSettings | None:
    """The settings in a pasted infotext value (parsed once for all the components), or None if unusable."""
    try:
        return FreeFuseSettings.from_infotext(text)[0]
    except ValueError:
        return None


def _family_defaults(family: str) -> list:
    """The family-dependent values of ``family``'s defaults, in UI order ("Values for" switched)."""
    defaults = FreeFuseSettings.defaults(family if family in FAMILY_LABELS else "flux")
    return [getattr(defaults, name) for name in family_knobs()]


def _family_from_infotext(params: dict):
    """The family a pasted FreeFuse entry was recorded on: its values are for that family."""
    text = params.get(INFOTEXT_KEY)
    if not text:
        return gr.update()
    try:
        family = FreeFuseSettings.from_infotext(text)[1]
    except ValueError:
        return gr.update()
    return family if family in FAMILY_LABELS else gr.update()


def _guard_sampling(params) -> None:
    """Every denoiser step of every generation, any tab: a FreeFuse session never acts on another model."""
    denoiser = getattr(params, "denoiser", None)
    try:
        unet = denoiser.inner_model.inner_model.forge_objects.unet
    except AttributeError:
        return
    sessions.guard_sampling(unet, getattr(denoiser, "step", None))


def _from_infotext(name: str):
    def read(params: dict):
        settings = _pasted_settings(params[INFOTEXT_KEY]) if params.get(INFOTEXT_KEY) else None
        return gr.update() if settings is None else getattr(settings, name)

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
