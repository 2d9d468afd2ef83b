"""Subject + style fusion inside Forge, on FLUX and SDXL: equivalences with known answers, the selectors running
on every LoRA layer kind, one subject with a style, the messages, and nothing left behind.

Runs against either harness's backend (tests/forge_common/).
"""

from __future__ import annotations

import pytest
import torch

from freefuse.forge import session as sessions
from freefuse.settings import FreeFuseSettings
from tests.forge_common import script_behaviour
from tests.forge_common.flux_behaviour import Runner, _clean_hooks
from tests.forge_common.script_behaviour import ON, entry, generate, subjects_line
from tests.forge_common.sdxl_behaviour import latent_grid

webui, model = script_behaviour.webui, script_behaviour.model  # the fixtures
TOL = dict(rtol=1e-3, atol=1e-4)  # a merged weight against a runtime delta, in float32


def _settings(family, **changes):
    base = dict(enabled=True, capture_block=1, capture_step=1, attention_bias=False, token_exclusion=False)
    return FreeFuseSettings.defaults(family).replace(**{**base, **changes})


@pytest.fixture(params=["flux", "sdxl"])
def family(request, harness):
    """(family, base unet, subject LoRAs A and B, style LoRA S, the grid function of the Runner)."""
    if request.param == "flux":
        unet = harness.make_flux_unet(seed=0)
        grid = None
    else:
        unet = harness.make_sdxl_unet(seed=0)
        grid = latent_grid
    a, b, s = (harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("ABS"))
    return request.param, unet, a, b, s, grid


def _run(harness, family, selector, *, style_weight=1.0, masks=("left", "right"), seed=3, cfg=2.0, keep_open=False):
    name, unet, a, b, s, grid = family
    patched = harness.add_loras(unet, [(a, 1.0), (b, 1.0), (s, style_weight)])
    settings = _settings(name, style_selector=selector)
    run = Runner(harness, settings, [a, b], masks=masks, grid_of=grid, styles=[s], keep_open=keep_open)
    return run.sample(patched, seed=seed, cfg=cfg), run


def _styled_layouts(run) -> set[str]:
    fusion = run.session.fusion
    return {layer.layout for layer in run.session.runtime.layers if fusion.applies(layer)}


def test_sum_equals_freefuse_with_the_style_merged_as_usual(harness, family):
    name, unet, a, b, s, grid = family
    merged_style = harness.add_loras(unet, [(a, 1.0), (b, 1.0), (s, 1.0)])
    reference = Runner(harness, _settings(name), [a, b], masks=("left", "right"), grid_of=grid).sample(
        merged_style, seed=3, cfg=2.0
    )
    fused, _ = _run(harness, family, "sum")
    torch.testing.assert_close(fused, reference, **TOL)


def test_a_style_at_weight_zero_never_wins_and_equals_freefuse_alone(harness, family):
    name, unet, a, b, s, grid = family
    alone = Runner(harness, _settings(name), [a, b], masks=("left", "right"), grid_of=grid).sample(
        harness.add_loras(unet, [(a, 1.0), (b, 1.0)]), seed=3, cfg=2.0
    )
    fused, run = _run(harness, family, "kl", style_weight=0.0)
    torch.testing.assert_close(fused, alone, **TOL)
    assert run.session.style_report == [1.0, 1.0]  # the subject won every decision


@pytest.mark.parametrize("selector", ["kl", "var", "l2", "cos", "klora"])
def test_every_selector_runs_on_every_layer_kind_and_leaves_nothing_behind(harness, family, selector):
    name, unet, a, b, s, grid = family
    plain = harness.sample(unet, seed=4)
    hooks = _clean_hooks(unet)
    fused, run = _run(harness, family, selector, keep_open=True)
    try:
        layouts = _styled_layouts(run)
    finally:
        sessions.close_active()
    report = run.session.style_report
    assert torch.isfinite(fused).all() and report is not None and all(r is not None for r in report), report
    expected = {"image", "text", "joint", "global"} if name == "flux" else {"image", "text", "conv"}
    assert expected <= layouts, layouts  # linear layers of every token layout, and LoCon convs on SDXL
    assert not torch.allclose(fused, _run(harness, family, "sum")[0], **TOL)  # selection changed the image
    assert sessions.active() is None and _clean_hooks(unet) == hooks
    assert torch.equal(harness.sample(unet, seed=4), plain)  # a plain run afterwards: bit-identical


def test_the_style_wins_where_it_moves_the_features_more(harness, family):
    """A style LoRA at 8x its weight against subjects at 0.1: the kl selector picks the style in both regions;
    the other way round it picks the subjects."""
    name, unet, a, b, s, grid = family
    strong_style = Runner(
        harness, _settings(name), [a, b], masks=("left", "right"), grid_of=grid, styles=[s]
    )  # kl by default
    strong_style.sample(harness.add_loras(unet, [(a, 0.1), (b, 0.1), (s, 8.0)]), seed=3)
    assert strong_style.session.style_report == [0.0, 0.0]
    strong_subjects = Runner(harness, _settings(name), [a, b], masks=("left", "right"), grid_of=grid, styles=[s])
    strong_subjects.sample(harness.add_loras(unet, [(a, 8.0), (b, 8.0), (s, 0.1)]), seed=3)
    assert strong_subjects.session.style_report == [1.0, 1.0]


# ---------------------------------------------------------------------- through the script (FLUX)
def _with_style(harness, webui, model, style_prompt="in watercolor", **settings):
    unet, both, loras = model
    style = harness.make_lora(unet, name="S", seed=7)
    webui.load_lora("S", style.filename)
    patched = harness.add_loras(both, [(style, 1.0)])
    prompt = f"<lora:A:1> <lora:B:1> <lora:S:1> photo of harry_potter and daiyu_lin hugging {style_prompt}"
    return generate(harness, webui, patched, [{**ON, "style_loras": "S", **settings}], prompt=prompt)


def test_two_subjects_and_a_marked_style_record_what_the_selector_did(harness, webui, model):
    p = _with_style(harness, webui, model)
    assert not p.comments or all("always chose" in c for c in p.comments), p.comments
    line = entry(p, "FreeFuse style")
    assert line.startswith("S (kl): A ") and "% style" in line and ", B " in line
    assert "style_loras=S" in entry(p, "FreeFuse")


def test_one_subject_and_a_style_fuse_over_the_whole_image_without_a_capture(harness, webui, model, monkeypatch):
    from tests.forge_common.layout_behaviour import Seen

    unet, both, loras = model
    style = harness.make_lora(unet, name="S", seed=7)
    webui.load_lora("S", style.filename)
    seen = Seen(monkeypatch)
    one = harness.add_loras(unet, [(loras["A"], 1.0), (style, 1.0)])
    prompt = "<lora:A:1> <lora:S:1> photo of harry_potter in watercolor"
    p = generate(harness, webui, one, [{**ON, "style_loras": "S"}], prompt=prompt)
    assert seen.captures == 0 and subjects_line(p) == "A: harry_potter 100%"
    assert entry(p, "FreeFuse style").startswith("S (kl): A ")


@pytest.mark.parametrize(
    ("settings", "prompt", "said"),
    [
        ({"style_loras": "S, ghost"}, None, "style LoRA 'ghost' is not in the prompt"),
        ({"style_loras": "S", "subjects": "S: watercolor"}, None, "marked as a style and named in the Subjects box"),
    ],
)
def test_each_bad_style_mark_is_said_once_and_the_image_is_generated(harness, webui, model, settings, prompt, said):
    p = _with_style(harness, webui, model, **settings)
    assert [c for c in p.comments if said in c], p.comments
    assert entry(p, "FreeFuse style") is not None  # the style still fused


def test_a_style_without_any_subject_is_said_and_freefuse_steps_aside(harness, webui, model):
    unet, both, loras = model
    style = harness.make_lora(unet, name="S", seed=7)
    webui.load_lora("S", style.filename)
    p = generate(
        harness, webui, harness.add_loras(unet, [(style, 1.0)]), [{**ON, "style_loras": "S"}],
        prompt="<lora:S:1> a watercolor cat",
    )  # fmt: skip
    assert [c for c in p.comments if "style fusion needs a subject LoRA" in c]
    assert entry(p, "FreeFuse") is None and sessions.active() is None


@pytest.mark.parametrize("selector", ["kl", "klora"])
def test_the_style_map_picture_shows_each_region_by_step_and_layer(harness, webui, model, selector):
    from freefuse.preview import UNDECIDED_COLOUR

    plain = _with_style(harness, webui, model, style_selector=selector)
    p = _with_style(harness, webui, model, style_selector=selector, style_picture=True)
    assert len(p.extra_result_images) == len(plain.extra_result_images) + 1  # the mask picture, then the map
    picture = p.extra_result_images[-1]
    steps, panel_w, cell, title, gap = 4, 60, 6, 14, 4  # 4 steps: panels at their 60 px minimum width
    assert picture.width == 2 * (panel_w + gap) + gap
    layers = (picture.height - title - gap) // cell
    assert layers > 1 and picture.height == title + layers * cell + gap  # a row per LoRA layer with a style

    def decided(step):  # any layer of the first region's panel decided at that step
        cells = [picture.getpixel((gap + step * cell + cell // 2, title + k * cell + cell // 2)) for k in range(layers)]
        return any(c != UNDECIDED_COLOUR for c in cells)

    # restart schedule: masks from step 0, so every step decided in the region (text-only layers never do)
    assert all(decided(step) for step in range(steps))
    assert torch.equal(p.latent, plain.latent)  # the picture changes nothing of the image
