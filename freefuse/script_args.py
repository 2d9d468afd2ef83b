"""Script arguments -> FreeFuseSettings: the UI/API positional list, or one dict of named settings.

Forge passes an AlwaysOn script its arguments positionally in UI order (A1111 convention); the API fills any
missing trailing ones with the UI defaults. The order is a contract, append-only (``positional_names``): the
settings of version 0.1, then "Values for", then settings added later. "Values for" is the model family the
values were written for ("flux" or "sdxl"; the accordion fills in that family's
defaults). On a model of that family every value is used exactly as given. On a model of the other family,
a family-dependent value still equal to its "Values for" default counts as not chosen and takes the model's
default instead, and a note lists each such value. FreeFuse also accepts ``{"args": [{"enabled": true, ...}]}``:
a dict as the first argument replaces the positional form; it names exactly the values to use, every other
value takes the loaded model's default. XYZ overrides are always used exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from freefuse.settings import (
    FAMILIES,
    MASK_METHODS,
    SCHEDULES,
    FreeFuseSettings,
    SettingsError,
    family_knobs,
    setting_meta,
    setting_names,
)

FAMILY_LABELS = {"flux": "FLUX", "sdxl": "SDXL"}

# XYZ plot axes: (label, setting, value type, choices or None); labels are the accordion's
_XYZ_SETTINGS = (
    "enabled", "mask_method", "schedule", "capture_block", "capture_step", "top_k_ratio", "temperature",
    "bias_scale", "bias_positive_scale", "bg_scale",
)  # fmt: skip
_XYZ_CHOICES = {"enabled": ["True", "False"], "mask_method": list(MASK_METHODS), "schedule": list(SCHEDULES)}
XYZ_AXES: tuple[tuple[str, str, type, list[str] | None], ...] = tuple(
    (
        f"[FreeFuse] {setting_meta(name)['label'] if name != 'enabled' else 'Enabled'}",
        name,
        str if name in _XYZ_CHOICES else type(getattr(FreeFuseSettings(), name)),
        _XYZ_CHOICES.get(name),
    )
    for name in _XYZ_SETTINGS
)


@dataclass
class ParsedArgs:
    """Validated settings (None when a value is unusable), one sentence per problem, notes to show, and the
    inputs that are no settings (``INPUTS``: a layout drawing, masks from an image; None when not given)."""

    settings: FreeFuseSettings | None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=dict)


VALUES_FOR = "values_for"
INPUTS = ("layout", "layout_masks", "locked_masks", "style_reference", "subject_references")  # positional values
# that are no settings: a drawing, mask images (one per subject), the masks of a pasted image, refinement's
# reference images (freefuse.refine_inputs); their UI values when nothing is given:
INPUT_DEFAULTS = {
    "layout": None, "layout_masks": None, "locked_masks": "", "style_reference": None, "subject_references": None,
}  # fmt: skip
_SINCE_02 = (  # what came after 0.2's layouts, in the order it came: style fusion, latent refinement
    "style_loras", "style_selector", "style_floor", "style_ramp", "style_tokens",
    "refine", "refine_strength", "refine_start", "refine_end", "refine_style_weight", "refine_subject_weight",
    "refine_clip", "refine_dino", "style_reference", "subject_references", "style_picture",
)  # fmt: skip
_LAST_OF_01 = "token_exclusion"  # the last setting of version 0.1
_AFTER_01 = ("values_for", "save_mask_picture", "layout_use", "hint_strength", "masks_from", "export_masks",
             "layout", "layout_masks", "locked_masks")  # fmt: skip


def positional_names() -> list[str]:
    """The names of the positional arguments in order: 0.1's settings, then what came after, in the order it
    came (spelled out, so a setting added later goes at the very end and moves nothing)."""
    names = setting_names()
    first = names[: names.index(_LAST_OF_01) + 1]
    listed = (*first, *_AFTER_01, *_SINCE_02)
    return [*listed, *(n for n in names if n not in listed)]  # a setting added later goes at the very end


def positional_args(settings: FreeFuseSettings, values_for: str, **inputs: Any) -> list[Any]:
    """``settings`` (and ``inputs``: a layout drawing, locked masks) as the positional list the accordion sends
    and an API client may send."""
    values = {
        **settings.to_dict(),
        VALUES_FOR: values_for,
        **{name: inputs.get(name, INPUT_DEFAULTS[name]) for name in INPUTS},
    }
    return [values[name] for name in positional_names()]


def settings_from_args(
    args: Sequence[Any], family: str = "flux", overrides: dict[str, Any] | None = None
) -> ParsedArgs:
    """The settings ``args`` ask for on a model of ``family``. ``overrides`` (XYZ axes) win over args.

    Nothing is validated while FreeFuse is off, so a stray value never bothers a user who is not using it.
    """
    notes: list[str] = []
    if args and isinstance(args[0], dict):
        data = dict(args[0])
        inputs = {name: data.pop(name, None) for name in INPUTS}
    else:
        names = positional_names()
        if len(args) > len(names):
            return ParsedArgs(
                None,
                [f"got {len(args)} positional arguments; FreeFuse takes at most {len(names)} ({', '.join(names)})"],
            )
        data = dict(zip(names, args, strict=False))
        inputs = {name: data.pop(name, None) for name in INPUTS}
        written_for = data.pop(VALUES_FOR, "flux")
        if written_for not in FAMILIES:
            if _is_on(data, overrides):
                return ParsedArgs(None, [f"values_for must be one of {', '.join(FAMILIES)}; got {written_for!r}"])
            written_for = family
        if written_for != family and family in FAMILIES:
            data, adopted = _adopt_family_defaults(data, written_for, family)
            if adopted:
                notes.append(_adopted_note(adopted, written_for, family))
    if overrides:
        data.update(overrides)
    if not _is_on(data, None):
        return ParsedArgs(FreeFuseSettings.defaults(family))
    try:
        return ParsedArgs(FreeFuseSettings.from_dict(data, family), notes=notes, inputs=inputs)
    except SettingsError as err:
        return ParsedArgs(None, err.problems)


def _is_on(data: dict, overrides: dict | None) -> bool:
    value = (overrides or {}).get("enabled", data.get("enabled", False))
    return value not in (False, None, 0, "False", "false", "")


def _adopt_family_defaults(data: dict, written_for: str, family: str) -> tuple[dict, list[tuple[str, Any, Any]]]:
    """Drop the family-dependent values still at ``written_for``'s default (they then take ``family``'s).

    Returns the remaining values and (name, given, used) for each value that changes.
    """
    given_defaults = FreeFuseSettings.defaults(written_for).to_dict()
    model_defaults = FreeFuseSettings.defaults(family).to_dict()
    kept, adopted = dict(data), []
    for name in family_knobs():
        if name in kept and kept[name] == given_defaults[name]:
            del kept[name]
            if model_defaults[name] != given_defaults[name]:
                adopted.append((name, given_defaults[name], model_defaults[name]))
    return kept, adopted


def _adopted_note(adopted: list[tuple[str, Any, Any]], written_for: str, family: str) -> str:
    theirs, model = FAMILY_LABELS[written_for], FAMILY_LABELS[family]
    every = {name for name, _, _ in adopted} == {
        name
        for name in family_knobs()
        if getattr(FreeFuseSettings.defaults(written_for), name) != getattr(FreeFuseSettings.defaults(family), name)
    }
    if every:
        what = f"the {model} defaults are used"
    else:
        changes = ", ".join(f"{name} {given} -> {used}" for name, given, used in adopted)
        what = f"the values left at their {theirs} defaults take the {model} defaults ({changes})"
    article = "an" if model[0] in "AEFHILMNORSX" else "a"
    return (
        f"the values are set for {theirs} but this is {article} {model} model: {what}; to choose them yourself, "
        f"set 'Values for' to {model} (API: send \"{family}\" as values_for, the positional argument after "
        "token_exclusion, or named settings)"
    )
