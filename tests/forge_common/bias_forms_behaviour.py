"""The attention bias as extra query/key channels gives the same generation as the dense additive mask, on FLUX
and SDXL, for every bias preset, with CFG and batches; and the channels form never builds an L x L tensor.

Written once, run on both tiers. Masks are planted (left / right) so the bias is the only difference.
"""

from __future__ import annotations

import pytest
import torch

from freefuse.forge import session as sessions
from tests.forge_common import flux_behaviour, sdxl_behaviour
from tests.forge_common.flux_behaviour import Runner

flux, sdxl = flux_behaviour.flux, sdxl_behaviour.sdxl  # the fixtures
SAME = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture
def sdpa_masks(monkeypatch):
    """Every attn_mask that reaches torch's scaled_dot_product_attention while the test runs."""
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, attn_mask=None, **kwargs):
        seen.append(None if attn_mask is None else tuple(attn_mask.shape))
        return original(q, k, v, *args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def _both_forms(make_runner, both, **sample):
    outs = {}
    for form in ("dense", "channels"):
        runner = make_runner(form)
        outs[form] = runner.sample(both, **sample)
        assert runner.session.bias.form == form and not runner.session.messages
    assert sessions.active() is None
    return outs


FLUX_PRESETS = [
    dict(),
    dict(bias_positive=False),
    dict(bias_bidirectional=False),
    dict(bias_blocks="double_stream_only"),
    dict(bias_blocks="single_stream_only", bias_scale=2.5, bias_positive_scale=0.5),
]


@pytest.mark.parametrize("preset", FLUX_PRESETS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "all")
@pytest.mark.parametrize(("cfg", "batch"), [(1.0, 1), (3.0, 2)])
def test_flux_channels_equal_the_dense_bias(flux, preset, cfg, batch):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    settings = flux_behaviour._settings(attention_bias=True, **preset)

    def make(form):
        return Runner(harness, settings, [loras["A"], loras["B"]], masks=("left", "right"), bias_form=form)

    outs = _both_forms(make, both, seed=17, steps=3, cfg=cfg, batch=batch)
    torch.testing.assert_close(outs["channels"], outs["dense"], **SAME)
    plain = Runner(harness, flux_behaviour._settings(), [loras["A"], loras["B"]], masks=("left", "right"))
    assert not torch.allclose(outs["channels"], plain.sample(both, seed=17, steps=3, cfg=cfg, batch=batch), **SAME)


@pytest.mark.parametrize("preset", [dict(), dict(bias_positive=False, bias_scale=2.0)], ids=["default", "negative"])
@pytest.mark.parametrize(("cfg", "batch"), [(1.0, 1), (4.0, 2)])
def test_sdxl_channels_equal_the_dense_bias(sdxl, preset, cfg, batch):
    harness, unet, loras = sdxl
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    settings = sdxl_behaviour._settings(attention_bias=True, **preset)

    def make(form):
        return sdxl_behaviour.runner(
            harness, settings, [loras["A"], loras["B"]], masks=("left", "right"), bias_form=form
        )

    outs = _both_forms(make, both, seed=18, steps=3, cfg=cfg, batch=batch)
    torch.testing.assert_close(outs["channels"], outs["dense"], **sdxl_behaviour.TOL)


def test_the_channels_form_passes_no_mask_to_attention_and_caches_no_dense_bias(flux, sdpa_masks):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    runner = Runner(
        harness, flux_behaviour._settings(attention_bias=True), [loras["A"], loras["B"]], masks=("left", "right"),
        keep_open=True,
    )  # fmt: skip
    try:
        runner.sample(both, seed=19, steps=2, cfg=3.0)
        cached = [key for key in runner.session._cache if "dense bias" in key]
    finally:
        sessions.close_active()
    assert sdpa_masks and all(mask is None for mask in sdpa_masks)
    assert cached == []


def test_the_dense_form_is_the_fallback_and_says_so(flux, sdpa_masks, monkeypatch):
    harness, unet, loras = flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])

    def refuse(*args, **kwargs):
        raise RuntimeError("head dimension 72 is not supported")

    monkeypatch.setattr("freefuse.forge.attention_bias.attention_bias_channels", refuse)
    runner = Runner(
        harness, flux_behaviour._settings(attention_bias=True), [loras["A"], loras["B"]], masks=("left", "right")
    )
    out = runner.sample(both, seed=20, steps=2)
    assert runner.session.bias.form == "dense" and torch.isfinite(out).all()
    (message,) = runner.session.messages
    assert "dense mask" in message and "head dimension 72" in message
    assert any(mask is not None for mask in sdpa_masks)


def test_by_default_flux_joint_attention_takes_channels_and_sdxl_cross_attention_the_small_dense_bias(
    flux, sdxl, sdpa_masks
):
    for (harness, unet, loras), make in ((flux, Runner), (sdxl, sdxl_behaviour.runner)):
        settings = (flux_behaviour if make is Runner else sdxl_behaviour)._settings(attention_bias=True)
        both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
        sdpa_masks.clear()
        make(harness, settings, [loras["A"], loras["B"]], masks=("left", "right")).sample(both, seed=21, steps=2)
        masks = [shape for shape in sdpa_masks if shape is not None]
        if make is Runner:
            assert masks == []  # no (T + N)^2 tensor
        else:
            assert masks and all(shape[-1] == 77 for shape in masks)  # [rows, 1, N, 77]: N x 77 per image
