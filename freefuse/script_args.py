"""Script arguments -> FreeFuseSettings: the UI/API positional list, or one dict of named settings.

Forge passes an AlwaysOn script its arguments positionally in UI order (A1111 convention); the API fills any
missing trailing ones with the UI defaults. FreeFuse also accepts ``{"args": [{"enabled": true, ...}]}``: a
dict as the first argument replaces the positional form entirely.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from freefuse.settings import MASK_METHODS, SCHEDULES, FreeFuseSettings, SettingsError, setting_names

# XYZ plot axes: (label, setting, value type, choices or None)
XYZ_AXES: tuple[tuple[str, str, type, list[str] | None], ...] = (
    ("[FreeFuse] Enabled", "enabled", str, ["True", "False"]),
    ("[FreeFuse] Mask method", "mask_method", str, list(MASK_METHODS)),
    ("[FreeFuse] Schedule", "schedule", str, list(SCHEDULES)),
    ("[FreeFuse] Capture block", "capture_block", int, None),
    ("[FreeFuse] Capture step", "capture_step", int, None),
    ("[FreeFuse] Top-k ratio", "top_k_ratio", float, None),
    ("[FreeFuse] Temperature", "temperature", float, None),
    ("[FreeFuse] Bias scale", "bias_scale", float, None),
    ("[FreeFuse] Positive bias scale", "bias_positive_scale", float, None),
    ("[FreeFuse] Background scale", "bg_scale", float, None),
)


def settings_from_args(
    args: Sequence[Any], family: str = "flux", overrides: dict[str, Any] | None = None
) -> tuple[FreeFuseSettings | None, list[str]]:
    """Validated settings, or (None, one message per problem). ``overrides`` (XYZ axes) win over args.

    Nothing is validated while FreeFuse is off, so a stray value never bothers a user who is not using it.
    The UI shows FLUX's defaults: on another family a positional value still equal to its FLUX default counts
    as untouched and takes that family's default (the dict form names only what the caller sets).
    """
    names = setting_names()
    if args and isinstance(args[0], dict):
        data = dict(args[0])
    else:
        if len(args) > len(names):
            return None, [
                f"got {len(args)} positional arguments; FreeFuse takes at most {len(names)} ({', '.join(names)})"
            ]
        data = dict(zip(names, args, strict=False))
        if family != "flux":
            shown = FreeFuseSettings.defaults("flux").to_dict()
            data = {k: v for k, v in data.items() if k not in shown or v != shown[k]}
    if overrides:
        data.update(overrides)
    if data.get("enabled", False) in (False, None, 0, "False", "false", ""):
        return FreeFuseSettings.defaults(family), []
    try:
        return FreeFuseSettings.from_dict(data, family), []
    except SettingsError as err:
        return None, err.problems
