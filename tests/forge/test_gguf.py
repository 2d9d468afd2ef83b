"""FreeFuse on a GGUF FLUX (the usual way to run FLUX on small GPUs), with Forge's own GGUF layers.

Forge's GGUF Linear has no in/out_features and reports its weight shape in numpy integers; the runtime deltas
must still get integer shapes (they once got float slice bounds and raised inside sampling). Q8_0 and Q4_0 are
quantised by gguf itself, Q4_K is drawn as random blocks (see harness_gguf.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from freefuse.forge import session as sessions
from tests.forge.harness_gguf import build_gguf_flux_unet
from tests.forge_common.flux_behaviour import Runner, _settings
from tests.forge_common.harness_conventions import flux_config, one_thread

HIDDEN = {"Q8_0": 64, "Q4_0": 64, "Q4_K": 256}  # K-quant blocks hold 256 values: the Linears need that width


@pytest.fixture(params=list(HIDDEN))
def gguf_flux(request, harness, tmp_path):
    if int(np.__version__.split(".")[0]) >= 2:
        pytest.skip("Forge's bundled gguf reader needs numpy < 2 (Forge pins 1.26): run this tier with Forge's Python")
    qtype = request.param
    config = flux_config(
        n_double=3, n_single=2, hidden=HIDDEN[qtype], heads=2, context_dim=32, vec_dim=16, guidance=True
    )
    with one_thread():
        unet = build_gguf_flux_unet(harness.forge, config, seed=0, qtype_name=qtype, path=tmp_path / "flux.gguf")
    loras = {n: harness.make_lora(unet, name=n, seed=i + 1) for i, n in enumerate("AB")}
    return harness, unet, loras


def test_the_gguf_layers_report_numpy_shapes(gguf_flux):
    harness, unet, loras = gguf_flux
    qkv = unet.model.diffusion_model.double_blocks[0].img_attn.qkv
    assert getattr(qkv.weight, "gguf_cls", None) is not None and not hasattr(qkv, "out_features")
    assert type(qkv.weight.shape[0]).__module__ == "numpy"


@pytest.mark.parametrize("schedule", ["restart", "continue"])
def test_freefuse_runs_on_a_gguf_flux_and_its_masked_loras_change_the_image(gguf_flux, schedule):
    harness, unet, loras = gguf_flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    without = harness.sample(unet, seed=3)
    runner = Runner(harness, _settings(schedule=schedule, capture_step=1), [loras["A"], loras["B"]])
    out = runner.sample(both, seed=3)
    assert runner.session.messages == []  # no layer left merged, nothing refused
    assert runner.session.masks is not None
    assert torch.isfinite(out).all() and not torch.allclose(out, without)
    assert sessions.active() is None


def test_all_ones_masks_on_gguf_equal_the_same_deltas_added_to_the_dequantised_layers(gguf_flux):
    """With every mask at one, FreeFuse adds exactly the LoRA deltas at runtime: compare with a hook that adds
    the kohya delta to every LoRA layer's output of the unpatched GGUF model."""
    harness, unet, loras = gguf_flux
    both = harness.add_loras(unet, [(loras["A"], 1.0), (loras["B"], 1.0)])
    runner = Runner(harness, _settings(), [loras["A"], loras["B"]], masks=("ones", "ones"))
    out = runner.sample(both, seed=4, steps=2)
    handles = _add_deltas_by_hand(unet, [loras["A"], loras["B"]])
    try:
        reference = harness.sample(unet, seed=4, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-3)


def _add_deltas_by_hand(unet, loras):
    """Forward hooks adding up(down(x)) * alpha / r of every kohya LoRA layer (test reference)."""
    dm = unet.model.diffusion_model
    modules = {"lora_unet_" + name.replace(".", "_"): module for name, module in dm.named_modules()}
    deltas: dict[str, list] = {}
    for lora in loras:
        sd = lora.state_dict
        for key in sd:
            if key.endswith(".lora_down.weight"):
                prefix = key.removesuffix(".lora_down.weight")
                down, up = sd[key].float(), sd[f"{prefix}.lora_up.weight"].float()
                alpha = float(sd.get(f"{prefix}.alpha", torch.tensor(down.shape[0])))
                deltas.setdefault(prefix, []).append((down, up, alpha / down.shape[0]))
    handles = []
    for prefix, terms in deltas.items():

        def hook(module, args, output, terms=terms):
            x = args[0].float()
            return output + sum((x @ d.T @ u.T) * s for d, u, s in terms).to(output.dtype)

        handles.append(modules[prefix].register_forward_hook(hook))
    return handles
