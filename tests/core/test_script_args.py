"""Script arguments in both API forms, and XYZ overrides."""

from freefuse.script_args import XYZ_AXES, settings_from_args
from freefuse.settings import FreeFuseSettings, setting_names


def test_positional_args_follow_the_ui_order_and_missing_ones_default():
    settings, problems = settings_from_args([True, "harry: harry_potter", "paper"])
    assert problems == []
    assert (settings.enabled, settings.subjects, settings.mask_method) == (
        True,
        "harry: harry_potter",
        "paper",
    )
    assert settings.schedule == "restart"


def test_the_full_ui_list_round_trips():
    s = FreeFuseSettings.defaults("flux").replace(enabled=True, temperature=123.0)
    settings, _ = settings_from_args(list(s.to_dict().values()))
    assert settings == s


def test_a_dict_replaces_the_positional_form_even_with_trailing_ui_defaults():
    ui_defaults = list(FreeFuseSettings.defaults("flux").to_dict().values())[1:]
    settings, problems = settings_from_args([{"enabled": True, "capture_step": 6}, *ui_defaults])
    assert problems == [] and settings.capture_step == 6 and settings.enabled


def test_bad_dicts_name_every_problem():
    settings, problems = settings_from_args([{"enabled": True, "tempurature": 3, "top_k_ratio": 7}])
    assert settings is None
    assert any("unknown setting 'tempurature'" in p for p in problems)
    assert any("top_k_ratio must be in (0, 1]" in p for p in problems)


def test_too_many_positional_args_are_refused():
    settings, problems = settings_from_args([True] * (len(setting_names()) + 1))
    assert settings is None and "positional arguments" in problems[0]


def test_xyz_overrides_win_and_are_validated():
    settings, _ = settings_from_args([True], overrides={"capture_step": "7", "mask_method": "paper"})
    assert (settings.capture_step, settings.mask_method) == (7, "paper")
    settings, problems = settings_from_args([True], overrides={"enabled": "False"})
    assert settings.enabled is False and problems == []
    assert {name for _, name, _, _ in XYZ_AXES} <= set(setting_names())


def test_on_sdxl_untouched_ui_values_take_the_sdxl_defaults_and_changed_ones_stay():
    ui = FreeFuseSettings.defaults("flux").replace(enabled=True, top_k_ratio=0.2)
    settings, problems = settings_from_args(list(ui.to_dict().values()), family="sdxl")
    assert problems == []
    assert settings == FreeFuseSettings.defaults("sdxl").replace(enabled=True, top_k_ratio=0.2)


def test_the_dict_form_on_sdxl_starts_from_the_sdxl_defaults():
    settings, _ = settings_from_args([{"enabled": True, "temperature": 300}], family="sdxl")
    assert (settings.capture_block, settings.capture_step, settings.temperature) == (3, 9, 300.0)


def test_nothing_is_validated_while_freefuse_is_off():
    settings, problems = settings_from_args([False, "", "official", "restart", True, 18, 4, 0.1, None])
    assert problems == [] and settings.enabled is False
