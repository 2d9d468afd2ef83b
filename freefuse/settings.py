"""FreeFuseSettings: every knob of both mask methods and both schedules, in one validated dataclass.

Defaults per model family follow the official FreeFuse code (see ``shared/design/algorithm.md`` 4.11 and 5).
The same object round-trips losslessly through a flat dict (the API) and an infotext string (paste-back).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from freefuse.bias import block_spec_problem
from freefuse.infotext import decode_settings, encode_settings

Family = Literal["flux", "sdxl"]
FAMILIES: tuple[str, ...] = ("flux", "sdxl")
MASK_METHODS: tuple[str, ...] = ("official", "paper")
SCHEDULES: tuple[str, ...] = ("restart", "continue")
BIAS_PRESETS: tuple[str, ...] = (
    "all",
    "double_stream_only",
    "single_stream_only",
    "last_half_double",
    "none",
)

INFOTEXT_KEY = "FreeFuse"


class SettingsError(ValueError):
    """One or more settings are invalid; ``problems`` lists one human-readable sentence per setting."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("FreeFuse settings: " + "; ".join(self.problems))


GROUPS: tuple[tuple[str, str], ...] = (  # (key, heading) in the order the accordion shows them
    ("main", ""),
    ("capture", "Capture"),
    ("official", "Official method"),
    ("paper", "Paper method"),
    ("background", "Background"),
    ("bias", "Attention bias"),
    ("tokens", "Token exclusion"),
    ("layout", "Layout"),
    ("style", "Style LoRAs"),
    ("refine", "Latent refinement"),
)
LAYOUT_USES: tuple[str, ...] = ("masks", "hint")
STYLE_SELECTORS: tuple[str, ...] = ("kl", "var", "l2", "cos", "klora", "sum")  # freefuse.style.SELECTORS
STYLE_RAMPS: tuple[str, ...] = ("s*", "s")
MASK_SOURCES: tuple[str, ...] = ("automatic", "image", "last")


def _knob(
    default: Any,
    label: str,
    help: str,
    *,
    group: str,
    bounds: tuple[float, float] | None = None,
    step: float | None = None,
    slider: bool = False,
    choices: tuple[str, ...] | None = None,
    **family_defaults: Any,
) -> Any:
    """A setting: its default, its label and one line of help for the accordion, its group, and for numbers
    the inclusive ``bounds`` (the only values validation accepts, and the UI's range), the UI ``step`` and
    whether it is a slider; optional per-family defaults (``sdxl=...``)."""
    metadata = {
        "label": label,
        "help": help,
        "group": group,
        "bounds": bounds,
        "step": step,
        "slider": slider,
        "choices": choices,
        "family": family_defaults,
    }
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FreeFuseSettings:
    # The field order is the positional API's order (with "Values for" after token_exclusion): append only.
    # --- main
    enabled: bool = _knob(False, "FreeFuse", "Turn FreeFuse on for this generation.", group="main")
    subjects: str = _knob(
        "", "Subjects", "Optional: one 'lora name: trigger phrase' line per subject LoRA.", group="main"
    )
    mask_method: str = _knob(
        "official",
        "Mask method",
        "official: what the FreeFuse code runs; paper: what the paper describes.",
        group="main",
        choices=MASK_METHODS,
    )
    schedule: str = _knob(
        "restart",
        "When masks are computed",
        "restart: extra evaluations first, masks from step 0; continue: during sampling, no extra cost.",
        group="main",
        choices=SCHEDULES,
    )
    show_masks: bool = _knob(True, "Show masks in output", "Add a picture of the subject masks.", group="main")
    # --- capture
    capture_block: int = _knob(
        18,
        "Capture block",
        "Block whose attention gives the masks (FLUX: double block; SDXL: output_blocks.0 transformer).",
        group="capture",
        bounds=(0, 18),
        step=1,
        slider=True,
        sdxl=3,
    )
    capture_step: int = _knob(
        4,
        "Capture step",
        "Sampling step (from 0) the masks are taken at; below the number of steps.",
        group="capture",
        bounds=(0, 150),
        step=1,
        slider=True,
        sdxl=9,
    )
    # --- official mask method
    top_k_ratio: float = _knob(
        0.1, "Core share", "Share of image tokens that form each subject's core.", group="official",
        bounds=(0.01, 1.0), step=0.01, slider=True,
    )  # fmt: skip
    temperature: float = _knob(
        4000.0, "Temperature", "Softmax temperature of the concept map; larger is flatter.", group="official",
        bounds=(1.0, 100000.0), step=100.0, sdxl=1000.0,
    )  # fmt: skip
    background: str = _knob(
        "", "Background phrase", "Optional words of the prompt that describe the background.", group="background"
    )
    eos_background: bool = _knob(
        True, "EOS as background", "Without a background phrase, the end-of-prompt token is the background.",
        group="background", sdxl=False,
    )  # fmt: skip
    bg_scale: float = _knob(
        0.95, "Background scale", "Weight of the background; larger gives more background.", group="background",
        bounds=(0.1, 3.0), step=0.01, slider=True,
    )  # fmt: skip
    morphology: bool = _knob(
        True, "Smooth masks", "Open/close the subjects' area to remove specks and holes.", group="background",
        sdxl=False,
    )  # fmt: skip
    # --- balanced argmax (official method)
    balance_iterations: int = _knob(
        15, "Balance iterations", "Rounds of the balanced split between subjects.", group="official",
        bounds=(0, 200), step=1, slider=True,
    )  # fmt: skip
    balance_lr: float = _knob(
        0.01, "Learning rate", "How fast the split evens out the subjects' areas.", group="official",
        bounds=(0.0, 1.0), step=0.001,
    )  # fmt: skip
    gravity: float = _knob(
        4e-5, "Gravity", "Pull towards each subject's centre (compact masks).", group="official",
        bounds=(0.0, 0.01), step=1e-6, sdxl=3e-5,
    )  # fmt: skip
    spatial: float = _knob(
        4e-5, "Neighbour vote", "Weight of the 3x3 neighbour vote (smooth masks).", group="official",
        bounds=(0.0, 0.01), step=1e-6, sdxl=3e-5,
    )  # fmt: skip
    momentum: float = _knob(
        0.2, "Momentum", "Momentum of the running subject probabilities.", group="official",
        bounds=(0.0, 0.99), step=0.01, slider=True,
    )  # fmt: skip
    centroid_margin: float = _knob(
        0.0, "Centroid margin", "Keep subject centres this far from the border (share of half-size).",
        group="official", bounds=(0.0, 0.99), step=0.01, slider=True,
    )  # fmt: skip
    border_penalty: float = _knob(
        0.0, "Border penalty", "Penalty for giving border tokens to a subject.", group="official",
        bounds=(0.0, 0.01), step=1e-6,
    )  # fmt: skip
    anisotropy: float = _knob(
        1.1, "Anisotropy", "Horizontal stretch of distances; above 1 favours side by side.", group="official",
        bounds=(0.5, 2.0), step=0.05, slider=True, sdxl=1.3,
    )  # fmt: skip
    # --- paper mask method
    sink_top_ratio: float = _knob(
        0.01, "Sink filter share", "Top share of each map checked for attention sinks (paper: 1%).", group="paper",
        bounds=(0.001, 1.0), step=0.001, slider=True,
    )  # fmt: skip
    sink_border: int = _knob(
        1, "Sink border", "Border width, in tokens, where attention sinks are removed.", group="paper",
        bounds=(0, 16), step=1, slider=True,
    )  # fmt: skip
    salient_ratio: float = _knob(
        0.01, "Salient share", "Share of image tokens whose self-attention forms the map.", group="paper",
        bounds=(0.001, 1.0), step=0.001, slider=True,
    )  # fmt: skip
    slic_segments: int = _knob(
        0, "SLIC segments", "Superpixels; 0 = square root of the pixel area (the paper's).", group="paper",
        bounds=(0, 20000), step=1,
    )  # fmt: skip
    slic_compactness: float = _knob(
        10.0, "SLIC compactness", "Superpixel compactness (paper: 10).", group="paper",
        bounds=(0.1, 100.0), step=0.5,
    )  # fmt: skip
    # --- generation-time effects
    attention_bias: bool = _knob(
        True, "Attention bias", "Keep each region's attention on its own subject's words.", group="bias"
    )
    bias_scale: float = _knob(
        4.0, "Negative scale", "How hard a region is pushed away from other subjects' words.", group="bias",
        bounds=(0.0, 20.0), step=0.1, slider=True, sdxl=1.0,
    )  # fmt: skip
    bias_positive_scale: float = _knob(
        2.0, "Positive scale", "How hard a region is pulled towards its own subject's words.", group="bias",
        bounds=(0.0, 20.0), step=0.1, slider=True, sdxl=1.0,
    )  # fmt: skip
    bias_positive: bool = _knob(True, "Positive bias", "Add the pull towards a subject's own words.", group="bias")
    bias_bidirectional: bool = _knob(
        True, "Both directions", "Also bias words towards their region (FLUX).", group="bias"
    )
    bias_blocks: str = _knob(
        "all", "Blocks", "all, double_stream_only, single_stream_only, last_half_double, none, or 'double:0-18'.",
        group="bias", choices=BIAS_PRESETS,
    )  # fmt: skip
    token_exclusion: bool = _knob(
        True, "Token exclusion", "Switch each subject LoRA off at the other subjects' words.", group="tokens",
        sdxl=False,
    )  # fmt: skip
    # --- added after 0.1 (positional API: after "Values for")
    save_mask_picture: bool = _knob(
        False, "Save the mask picture", "Save it next to each saved image, as <image name>-freefuse-masks.png.",
        group="main",
    )  # fmt: skip
    layout_use: str = _knob(
        "masks", "Use the drawing as", "masks: a drawn subject's mask is the drawing; hint: it steers the masks.",
        group="layout", choices=LAYOUT_USES,
    )  # fmt: skip
    hint_strength: float = _knob(
        0.5, "Hint strength", "0 ignores the drawing, 1 uses it as the masks.", group="layout",
        bounds=(0.0, 1.0), step=0.05, slider=True,
    )  # fmt: skip
    masks_from: str = _knob(
        "automatic", "Masks from", "automatic; image: the pasted image's masks; last: the last generation's.",
        group="layout", choices=MASK_SOURCES,
    )  # fmt: skip
    export_masks: bool = _knob(
        False, "Save one mask per subject", "Black/white, beside each saved image and in the API response.",
        group="layout",
    )  # fmt: skip
    # --- style
    style_loras: str = _knob(
        "", "Style LoRAs", "LoRA names, comma-separated: never subjects; fused with the subjects per layer and step.",
        group="style",
    )  # fmt: skip
    style_selector: str = _knob(
        "kl", "Style selector", "kl/var/l2/cos: the branch that moves the features more wins; klora; sum: both.",
        group="style", choices=STYLE_SELECTORS,
    )  # fmt: skip
    style_floor: float = _knob(
        0.0, "Style floor", "Share of the style kept where a subject wins.", group="style",
        bounds=(0.0, 1.0), step=0.05, slider=True,
    )  # fmt: skip
    style_ramp: str = _knob(
        "s*", "K-LoRA ramp", "klora only: s* (its default) or s (more style detail late).", group="style",
        choices=STYLE_RAMPS,
    )  # fmt: skip
    style_tokens: int = _knob(
        256, "Tokens compared", "Tokens sampled per layer call (image and text each) to compare the branches.",
        group="style",
        bounds=(16, 65536), step=16,
    )  # fmt: skip
    style_picture: bool = _knob(
        False, "Style map picture", "Add a picture per subject region: where the style won, by step and layer.",
        group="style",
    )  # fmt: skip
    # --- latent refinement (freefuse.refine)
    refine: bool = _knob(
        False, "Latent refinement", "Pull each step toward the reference images (CLIP/DINO from models/); slow.",
        group="refine",
    )  # fmt: skip
    refine_strength: float = _knob(
        0.03, "Refinement strength", "Size of each correction, relative to the latent's own size.", group="refine",
        bounds=(0.0, 0.5), step=0.005, slider=True,
    )  # fmt: skip
    refine_start: float = _knob(
        0.25, "Refine from", "Fraction of the steps where refinement starts.", group="refine",
        bounds=(0.0, 1.0), step=0.05, slider=True,
    )  # fmt: skip
    refine_end: float = _knob(
        0.75, "Refine until", "Fraction of the steps where refinement ends (not before Refine from).",
        group="refine", bounds=(0.0, 1.0), step=0.05, slider=True,
    )  # fmt: skip
    refine_style_weight: float = _knob(
        1.0, "Style reference weight", "Weight of the style score (CLIP, whole image).", group="refine",
        bounds=(0.0, 10.0), step=0.1,
    )  # fmt: skip
    refine_subject_weight: float = _knob(
        1.0, "Subject reference weight", "Weight of each subject's score (DINO, else CLIP, on its mask's box).",
        group="refine", bounds=(0.0, 10.0), step=0.1,
    )  # fmt: skip
    refine_clip: str = _knob(
        "", "CLIP vision model", "A file or folder in models/clip_vision; empty: the first one there.",
        group="refine",
    )  # fmt: skip
    refine_dino: str = _knob(
        "", "DINO model", "A DINOv2 folder in models/ (Hugging Face format); empty: the first found, else CLIP.",
        group="refine",
    )  # fmt: skip

    # ------------------------------------------------------------------ construction
    @classmethod
    def defaults(cls, family: str = "flux") -> FreeFuseSettings:
        """The defaults of one model family ("flux" or "sdxl")."""
        if family not in FAMILIES:
            raise SettingsError([f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}"])
        values = {}
        for f in fields(cls):
            per_family = f.metadata.get("family", {})
            if family in per_family:
                values[f.name] = per_family[family]
        return cls(**values)

    @classmethod
    def from_dict(cls, data: dict[str, Any], family: str = "flux") -> FreeFuseSettings:
        """Build from a flat dict (API or infotext); missing keys take the family default.

        Unknown keys, wrong types and out-of-range values raise SettingsError naming every problem.
        """
        if not isinstance(data, dict):
            raise SettingsError([f"expected an object of named settings, got {type(data).__name__}"])
        base = cls.defaults(family)
        known = {f.name: f for f in fields(cls)}
        problems: list[str] = []
        values: dict[str, Any] = {}
        for key, raw in data.items():
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"unknown setting {key!r}{hint}")
                continue
            try:
                values[key] = _coerce(raw, type(getattr(base, key)))
            except (TypeError, ValueError):
                expected = type(getattr(base, key)).__name__
                problems.append(f"{key} must be a {_TYPE_WORDS.get(expected, expected)}; got {raw!r}")
        settings = dataclasses.replace(base, **values)
        problems += settings.problems()
        if problems:
            raise SettingsError(problems)
        return settings

    def to_dict(self) -> dict[str, Any]:
        """Every setting as a flat dict of JSON types (the API's named form)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> FreeFuseSettings:
        """A validated copy with some settings changed."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """One sentence per invalid setting, naming it by its key; empty when everything is valid."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                out.append(f"{f.name} must be a finite number; got {value!r}")
        if out:
            return out
        for f in fields(self):
            value, bounds, choices = getattr(self, f.name), f.metadata["bounds"], f.metadata["choices"]
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                out.append(f"{f.name} must be from {_number(bounds[0])} to {_number(bounds[1])}; got {_number(value)}")
            elif choices is not None and f.name != "bias_blocks" and value not in choices:
                out.append(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        if self.refine and self.refine_start > self.refine_end:
            out.append(f"refine_start ({self.refine_start:g}) must not be after refine_end ({self.refine_end:g})")
        block_problem = block_spec_problem(self.bias_blocks)
        if block_problem is not None:
            out.append(f"bias_blocks {self.bias_blocks!r} is not usable: {block_problem}")
        return out

    def validate(self) -> None:
        """Raise SettingsError listing every invalid setting."""
        found = self.problems()
        if found:
            raise SettingsError(found)

    # ------------------------------------------------------------------ infotext
    def to_infotext(self, family: str = "flux") -> str:
        """The ``FreeFuse`` infotext value: the family and the settings that differ from its defaults
        (freefuse.infotext has the format)."""
        base = self.defaults(family).to_dict()
        return encode_settings(family, {k: v for k, v in self.to_dict().items() if k != "enabled" and base[k] != v})

    @classmethod
    def from_infotext(cls, text: str) -> tuple[FreeFuseSettings, str]:
        """Parse a ``FreeFuse`` infotext value (this version's or 0.1's JSON); (settings, enabled, family)."""
        try:
            data = decode_settings(text)
        except (TypeError, ValueError) as err:
            raise SettingsError([f"the {INFOTEXT_KEY} infotext value is not readable ({err})"]) from None
        family = data.pop("family", "flux")
        data["enabled"] = True
        return cls.from_dict(data, family), family


def _number(value: float) -> str:
    """A bound or value as a person writes it: 0.01, 4e-05, 100000, 7."""
    return f"{value:g}" if isinstance(value, float) else str(value)


_TYPE_WORDS = {"bool": "true/false value", "int": "whole number", "float": "number", "str": "text"}


def _coerce(raw: Any, kind: type) -> Any:
    """Convert API/infotext values to the field's type; refuse lossy conversions."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise TypeError(raw)
    if kind is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            return int(raw.strip())
        raise TypeError(raw)
    if kind is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int | float):
            return float(raw)
        if isinstance(raw, str):
            return float(raw.strip())
        raise TypeError(raw)
    if kind is str:
        if isinstance(raw, str):
            return raw
        raise TypeError(raw)
    raise TypeError(kind)


def setting_meta(name: str) -> dict[str, Any]:
    """Everything the accordion needs about a setting: label, help, group, bounds, step, slider, choices."""
    for f in fields(FreeFuseSettings):
        if f.name == name:
            return dict(f.metadata)
    raise KeyError(name)


def in_user_words(message: str, api: bool) -> str:
    """A message as its reader names settings: by key for an API client, by label in the web UI."""
    if api:
        return message
    for f in sorted(fields(FreeFuseSettings), key=lambda f: -len(f.name)):
        label = f.metadata["label"]
        if "_" in f.name:
            message = re.sub(rf"\b{f.name}\b", label, message)
        else:  # a plain word ("background") is a setting only where the message says what it must be
            message = re.sub(rf"(^|; |: ){f.name}( must be)", rf"\g<1>{label}\2", message)
    return message.replace("values_for", "Values for")


def family_knobs() -> list[str]:
    """The settings whose default depends on the model family, in declaration order."""
    return [f.name for f in fields(FreeFuseSettings) if f.metadata.get("family")]


def setting_names() -> list[str]:
    """Every setting name in declaration (= UI and positional API) order."""
    return [f.name for f in fields(FreeFuseSettings)]
