"""The accordion as the stand-in gradio records it: groups by purpose, the chosen method's knobs only, inputs
whose range and step are the settings' own, human labels with one line of help, the positional order kept."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from freefuse.script_args import positional_names
from freefuse.settings import GROUPS, FreeFuseSettings, setting_meta
from tests.forge_common.fake_webui import installed_webui

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def script():
    with installed_webui():
        spec = importlib.util.spec_from_file_location("freefuse_script", ROOT / "scripts" / "freefuse.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module.FreeFuseScript()


def _built(script):
    from freefuse.forge import accordion

    return accordion.build(script.elem_id, "flux")


def test_the_components_come_back_in_the_positional_order_whatever_the_layout(script):
    components = script.ui(False)
    assert [c.kwargs["elem_id"].removeprefix("script_txt2img_freefuse_") for c in components] == positional_names()


def test_advanced_is_grouped_by_purpose_in_order(script):
    built = _built(script)
    assert list(built.groups) == ["layout", *(key for key, _ in GROUPS[1:] if key != "layout")]  # layout: its own
    for key, column in built.groups.items():
        assert column.kwargs["elem_id"].endswith(f"group_{key}")


def test_only_the_chosen_mask_methods_knobs_show(script):
    built = _built(script)
    assert built.groups["official"].kwargs["visible"] and not built.groups["paper"].kwargs["visible"]
    ((event, switch, inputs, outputs),) = built.components["mask_method"].events
    assert event == "change" and outputs == [built.groups["official"], built.groups["paper"]]
    assert [u["visible"] for u in switch("paper")] == [False, True]
    assert [u["visible"] for u in switch("official")] == [True, False]


def test_every_number_steps_by_its_own_scale_within_the_valid_range(script):
    built = _built(script)
    defaults = FreeFuseSettings.defaults("flux")
    for name, component in built.components.items():
        kind = type(component).__name__
        if kind not in ("Slider", "Number"):
            continue
        meta = setting_meta(name)
        assert (component.kwargs["minimum"], component.kwargs["maximum"]) == meta["bounds"], name
        assert component.kwargs["step"] == meta["step"], name
        assert component.kwargs["value"] == getattr(defaults, name)
    gravity, lr = built.components["gravity"].kwargs, built.components["balance_lr"].kwargs
    assert gravity["step"] == 1e-6 and lr["step"] == 0.001  # one press no longer jumps to 1


def test_labels_are_words_and_help_is_one_short_line(script):
    built = _built(script)
    for name, component in built.components.items():
        label, info = component.kwargs["label"], component.kwargs.get("info", "")
        assert "_" not in label and label[0].isupper(), (name, label)
        assert "\n" not in info and len(info) <= 100, (name, info)
    assert built.components["eos_background"].kwargs["label"] == "EOS as background"
    assert built.components["slic_segments"].kwargs["label"] == "SLIC segments"
