"""FreeFuseSettings: every knob of both mask methods and both schedules, in one validated dataclass.

Defaults per model family follow the official FreeFuse code (see ``shared/design/algorithm.md`` 4.11 and 5).
The same object round-trips losslessly through a flat dict (the API) and an infotext string (paste-back).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from freefuse.bias import block_spec_problem

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
INFOTEXT_VERSION = 1


class SettingsError(ValueError):
    """One or more settings are invalid; ``problems`` lists one human-readable sentence per setting."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("FreeFuse settings: " + "; ".join(self.problems))


def _knob(default: Any, help: str, **family_defaults: Any) -> Any:
    """A dataclass field with a tooltip and optional per-family defaults (``flux=..., sdxl=...``)."""
    return field(default=default, metadata={"help": help, "family": family_defaults})


@dataclass(frozen=True)
class FreeFuseSettings:
    # --- main
    enabled: bool = _knob(False, "Turn FreeFuse on for this generation.")
    subjects: str = _knob(
        "",
        "Optional. One line per subject LoRA, 'lora name: trigger phrase'. Empty: every <lora:...> whose "
        "trigger phrase appears in the prompt is a subject.",
    )
    mask_method: str = _knob(
        "official",
        "official: contrastive cross-attention + concept attention + balanced argmax (what the FreeFuse code "
        "runs). paper: sink filter + self-attention rows + superpixel voting (what the paper describes).",
    )
    schedule: str = _knob(
        "restart",
        "restart: a few extra model evaluations without the subject LoRAs find the masks, then sampling starts "
        "over with masks from step 0. continue: masks found during sampling, applied from the next step.",
    )
    show_masks: bool = _knob(True, "Add a picture of the subject masks to the output.")
    # --- capture
    capture_block: int = _knob(
        18,
        "Which transformer block's attention the masks come from (FLUX: double block index, 0-18; SDXL: "
        "transformer index inside output_blocks.0).",
        sdxl=3,
    )
    capture_step: int = _knob(4, "0-based sampling step at which the masks are captured.", sdxl=9)
    # --- official mask method
    top_k_ratio: float = _knob(0.1, "Fraction of image tokens used as each subject's core (official method).")
    temperature: float = _knob(
        4000.0, "Softmax temperature of the concept-attention map; larger is flatter.", sdxl=1000.0
    )
    background: str = _knob(
        "",
        "Optional phrase from the prompt that describes the background; its tokens form the background channel.",
    )
    eos_background: bool = _knob(
        True,
        "With no background phrase, use the end-of-prompt token as the background channel (FLUX/T5 only).",
        sdxl=False,
    )
    bg_scale: float = _knob(0.95, "Weight of the background channel; larger gives more background.")
    morphology: bool = _knob(True, "Open/close the foreground mask to remove specks and holes.", sdxl=False)
    # --- balanced argmax (official method)
    balance_iterations: int = _knob(15, "Iterations of the balanced argmax.")
    balance_lr: float = _knob(0.01, "Step size of the balanced argmax's area balancing.")
    gravity: float = _knob(4e-5, "Pull of each subject's centroid (compact masks).", sdxl=3e-5)
    spatial: float = _knob(4e-5, "Weight of the 3x3 neighbour vote (smooth masks).", sdxl=3e-5)
    momentum: float = _knob(0.2, "Momentum of the running subject probabilities.")
    centroid_margin: float = _knob(0.0, "Keep centroids this far from the image border (0-1 of half-size).")
    border_penalty: float = _knob(0.0, "Penalty for assigning border tokens to a subject.")
    anisotropy: float = _knob(1.1, "Horizontal stretch of distances (>1 favours side-by-side subjects).", sdxl=1.3)
    # --- paper mask method
    sink_top_ratio: float = _knob(0.01, "Attention-sink filter: top fraction of each row checked (paper: 1%).")
    sink_border: int = _knob(1, "Attention-sink filter: border width in tokens.")
    salient_ratio: float = _knob(0.01, "Fraction of image tokens whose self-attention rows form the map (paper).")
    slic_segments: int = _knob(0, "SLIC superpixels; 0 = round(sqrt(image pixel area)) as in the paper.")
    slic_compactness: float = _knob(10.0, "SLIC compactness (paper: 10).")
    # --- generation-time effects
    attention_bias: bool = _knob(True, "Bias attention between each subject's region and its trigger tokens.")
    bias_scale: float = _knob(4.0, "Negative bias towards other subjects' tokens / regions.", sdxl=1.0)
    bias_positive_scale: float = _knob(2.0, "Positive bias towards a subject's own tokens / region.", sdxl=1.0)
    bias_positive: bool = _knob(True, "Add the positive bias terms.")
    bias_bidirectional: bool = _knob(True, "Also bias text->image (joint attention, FLUX only).")
    bias_blocks: str = _knob(
        "all",
        "Blocks that get the bias: all, double_stream_only, single_stream_only, last_half_double, none, or "
        "a list such as 'double:0-18' / 'single:0-37'.",
    )
    token_exclusion: bool = _knob(
        True, "Zero each LoRA's delta at the other subjects' trigger tokens (text stream).", sdxl=False
    )

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
        """One sentence per invalid setting; empty when everything is valid."""
        out: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                out.append(message)

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                out.append(f"{f.name} must be a finite number; got {value!r}")
        if out:
            return out
        check(
            self.mask_method in MASK_METHODS,
            f"mask_method must be one of {', '.join(MASK_METHODS)}; got {self.mask_method!r}",
        )
        check(
            self.schedule in SCHEDULES,
            f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}",
        )
        check(self.capture_block >= 0, f"capture_block must be 0 or more; got {self.capture_block}")
        check(self.capture_step >= 0, f"capture_step must be 0 or more; got {self.capture_step}")
        check(0.0 < self.top_k_ratio <= 1.0, f"top_k_ratio must be in (0, 1]; got {self.top_k_ratio}")
        check(self.temperature > 0.0, f"temperature must be above 0; got {self.temperature}")
        check(self.bg_scale > 0.0, f"bg_scale must be above 0; got {self.bg_scale}")
        check(
            0 <= self.balance_iterations <= 200,
            f"balance_iterations must be 0-200; got {self.balance_iterations}",
        )
        check(self.balance_lr >= 0.0, f"balance_lr must be 0 or more; got {self.balance_lr}")
        check(self.gravity >= 0.0, f"gravity must be 0 or more; got {self.gravity}")
        check(self.spatial >= 0.0, f"spatial must be 0 or more; got {self.spatial}")
        check(0.0 <= self.momentum < 1.0, f"momentum must be in [0, 1); got {self.momentum}")
        check(
            0.0 <= self.centroid_margin < 1.0,
            f"centroid_margin must be in [0, 1); got {self.centroid_margin}",
        )
        check(self.border_penalty >= 0.0, f"border_penalty must be 0 or more; got {self.border_penalty}")
        check(self.anisotropy > 0.0, f"anisotropy must be above 0; got {self.anisotropy}")
        check(0.0 < self.sink_top_ratio <= 1.0, f"sink_top_ratio must be in (0, 1]; got {self.sink_top_ratio}")
        check(0 <= self.sink_border <= 16, f"sink_border must be 0-16 tokens; got {self.sink_border}")
        check(0.0 < self.salient_ratio <= 1.0, f"salient_ratio must be in (0, 1]; got {self.salient_ratio}")
        check(self.slic_segments >= 0, f"slic_segments must be 0 (auto) or more; got {self.slic_segments}")
        check(self.slic_compactness > 0.0, f"slic_compactness must be above 0; got {self.slic_compactness}")
        check(self.bias_scale >= 0.0, f"bias_scale must be 0 or more; got {self.bias_scale}")
        check(
            self.bias_positive_scale >= 0.0,
            f"bias_positive_scale must be 0 or more; got {self.bias_positive_scale}",
        )
        block_problem = block_spec_problem(self.bias_blocks)
        check(block_problem is None, f"bias_blocks {self.bias_blocks!r} is not usable: {block_problem}")
        return out

    def validate(self) -> None:
        """Raise SettingsError listing every invalid setting."""
        found = self.problems()
        if found:
            raise SettingsError(found)

    # ------------------------------------------------------------------ infotext
    def to_infotext(self, family: str = "flux") -> str:
        """A compact JSON string: the settings that differ from the family's defaults, plus the family."""
        base = self.defaults(family).to_dict()
        diff = {k: v for k, v in self.to_dict().items() if k != "enabled" and base[k] != v}
        return json.dumps({"v": INFOTEXT_VERSION, "family": family, **diff}, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_infotext(cls, text: str) -> tuple[FreeFuseSettings, str]:
        """Parse ``to_infotext`` output back; returns (settings with enabled=True, family)."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as err:
            raise SettingsError([f"the {INFOTEXT_KEY} infotext value is not valid JSON ({err})"]) from None
        if not isinstance(data, dict):
            raise SettingsError([f"the {INFOTEXT_KEY} infotext value must be a JSON object"])
        data = dict(data)
        data.pop("v", None)
        family = data.pop("family", "flux")
        data["enabled"] = True
        return cls.from_dict(data, family), family


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


def setting_help(name: str) -> str:
    """The one-line tooltip of a setting."""
    for f in fields(FreeFuseSettings):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)


def family_knobs() -> list[str]:
    """The settings whose default depends on the model family, in declaration order."""
    return [f.name for f in fields(FreeFuseSettings) if f.metadata.get("family")]


def setting_names() -> list[str]:
    """Every setting name in declaration (= UI and positional API) order."""
    return [f.name for f in fields(FreeFuseSettings)]
