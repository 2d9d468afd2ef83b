"""Script arguments in both API forms, "Values for", and XYZ overrides."""

from freefuse.script_args import XYZ_AXES, positional_args, positional_names, settings_from_args
from freefuse.settings import FreeFuseSettings, family_knobs, setting_names


def ui_values(family="flux", **changes):
    """The accordion's values as Forge passes them: every setting in UI order, then "Values for"."""
    return positional_args(FreeFuseSettings.defaults(family).replace(**changes), family)


def test_the_positional_order_is_a_contract_values_for_follows_token_exclusion():
    names = positional_names()
    cut = names.index("values_for")
    assert names[:cut] == setting_names()[: setting_names().index("token_exclusion") + 1]
    assert names[cut:] == [
        "values_for", "save_mask_picture", "layout_use", "hint_strength", "masks_from", "export_masks",
        "layout", "layout_masks", "locked_masks",
        "style_loras", "style_selector", "style_floor", "style_ramp", "style_tokens",
        "refine", "refine_strength", "refine_start", "refine_end", "refine_style_weight", "refine_subject_weight",
        "refine_clip", "refine_dino",
        "style_reference", "subject_references", "style_picture",
    ]  # fmt: skip
    not_settings = ("values_for", "layout", "layout_masks", "locked_masks", "style_reference", "subject_references")
    assert sorted(n for n in names if n not in not_settings) == sorted(setting_names())


def test_the_inputs_that_are_no_settings_come_back_apart_in_both_forms():
    drawing = "iVBORw0KGgo..."  # a base64 PNG, say
    positional = positional_args(FreeFuseSettings.defaults("flux").replace(enabled=True), "flux", layout=drawing)
    parsed = settings_from_args(positional)
    none = {"style_reference": None, "subject_references": None}
    assert parsed.inputs == {"layout": drawing, "layout_masks": None, "locked_masks": "", **none}
    assert not parsed.problems
    named = settings_from_args([{"enabled": True, "locked_masks": "{...}", "masks_from": "image"}])
    assert named.inputs == {"layout": None, "layout_masks": None, "locked_masks": "{...}", **none}
    refs = settings_from_args([{"enabled": True, "refine": True, "style_reference": "b64", "subject_references": {}}])
    assert refs.inputs["style_reference"] == "b64" and refs.inputs["subject_references"] == {}
    assert refs.settings.refine
    assert named.settings.masks_from == "image"


def test_positional_args_follow_the_ui_order_and_missing_ones_default():
    parsed = settings_from_args([True, "harry: harry_potter", "paper"])
    assert parsed.problems == [] and parsed.notes == []
    settings = parsed.settings
    assert (settings.enabled, settings.subjects, settings.mask_method) == (True, "harry: harry_potter", "paper")
    assert settings.schedule == "restart"


def test_the_full_ui_list_round_trips():
    s = FreeFuseSettings.defaults("flux").replace(enabled=True, temperature=123.0)
    assert settings_from_args(ui_values(enabled=True, temperature=123.0)).settings == s
    v01 = positional_args(s, "flux")[: positional_names().index("values_for")]  # a 0.1 call: no "Values for"
    assert settings_from_args(v01).settings == s


def test_a_dict_replaces_the_positional_form_even_with_trailing_ui_defaults():
    parsed = settings_from_args([{"enabled": True, "capture_step": 6}, *ui_values()[1:]])
    assert parsed.problems == [] and parsed.settings.capture_step == 6 and parsed.settings.enabled


def test_bad_dicts_name_every_problem():
    parsed = settings_from_args([{"enabled": True, "tempurature": 3, "top_k_ratio": 7}])
    assert parsed.settings is None
    assert any("unknown setting 'tempurature'" in p for p in parsed.problems)
    assert any("top_k_ratio must be from 0.01 to 1; got 7" in p for p in parsed.problems)


def test_too_many_positional_args_are_refused():
    parsed = settings_from_args([True] * (len(positional_names()) + 1))
    assert parsed.settings is None and "positional arguments" in parsed.problems[0]


def test_a_values_for_that_is_no_family_is_refused_while_on():
    cut = positional_names().index("values_for")
    wrong = [*ui_values(enabled=True)[:cut], "sd15"]
    assert "values_for must be one of flux, sdxl" in settings_from_args(wrong).problems[0]
    assert settings_from_args([*ui_values()[:cut], "sd15"]).problems == []  # off: nothing to complain about


def test_xyz_overrides_win_and_are_validated():
    settings = settings_from_args([True], overrides={"capture_step": "7", "mask_method": "paper"}).settings
    assert (settings.capture_step, settings.mask_method) == (7, "paper")
    parsed = settings_from_args([True], overrides={"enabled": "False"})
    assert parsed.settings.enabled is False and parsed.problems == []
    assert {name for _, name, _, _ in XYZ_AXES} <= set(setting_names())


def test_values_for_the_model_family_are_used_exactly_even_when_they_equal_the_other_familys_defaults():
    flux = FreeFuseSettings.defaults("flux")
    chosen = {name: getattr(flux, name) for name in family_knobs()}  # an SDXL user picks FLUX's values
    parsed = settings_from_args(ui_values("sdxl", enabled=True, **chosen), family="sdxl")
    assert parsed.problems == [] and parsed.notes == []
    assert parsed.settings == FreeFuseSettings.defaults("sdxl").replace(enabled=True, **chosen)
    assert (parsed.settings.capture_step, parsed.settings.morphology, parsed.settings.temperature) == (4, True, 4000.0)


def test_values_for_the_other_family_left_at_its_defaults_take_the_models_with_a_note():
    parsed = settings_from_args(ui_values("flux", enabled=True, top_k_ratio=0.2, capture_step=6), family="sdxl")
    assert parsed.settings == FreeFuseSettings.defaults("sdxl").replace(enabled=True, top_k_ratio=0.2, capture_step=6)
    (note,) = parsed.notes
    assert "set for FLUX but this is an SDXL model" in note
    assert "temperature 4000.0 -> 1000.0" in note and "capture_block 18 -> 3" in note
    assert "capture_step" not in note  # 6 was chosen: used as given
    assert "'Values for' to SDXL" in note and 'send "sdxl"' in note


def test_old_positional_calls_without_values_for_read_as_flux_values():
    parsed = settings_from_args(
        ui_values("flux", enabled=True)[: positional_names().index("values_for")], family="sdxl"
    )
    assert parsed.settings == FreeFuseSettings.defaults("sdxl").replace(enabled=True)
    assert parsed.notes == [
        "the values are set for FLUX but this is an SDXL model: the SDXL defaults are used; to choose them "
        "yourself, set 'Values for' to SDXL (API: send \"sdxl\" as values_for, the positional argument after "
        "token_exclusion, or named settings)"
    ]


def test_the_dict_form_names_exactly_what_it_sets_and_starts_from_the_models_defaults():
    parsed = settings_from_args([{"enabled": True, "temperature": 300, "capture_step": 4}], family="sdxl")
    s = parsed.settings
    assert (s.capture_block, s.capture_step, s.temperature, s.morphology) == (3, 4, 300.0, False)
    assert parsed.notes == []


def test_nothing_is_validated_while_freefuse_is_off():
    parsed = settings_from_args([False, "", "official", "restart", True, 18, 4, 0.1, None])
    assert parsed.problems == [] and parsed.settings.enabled is False
