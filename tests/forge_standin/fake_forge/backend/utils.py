"""Attribute-path helpers of Forge's backend/utils.py (the subset the stand-in needs)."""

import torch


def get_attr(obj, attr: str):
    """Follow a dotted path: get_attr(m, "a.b.c") is m.a.b.c."""
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def get_attr_with_parent(obj, attr: str):
    """(parent object, last name, value) for a dotted path."""
    *head, last = attr.split(".")
    parent = get_attr(obj, ".".join(head)) if head else obj
    return parent, last, getattr(parent, last)


def set_attr_raw(obj, attr: str, value) -> None:
    """Set the object at a dotted path as given (no Parameter wrapping)."""
    parent, last, _ = get_attr_with_parent(obj, attr)
    setattr(parent, last, value)


def set_attr(obj, attr: str, value) -> None:
    """Set a dotted path to a new frozen Parameter holding `value`."""
    set_attr_raw(obj, attr, torch.nn.Parameter(value, requires_grad=False))


def tensor2parameter(x):
    """Wrap a tensor in a frozen Parameter unless it already is one."""
    return x if isinstance(x, torch.nn.Parameter) else torch.nn.Parameter(x, requires_grad=False)


def fp16_fix(x):
    """Clamp fp16 activations to the finite range; other dtypes pass through."""
    return x.clip(-32768.0, 32768.0) if x.dtype == torch.float16 else x
