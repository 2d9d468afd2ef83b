"""Forge's conditioning containers (backend/sampling/condition.py), the part FLUX txt2img uses.

`compile_conditions({"crossattn": [B, L, C], "vector": [B, V], "guidance": [B]})` returns
[{"cross_attn", "pooled_output", "model_conds": {"c_crossattn", "y"[, "guidance"]}}]. Cross-attention
conditions of different lengths concatenate by repeating each up to the LCM length (refused when that
is more than 4x the shorter), as in Forge. Simplified: no ConditionNoiseShape / ConditionConstant,
no weighted (AND) composition.
"""

import math

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        reps = math.ceil(batch_size / tensor.shape[0])
        return tensor.repeat([reps] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        if a[0] != b[0] or a[2] != b[2]:
            return False
        return math.lcm(a[1], b[1]) // min(a[1], b[1]) <= 4

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = math.lcm(*(c.shape[1] for c in conds))
        return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=ConditionCrossAttn(cond)))]
    result = dict(
        cross_attn=cond["crossattn"],
        pooled_output=cond["vector"],
        model_conds=dict(c_crossattn=ConditionCrossAttn(cond["crossattn"]), y=Condition(cond["vector"])),
    )
    if "guidance" in cond:
        result["model_conds"]["guidance"] = Condition(cond["guidance"])
    return [result]
