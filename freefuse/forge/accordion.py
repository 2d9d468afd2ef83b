"""The FreeFuse accordion: one Gradio component per setting, built from the setting's own metadata (label, one
line of help, bounds, step; freefuse/settings.py), grouped by purpose under Advanced. Only the chosen mask
method's group shows. Components are made in display order and handed back by name: the script returns them in
the positional API's order, which does not depend on the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import gradio as gr

from freefuse.preview import PALETTE
from freefuse.script_args import FAMILY_LABELS, VALUES_FOR
from freefuse.settings import GROUPS, FreeFuseSettings, family_knobs, setting_meta

INTRO = (
    "Two or more character LoRAs in one picture, each kept to its own subject. Write each LoRA's trigger phrase "
    "in the prompt, e.g. `<lora:harry:1> <lora:daiyu:1> harry_potter and daiyu_lin hugging`."
)
VALUES_FOR_HELP = "The model family these values are for; switching fills in its defaults."
LAYOUT_HELP = (
    "Draw each subject where it belongs, in its colour (Subjects order: red, green, blue, yellow, ...), or upload "
    "a colour-coded image. An undrawn subject keeps its automatic mask. **Masks from: image** reuses the masks of "
    "a pasted image (PNG Info or the paste button fill it in); **last** those of the last generation."
)
REFINE_HELP = (
    "Optional and slow: after each step in the window, the image is pulled toward the style reference (CLIP) and "
    "each subject's region toward its references (DINOv2, else CLIP). Needs a CLIP vision model in "
    "`models/clip_vision`; a DINOv2 folder in `models/` is used for subjects when present. Nothing is downloaded."
)
SUBJECTS_PLACEHOLDER = "harry: harry_potter\ndaiyu: daiyu_lin"
METHOD_GROUPS = {"official": "official", "paper": "paper"}  # group shown only for that mask method
PER_ROW = 3


@dataclass
class Accordion:
    components: dict[str, object] = field(default_factory=dict)  # setting name (and "values_for") -> component
    groups: dict[str, object] = field(default_factory=dict)  # group key -> its column
    preview: object | None = None  # what FreeFuse will do with the prompt (filled by the script)


def build(elem_id, family: str) -> Accordion:
    """The accordion's components, with ``family``'s defaults; ``elem_id(name)`` makes the element ids."""
    from modules.ui_components import InputAccordion

    defaults = FreeFuseSettings.defaults(family)
    names = [f.name for f in fields(FreeFuseSettings)]
    by_group = {key: [n for n in names if setting_meta(n)["group"] == key] for key, _ in GROUPS}
    ui = Accordion()
    c = ui.components
    with InputAccordion(False, label=setting_meta("enabled")["label"], elem_id=elem_id("enabled")) as enabled:
        c["enabled"] = enabled
        gr.Markdown(INTRO)
        c["subjects"] = component("subjects", defaults, elem_id, lines=2, placeholder=SUBJECTS_PLACEHOLDER)
        with gr.Row():
            for name in ("mask_method", "schedule"):
                c[name] = component(name, defaults, elem_id)
        with gr.Row():
            for name in ("show_masks", "save_mask_picture"):
                c[name] = component(name, defaults, elem_id)
        ui.preview = gr.Markdown("", elem_id=elem_id("preview"))
        with gr.Accordion("Layout", open=False, elem_id=elem_id("group_layout")) as layout_box:
            _layout(c, defaults, elem_id, by_group["layout"])
        ui.groups["layout"] = layout_box
        with gr.Accordion("Advanced", open=False):
            c[VALUES_FOR] = gr.Radio(
                choices=[(label, name) for name, label in FAMILY_LABELS.items()],
                value=family,
                label="Values for",
                info=VALUES_FOR_HELP,
                elem_id=elem_id(VALUES_FOR),
            )
            for key, heading in GROUPS[1:]:
                if key == "layout":
                    continue
                visible = key not in METHOD_GROUPS or defaults.mask_method == METHOD_GROUPS[key]
                with gr.Column(variant="panel", visible=visible, elem_id=elem_id(f"group_{key}")) as column:
                    gr.Markdown(f"**{heading}**")
                    members = by_group[key]
                    for start in range(0, len(members), PER_ROW):
                        with gr.Row():
                            for name in members[start : start + PER_ROW]:
                                c[name] = component(name, defaults, elem_id)
                    if key == "refine":
                        _references(c, elem_id)
                ui.groups[key] = column
    c["mask_method"].change(
        method_groups, inputs=[c["mask_method"]], outputs=[ui.groups[key] for key in METHOD_GROUPS], queue=False
    )
    c[VALUES_FOR].input(
        family_defaults, inputs=[c[VALUES_FOR]], outputs=[c[name] for name in family_knobs()], queue=False
    )
    return ui


def _layout(c: dict, defaults: FreeFuseSettings, elem_id, members: list[str]) -> None:
    """The layout a user draws or uploads, how it is used, where masks come from, and exporting them."""
    colours = [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in PALETTE]
    gr.Markdown(LAYOUT_HELP)
    c["layout"] = gr.ImageEditor(
        label="Layout drawing (one colour per subject)",
        type="numpy",
        image_mode="RGBA",
        sources=("upload", "clipboard"),
        layers=False,
        brush=gr.Brush(colors=colours, default_color=colours[0], color_mode="fixed"),
        elem_id=elem_id("layout"),
    )
    c["layout_masks"] = gr.File(
        label="Or mask images: one black and white image per subject, in Subjects order",
        file_count="multiple",
        file_types=["image"],
        elem_id=elem_id("layout_masks"),
    )
    for start in range(0, len(members), 2):
        with gr.Row():
            for name in members[start : start + 2]:
                c[name] = component(name, defaults, elem_id)
    c["locked_masks"] = gr.Textbox(  # filled by pasting an image's parameters; clear it to forget them
        value="",  # a str: Forge's API paste converts a pasted value to the component's value type
        label="Masks of the pasted image",
        info="Used when Masks from is image; pasting an image's parameters fills it in.",
        max_lines=1,
        elem_id=elem_id("locked_masks"),
    )


def _references(c: dict, elem_id) -> None:
    """Latent refinement's reference images: the style's, and each subject's (named after its LoRA)."""
    gr.Markdown(REFINE_HELP)
    with gr.Row():
        c["style_reference"] = gr.Image(
            label="Style reference", type="numpy", sources=("upload", "clipboard"), elem_id=elem_id("style_reference")
        )
        c["subject_references"] = gr.File(
            label="Subject references: name each file after its LoRA (harry.png, harry-2.jpg)",
            file_count="multiple",
            file_types=["image"],
            elem_id=elem_id("subject_references"),
        )


def component(name: str, defaults: FreeFuseSettings, elem_id, **extra):
    """The Gradio input for one setting, from its metadata."""
    meta = setting_meta(name)
    value = getattr(defaults, name)
    common = dict(label=meta["label"], value=value, info=meta["help"], elem_id=elem_id(name), **extra)
    if isinstance(value, bool):
        return gr.Checkbox(**common)
    if isinstance(value, str):
        if name == "bias_blocks":  # presets, or a list the user types
            return gr.Dropdown(choices=list(meta["choices"]), allow_custom_value=True, **common)
        if meta["choices"]:
            return gr.Radio(choices=list(meta["choices"]), **common)
        return gr.Textbox(**common)
    low, high = meta["bounds"]
    if meta["slider"]:
        return gr.Slider(minimum=low, maximum=high, step=meta["step"], **common)
    precision = 0 if isinstance(value, int) else None
    return gr.Number(minimum=low, maximum=high, step=meta["step"], precision=precision, **common)


def method_groups(method: str) -> list:
    """Show the chosen mask method's group, hide the other's."""
    return [gr.update(visible=method == shown) for shown in METHOD_GROUPS.values()]


def family_defaults(family: str) -> list:
    """The family-dependent values of ``family``'s defaults, in family_knobs() order ("Values for" switched)."""
    defaults = FreeFuseSettings.defaults(family if family in FAMILY_LABELS else "flux")
    return [getattr(defaults, name) for name in family_knobs()]
