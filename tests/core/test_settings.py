"""FreeFuseSettings: family defaults, validation messages, dict and infotext round trips."""

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from freefuse.settings import FreeFuseSettings, SettingsError, setting_meta, setting_names


def test_flux_defaults_follow_the_official_code():
    s = FreeFuseSettings.defaults("flux")
    assert (s.capture_block, s.capture_step) == (18, 4)
    assert (s.top_k_ratio, s.temperature, s.bg_scale) == (0.1, 4000.0, 0.95)
    assert (s.bias_scale, s.bias_positive_scale, s.bias_blocks) == (4.0, 2.0, "all")
    assert (s.gravity, s.spatial, s.anisotropy, s.balance_iterations) == (4e-5, 4e-5, 1.1, 15)
    assert s.morphology and s.eos_background and s.token_exclusion
    assert (s.mask_method, s.schedule, s.enabled) == ("official", "restart", False)


def test_sdxl_defaults_differ_where_the_official_code_differs():
    s = FreeFuseSettings.defaults("sdxl")
    assert (s.capture_block, s.capture_step, s.temperature) == (3, 9, 1000.0)
    assert (s.bias_scale, s.bias_positive_scale) == (1.0, 1.0)
    assert (s.gravity, s.spatial, s.anisotropy) == (3e-5, 3e-5, 1.3)
    assert not s.morphology and not s.eos_background and not s.token_exclusion


def test_unknown_family_is_refused():
    with pytest.raises(SettingsError, match="unknown model family 'sd3'"):
        FreeFuseSettings.defaults("sd3")


def test_every_out_of_range_value_is_reported_in_one_error():
    with pytest.raises(SettingsError) as err:
        FreeFuseSettings.from_dict({"top_k_ratio": 1.5, "temperature": 0, "momentum": 1.0, "mask_method": "magic"})
    text = str(err.value)
    assert "top_k_ratio must be from 0.01 to 1; got 1.5" in text
    assert "temperature must be from 1 to 100000; got 0" in text
    assert "momentum must be from 0 to 0.99; got 1" in text
    assert "mask_method must be one of official, paper; got 'magic'" in text
    assert len(err.value.problems) == 4


def test_every_number_has_inclusive_bounds_its_default_lies_in_and_a_step_that_fits():
    from dataclasses import fields

    from freefuse.settings import setting_meta

    for family in ("flux", "sdxl"):
        defaults = FreeFuseSettings.defaults(family)
        for f in fields(FreeFuseSettings):
            meta, value = setting_meta(f.name), getattr(defaults, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            low, high = meta["bounds"]
            assert low <= value <= high, (f.name, value)
            assert meta["step"] and meta["step"] <= max(abs(value), meta["step"]), f.name  # no default off the grid
            ratio = value / meta["step"]
            assert abs(ratio - round(ratio)) < 1e-6, (f.name, value, meta["step"])  # the browser accepts the default


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(SettingsError, match=r"unknown setting 'temprature' \(did you mean 'temperature'\?\)"):
        FreeFuseSettings.from_dict({"temprature": 10})


def test_wrong_types_are_refused_not_truncated():
    with pytest.raises(SettingsError, match="capture_step must be a whole number; got 4.5"):
        FreeFuseSettings.from_dict({"capture_step": 4.5})
    with pytest.raises(SettingsError, match="enabled must be a true/false value"):
        FreeFuseSettings.from_dict({"enabled": "yes please"})
    with pytest.raises(SettingsError, match="must be a finite number"):
        FreeFuseSettings.from_dict({"temperature": float("nan")})


def test_strings_from_infotext_are_coerced():
    s = FreeFuseSettings.from_dict({"enabled": "True", "capture_step": "6", "temperature": "300"})
    assert (s.enabled, s.capture_step, s.temperature) == (True, 6, 300.0)


def test_bias_block_lists_are_accepted_and_garbage_is_not():
    assert FreeFuseSettings.from_dict({"bias_blocks": "double:0-18;single:0,5,7-9"}).bias_blocks
    with pytest.raises(SettingsError, match="bias_blocks .double_blocks please. is not usable"):
        FreeFuseSettings.from_dict({"bias_blocks": "double_blocks please"})


def test_missing_keys_take_the_family_default():
    s = FreeFuseSettings.from_dict({"enabled": True}, family="sdxl")
    assert s == FreeFuseSettings.defaults("sdxl").replace(enabled=True)


def test_every_setting_has_a_tooltip():
    for name in setting_names():
        assert len(setting_meta(name)["help"]) > 10, name


_values = st.fixed_dictionaries(
    {},
    optional={
        "subjects": st.text(max_size=40),
        "mask_method": st.sampled_from(["official", "paper"]),
        "schedule": st.sampled_from(["restart", "continue"]),
        "capture_step": st.integers(0, 50),
        "top_k_ratio": st.floats(0.01, 1.0),
        "temperature": st.floats(1.0, 1e5),
        "background": st.text(max_size=20),
        "morphology": st.booleans(),
        "gravity": st.floats(0.0, 0.01),
        "bias_blocks": st.sampled_from(["all", "none", "double:0-18", "single:1,2"]),
        "slic_segments": st.integers(0, 5000),
    },
)


@hsettings(max_examples=60, deadline=None)
@given(values=_values, family=st.sampled_from(["flux", "sdxl"]))
def test_dict_and_infotext_round_trips_are_lossless(values, family):
    s = FreeFuseSettings.from_dict({"enabled": True, **values}, family=family)
    assert FreeFuseSettings.from_dict(s.to_dict(), family=family) == s
    text = s.to_infotext(family)
    assert not any(char in text for char in ",:\n")  # Forge writes it unquoted, as the user reads it
    back, back_family = FreeFuseSettings.from_infotext(text)
    assert (back, back_family) == (s, family)


def test_infotext_holds_only_what_differs_from_the_defaults_in_plain_words():
    s = FreeFuseSettings.defaults("flux").replace(enabled=True, temperature=300.0, mask_method="paper")
    assert s.to_infotext("flux") == "family=flux; mask_method=paper; temperature=300.0"
    assert FreeFuseSettings.defaults("sdxl").replace(enabled=True).to_infotext("sdxl") == "family=sdxl"


def test_text_values_keep_every_character_without_commas_or_colons_in_the_entry():
    s = FreeFuseSettings.defaults("flux").replace(enabled=True, subjects="harry: harry_potter\ndaiyu: a, b; c=d 50%")
    text = s.to_infotext("flux")
    assert text == "family=flux; subjects=harry%3A harry_potter%0Adaiyu%3A a%2C b%3B c%3Dd 50%25"
    assert FreeFuseSettings.from_infotext(text)[0] == s


def test_an_infotext_of_version_0_1_still_pastes():
    old = '{"capture_step":6,"family":"sdxl","morphology":true,"subjects":"a: x","v":1}'
    settings, family = FreeFuseSettings.from_infotext(old)
    assert family == "sdxl"
    assert settings == FreeFuseSettings.defaults("sdxl").replace(
        enabled=True, capture_step=6, morphology=True, subjects="a: x"
    )


def test_broken_infotext_is_a_clear_error():
    with pytest.raises(SettingsError, match="infotext value is not readable"):
        FreeFuseSettings.from_infotext("{temperature: 3")
    with pytest.raises(SettingsError, match="not key=value"):
        FreeFuseSettings.from_infotext("family=flux; temperature")


def test_every_block_list_that_validates_also_parses_and_the_reverse():
    from freefuse.bias import bias_blocks

    for spec in ["double:0-18;single:0-37", "double:0-18,single:0-37", "transformer_blocks.3", "double:10-18"]:
        settings = FreeFuseSettings.from_dict({"bias_blocks": spec})
        assert bias_blocks(settings.bias_blocks, 19, 38)


def test_refinement_window_must_not_end_before_it_starts():
    from freefuse.settings import FreeFuseSettings, SettingsError

    with pytest.raises(SettingsError) as err:
        FreeFuseSettings.from_dict({"refine": True, "refine_start": 0.8, "refine_end": 0.5})
    assert err.value.problems == ["refine_start (0.8) must not be after refine_end (0.5)"]
    assert FreeFuseSettings.from_dict({"refine_start": 0.5, "refine_end": 0.5}).refine_end == 0.5
