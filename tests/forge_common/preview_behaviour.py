"""The live subject preview: what FreeFuse will do with the prompt, from the same resolution as a generation,
on the loaded model's text engines, with the LoRAs found as Forge's LoRA extension will find them.

Runs against either harness's backend, with the webui side faked (tests/forge_common/fake_webui.py).
"""

from __future__ import annotations

import sys
import types

import torch

from freefuse.script_args import positional_names
from tests.forge_common import script_behaviour
from tests.forge_common.fake_webui import ClipEngine, T5Engine
from tests.forge_common.script_behaviour import N_TXT, ON, PROMPT, generate, subjects_line

webui = script_behaviour.webui  # the fixture


def _loaded(webui, unet):
    """A checkpoint loaded in Forge: its denoiser and text engines (nothing generated yet)."""
    webui.model_data.sd_model = types.SimpleNamespace(
        forge_objects=types.SimpleNamespace(unet=unet),
        text_processing_engine_t5=T5Engine(min_length=N_TXT),
        text_processing_engine_l=ClipEngine(),
    )


def _files(webui):
    webui.put_lora("A", "A.safetensors", activation_text="harry_potter")
    webui.put_lora("B", "B.safetensors", metadata={"modelspec.trigger_phrase": "daiyu_lin"})
    webui.put_lora("watercolor", "watercolor.safetensors")


def _preview(enabled, prompt, subjects="", styles=""):
    from freefuse.forge.live_preview import preview_markdown

    return preview_markdown(enabled, prompt, subjects, styles)


def test_the_preview_names_each_subject_its_phrase_and_where_the_phrase_came_from(harness, webui):
    _loaded(webui, harness.make_flux_unet(seed=0))
    _files(webui)
    text = _preview(True, PROMPT)
    assert text.startswith("**FreeFuse on FLUX** will keep these subjects apart:")
    assert '- `A`: "harry_potter" (activation text)' in text
    assert '- `B`: "daiyu_lin" (trigger phrase)' in text
    box = _preview(True, PROMPT, "A: harry_potter")
    assert '- `A`: "harry_potter" (subjects box)' in box


def test_the_preview_says_what_is_missing_what_overlaps_and_what_forge_does_not_know(harness, webui):
    _loaded(webui, harness.make_flux_unet(seed=0))
    _files(webui)
    missing = _preview(True, "<lora:A:1> <lora:B:1> photo of harry_potter alone")
    assert "will not run (it needs two subjects)" in missing and "LoRA 'B' stays global" in missing
    overlap = _preview(True, PROMPT, "A: harry_potter\nB: potter")
    assert "shares tokens" in overlap
    ghost = _preview(True, "<lora:ghost:1> " + PROMPT)
    assert "LoRA 'ghost' in the prompt is not a LoRA Forge knows" in ghost
    style = _preview(
        True, "<lora:A:1> <lora:B:1> <lora:watercolor:1> watercolor painting of harry_potter and daiyu_lin"
    )
    assert "`watercolor`" in style and "name is a word of the prompt" in style


def test_the_preview_and_a_generation_resolve_the_same_subjects(harness, webui):
    unet = harness.make_flux_unet(seed=0)
    loras = {n: harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("AB")}
    webui.load_lora("A", loras["A"].filename, activation_text="harry_potter")
    webui.load_lora("B", loras["B"].filename, metadata={"modelspec.trigger_phrase": "daiyu_lin"})
    _loaded(webui, unet)
    text = _preview(True, PROMPT)
    p = generate(harness, webui, harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)]), [ON])
    for name, phrase in (("A", "harry_potter"), ("B", "daiyu_lin")):
        assert f'`{name}`: "{phrase}"' in text and f"{name}: {phrase} " in subjects_line(p)


def test_the_preview_waits_for_a_model_and_says_when_it_is_not_supported(harness, webui):
    assert _preview(False, PROMPT) == ""
    assert "loads the checkpoint at the first generation" in _preview(True, PROMPT)
    webui.model_data.sd_model = types.SimpleNamespace()  # Forge's FakeInitialModel until the first load
    assert "loads the checkpoint at the first generation" in _preview(True, PROMPT)
    unsupported = harness.make_flux_unet(seed=0).clone()
    unsupported.model = types.SimpleNamespace(diffusion_model=torch.nn.Identity())  # an SD 1.5 UNet, say
    _loaded(webui, unsupported)
    assert "cannot run on the loaded model** (Identity)" in _preview(True, PROMPT)


def test_the_preview_follows_the_prompt_the_subjects_box_and_the_tick(webui):
    script = webui.module.FreeFuseScript()
    assert script.show(False) is webui.module.scripts.AlwaysVisible
    ((elem_id, remember),) = script.on_after_component_elem_id
    assert elem_id == "txt2img_prompt"
    prompt_box = sys.modules["gradio"].Textbox(elem_id="txt2img_prompt")  # the stand-in gradio
    remember(types.SimpleNamespace(component=prompt_box))
    components = script.ui(False)
    enabled, subjects = components[0], components[1]
    styles = components[positional_names().index("style_loras")]
    for box in (prompt_box, subjects, enabled, styles):
        ((event, fn, inputs, outputs),) = box.events if box is not subjects else [subjects.events[0]]
        assert event == "change" and inputs == [enabled, prompt_box, subjects, styles]
        assert fn.__name__ == "preview_markdown" and outputs[0].kwargs["elem_id"].endswith("preview")
