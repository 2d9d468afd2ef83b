"""Runtime LoRA building (freefuse/forge/loras.py) on layers of unusual kinds: every layer is checked when FreeFuse
installs, so a layer it cannot run stays merged with a reason and never raises inside sampling.

The layers are plain torch modules shaped like Forge's: a GGUF Linear has no in/out_features and reports its
weight shape in numpy integers (backend/operations_gguf.py ParameterGGUF.real_shape); patch entries are Forge's
``[strength, ("lora", (up, down, alpha, mid, dora_scale)), strength_model, offset, function]``.
"""

from __future__ import annotations

import numpy as np
import torch

from freefuse.forge.loras import KEPT_SUFFIX, build_runtime_loras


class GgufWeight(torch.nn.Parameter):
    """ParameterGGUF as FreeFuse sees it: packed data, the logical shape in numpy integers."""

    @property
    def shape(self):
        return self.real_shape


class GgufLikeLinear(torch.nn.Module):
    """Forge's GGUF Linear: no in/out_features, a GgufWeight."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.weight = GgufWeight(torch.zeros(8), requires_grad=False)  # packed blocks
        self.weight.real_shape = torch.Size([np.uint64(out_features), np.uint64(in_features)])


def _model(**layers):
    root = torch.nn.Module()
    root.diffusion_model = torch.nn.Module()
    for name, layer in layers.items():
        setattr(root.diffusion_model, name, layer)
    return root


def _lora_entry(up, down, alpha=None, strength=1.0):
    return [strength, ("lora", (up, down, alpha, None, None)), 1.0, None, None]


def _taken(filename, patches):
    return {filename: [((filename, 1.0, 1.0, False), patches)]}


def _layouts(path):
    return {"gguf": "image", "plain": "image", "conv": "conv"}.get(path)


def test_a_gguf_layer_with_numpy_integer_shapes_gets_a_runtime_delta_that_runs():
    model = _model(gguf=GgufLikeLinear(6, 4))
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(6, 2, generator=gen), torch.randn(2, 4, generator=gen)
    runtime, keep = build_runtime_loras(
        model, _taken("a", {"diffusion_model.gguf.weight": [_lora_entry(up, down)]}), {"a": 0}, _layouts
    )
    assert keep == {} and runtime.left_merged == []
    (layer,) = runtime.layers
    assert type(layer.delta.out_features) is int
    x = torch.randn(1, 3, 4, generator=gen).half()  # GGUF layers compute in float16
    out = layer.delta.to(dtype=torch.float16).add_to(torch.zeros(1, 3, 6, dtype=torch.float16), x)
    torch.testing.assert_close(out.float(), (x.float() @ down.T @ up.T), rtol=1e-2, atol=1e-2)


def test_subject_locon_factors_with_different_kernels_leave_that_conv_merged_and_the_rest_at_runtime():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    model = _model(conv=conv, plain=torch.nn.Linear(4, 6))
    gen = torch.Generator().manual_seed(1)
    a3 = _lora_entry(torch.randn(6, 2, 1, 1, generator=gen), torch.randn(2, 4, 3, 3, generator=gen))
    b1 = _lora_entry(torch.randn(6, 2, 1, 1, generator=gen), torch.randn(2, 4, 1, 1, generator=gen))
    linear = _lora_entry(torch.randn(6, 2, generator=gen), torch.randn(2, 4, generator=gen))
    taken = {
        **_taken("a", {"diffusion_model.conv.weight": [a3], "diffusion_model.plain.weight": [linear]}),
        **_taken("b", {"diffusion_model.conv.weight": [b1]}),
    }
    runtime, keep = build_runtime_loras(model, taken, {"a": 0, "b": 1}, _layouts)
    assert [layer.module_path for layer in runtime.layers] == ["diffusion_model.plain"]
    assert keep == {
        ("a" + KEPT_SUFFIX, 1.0, 1.0, False): {"diffusion_model.conv.weight": [a3]},
        ("b" + KEPT_SUFFIX, 1.0, 1.0, False): {"diffusion_model.conv.weight": [b1]},
    }
    (reason,) = runtime.left_merged
    assert reason.startswith("conv (") and "must share in-channels and kernel size" in reason


def test_a_conv_factor_that_would_change_the_output_size_stays_merged():
    model = _model(conv=torch.nn.Conv2d(4, 6, 3, padding=1))
    gen = torch.Generator().manual_seed(2)
    one_by_one = _lora_entry(torch.randn(6, 2, 1, 1, generator=gen), torch.randn(2, 4, 1, 1, generator=gen))
    runtime, keep = build_runtime_loras(
        model, _taken("a", {"diffusion_model.conv.weight": [one_by_one]}), {"a": 0}, _layouts
    )
    assert runtime.layers == [] and list(keep) == [("a" + KEPT_SUFFIX, 1.0, 1.0, False)]
    assert "pixels" in runtime.left_merged[0]


def test_a_factor_that_does_not_fit_the_layers_outputs_stays_merged_with_the_reason():
    model = _model(plain=torch.nn.Linear(4, 6))
    gen = torch.Generator().manual_seed(3)
    too_tall = _lora_entry(torch.randn(9, 2, generator=gen), torch.randn(2, 4, generator=gen))
    runtime, keep = build_runtime_loras(
        model, _taken("a", {"diffusion_model.plain.weight": [too_tall]}), {"a": 0}, _layouts
    )
    assert runtime.layers == [] and keep
    assert runtime.left_merged[0].startswith("plain (") and "has 9 output rows" in runtime.left_merged[0]


def test_the_install_check_runs_on_the_deltas_own_device():
    """Forge moves patch tensors to the GPU in place (and may leave them there): the check must not assume the
    CPU. Meta tensors stand in for another device here."""
    model = _model(plain=torch.nn.Linear(4, 6), conv=torch.nn.Conv2d(4, 6, 3, padding=1))
    linear = _lora_entry(torch.randn(6, 2, device="meta"), torch.randn(2, 4, device="meta"))
    locon = _lora_entry(torch.randn(6, 2, 1, 1, device="meta"), torch.randn(2, 4, 3, 3, device="meta"))
    patches = {"diffusion_model.plain.weight": [linear], "diffusion_model.conv.weight": [locon]}
    runtime, keep = build_runtime_loras(model, _taken("a", patches), {"a": 0}, _layouts)
    assert runtime.left_merged == [] and keep == {}
    assert {layer.module_path for layer in runtime.layers} == {"diffusion_model.plain", "diffusion_model.conv"}
