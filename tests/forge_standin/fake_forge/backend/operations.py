"""Forge's layer classes for Linear and Conv2d (`ForgeOperations.Linear` / `.Conv2d`), reduced.

Like Forge's, this Linear is a plain `torch.nn.Module` and NOT a `torch.nn.Linear`, so code that
selects layers with isinstance(m, nn.Linear) fails here as it does in Forge. It owns `weight` and
`bias` Parameters and runs F.linear; online LoRAs that Forge's LoraLoader attaches as
`forge_online_loras` are merged into the weight on every call, as in Forge's get_weight_and_bias.
Conv2d, as in Forge, IS a `torch.nn.Conv2d` subclass whose forward does the same online merge.

Simplified: no low-VRAM casting/streaming, no `dummy` parameter, no scale_weight; Forge's flux.py
builds its layers with `torch.nn.Linear` swapped by `using_forge_operations`, the stand-in's flux.py
uses this class directly. Unlike Forge's (which creates a bias only if the state dict has one), the
`bias` argument decides whether a bias exists. Conv2d starts from zeros (Forge leaves the memory
uninitialised: its reset_parameters does nothing); GroupNorm / LayerNorm are not swapped (Forge's
subclasses add only manual casting).
"""

import torch

from backend.patcher.lora import merge_lora_to_weight


def get_weight_and_bias(layer):
    """The layer's weight and bias with any online LoRA patches merged in (fresh tensors)."""
    online = getattr(layer, "forge_online_loras", None) or {}
    weight, bias = layer.weight, layer.bias
    if weight is not None and "weight" in online:
        weight = merge_lora_to_weight(online["weight"], weight, "online weight lora", weight.dtype)
    if bias is not None and "bias" in online:
        bias = merge_lora_to_weight(online["bias"], bias, "online bias lora", bias.dtype)
    return weight, bias


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
            self.scale_weight = None
            self.parameters_manual_cast = False

        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

        def extra_repr(self) -> str:
            has_bias = self.bias is not None
            return f"in_features={self.in_features}, out_features={self.out_features}, bias={has_bias}"

    class Conv2d(torch.nn.Conv2d):
        def reset_parameters(self):
            torch.nn.init.zeros_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

        def forward(self, x):
            weight, bias = get_weight_and_bias(self)
            return self._conv_forward(x, weight, bias)


Linear = ForgeOperations.Linear
Conv2d = ForgeOperations.Conv2d
