"""Where a generation's masks come from: a drawing, mask images, a pasted image's masks, the last generation's.

The inputs arrive as the web UI's Gradio values (an ImageEditor dict of numpy arrays, file paths) or as an API
client sends them (base64 PNGs, optionally as data URLs; a dict with a "composite" image). ``choose_layout``
turns them into one ``Layout`` and a source label per subject, with one sentence per problem; a problem never
stops the generation, the subjects concerned keep their automatic masks.

Locked masks travel as the "FreeFuse masks" infotext entry of each image (``LockedMasks.to_text``):

    family=flux; subjects=harry%0Adaiyu; map=64x64:eNrt...

the family, the subject LoRAs in Subjects order, and their masks on the token grid (``encode_masks``).
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from freefuse.infotext import decode_settings, encode_settings
from freefuse.layouts import Layout, decode_masks, encode_masks, layout_from_drawing, layout_from_masks
from freefuse.settings import FreeFuseSettings

AUTOMATIC, DRAWN, HINTED, LOCKED = "automatic", "drawn", "hinted", "locked"


@dataclass
class LockedMasks:
    """One image's masks as they travel with it: the family, the subject LoRAs, masks ``[C, h, w]``."""

    family: str
    subjects: list[str]  # LoRA names, in Subjects order
    masks: Tensor  # [C, h, w] float32 in {0, 1}, on the token grid the image was made on

    def to_text(self) -> str:
        return encode_settings(self.family, {"subjects": "\n".join(self.subjects), "map": encode_masks(self.masks)})

    @classmethod
    def from_text(cls, text: str) -> LockedMasks:
        """Read a "FreeFuse masks" value; ValueError with the reason when it is not one."""
        try:
            data = decode_settings(text)
        except ValueError as err:
            raise ValueError(f"it is not a FreeFuse masks entry ({err})") from None
        if not {"family", "subjects", "map"} <= set(data):
            raise ValueError("it is not a FreeFuse masks entry (family, subjects and map are needed)")
        subjects = [s for s in str(data["subjects"]).split("\n") if s]
        return cls(str(data["family"]), subjects, decode_masks(str(data["map"]), len(subjects)))


@dataclass
class LayoutChoice:
    """The layout a generation uses (None: all automatic), each subject's source, and what to tell the user."""

    layout: Layout | None = None
    sources: list[str] = field(default_factory=list)  # per subject: automatic / drawn / hinted / locked
    messages: list[str] = field(default_factory=list)


def choose_layout(
    settings: FreeFuseSettings,
    inputs: dict[str, Any],
    subjects: list[str],
    family: str,
    last: LockedMasks | None = None,
    *,
    allow_paths: bool = False,
) -> LayoutChoice:
    """The layout for ``subjects`` (LoRA names, Subjects order) on a ``family`` model.

    ``inputs``: "layout" (a drawing), "layout_masks" (one black/white image per subject), "locked_masks" (a
    pasted "FreeFuse masks" value). ``settings.masks_from`` "image" locks the pasted masks, "last" ``last``;
    otherwise a drawing (or mask images) gives the drawn subjects' masks or hints them (``layout_use``).
    File paths are read only when ``allow_paths`` (the web UI's uploads), never for an API client.
    """
    choice = LayoutChoice(sources=[AUTOMATIC] * len(subjects))
    drawing = _read_first(inputs.get("layout"), allow_paths, choice.messages, "the layout drawing")
    mask_images = _read_all(inputs.get("layout_masks"), allow_paths, choice.messages)
    if settings.masks_from != AUTOMATIC:
        if drawing is not None or any(m is not None for m in mask_images):
            choice.messages.append(
                f"masks_from is {settings.masks_from}, so the layout drawing and mask images are not used"
            )
        _lock(choice, settings, inputs.get("locked_masks"), last, subjects, family)
        return choice
    if drawing is not None and any(m is not None for m in mask_images):
        choice.messages.append("both a layout drawing and mask images were given; the drawing is used")
    if drawing is not None:
        layout = layout_from_drawing(drawing, len(subjects))
    elif any(m is not None for m in mask_images):
        layout = layout_from_masks(mask_images, len(subjects))
    else:
        return choice
    choice.messages += layout.problems
    if not any(layout.drawn):
        if not layout.problems:  # else the problem already said why nothing is usable
            choice.messages.append("the layout has no subject's colour in it; all masks are automatic")
        return choice
    layout.use, layout.strength = settings.layout_use, settings.hint_strength
    if layout.use == "hint" and layout.strength <= 0.0:
        choice.messages.append("hint_strength is 0, so the layout hint changes nothing")
    label = DRAWN if layout.exact else HINTED
    choice.sources = [label if drawn else AUTOMATIC for drawn in layout.drawn]
    choice.layout = layout
    return choice


def _lock(choice: LayoutChoice, settings, text, last: LockedMasks | None, subjects: list[str], family: str) -> None:
    if settings.masks_from == "image":
        if not text:
            choice.messages.append(
                "masks_from is image, but no image's masks were pasted (PNG Info > Send to txt2img, or the "
                "FreeFuse masks entry as locked_masks); the masks are automatic"
            )
            return
        try:
            locked = LockedMasks.from_text(str(text))
        except ValueError as err:
            choice.messages.append(f"the pasted masks cannot be read: {err}; the masks are automatic")
            return
        where = "the pasted image's masks"
    else:
        if last is None:
            choice.messages.append("masks_from is last, but no generation has made masks yet; the masks are automatic")
            return
        locked, where = last, "the last generation's masks"
    if locked.family != family:
        choice.messages.append(
            f"{where} were made on a {locked.family.upper()} model, this is {family.upper()}; masks do not carry "
            "across model families, so they are automatic"
        )
        return
    if sorted(locked.subjects) != sorted(subjects):
        choice.messages.append(
            f"{where} are for the subjects {', '.join(locked.subjects) or 'none'}, this prompt's are "
            f"{', '.join(subjects)}; the masks are automatic"
        )
        return
    order = [locked.subjects.index(name) for name in subjects]
    masks = locked.masks[order]  # [C, h, w] in this prompt's Subjects order
    for name, mask in zip(subjects, masks, strict=True):
        if not mask.any():
            choice.messages.append(f"{where} give subject {name} no area; it stays without its LoRA there")
    choice.layout = Layout(masks=masks.float(), drawn=[True] * len(subjects))
    choice.sources = [LOCKED] * len(subjects)


# ---------------------------------------------------------------------- reading images
def _read_first(value, allow_paths: bool, messages: list[str], what: str) -> np.ndarray | None:
    """An ImageEditor value (or a plain image) as an ``[H, W, 3|4]`` uint8 array; None when nothing is drawn."""
    if isinstance(value, dict):
        composite = value.get("composite")
        if composite is None and value.get("background") is None:
            return None
        value = composite if composite is not None else value.get("background")
    try:
        array = read_image(value, allow_paths)
    except ValueError as err:
        messages.append(f"{what} cannot be read ({err}); it is not used")
        return None
    if array is None or (array.ndim == 3 and array.shape[-1] == 4 and not array[..., 3].any()):
        return None  # an empty canvas
    return array


def _read_all(value, allow_paths: bool, messages: list[str]) -> list[np.ndarray | None]:
    """One image per subject (a list; a single value is one image); unreadable entries become None."""
    if value is None or value == "" or value == []:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    images = []
    for number, item in enumerate(items, start=1):
        try:
            images.append(read_image(item, allow_paths))
        except ValueError as err:
            messages.append(f"mask image {number} cannot be read ({err}); that subject's mask is automatic")
            images.append(None)
    return images


def read_image(value, allow_paths: bool = False) -> np.ndarray | None:
    """A numpy array, PIL image, base64 PNG (or data URL), Gradio file dict, or (``allow_paths``) a file path,
    as a uint8 ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` array; None for an empty value."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dict):  # a Gradio FileData: {"path": ..., "url": ...}
        value = value.get("path") or value.get("name") or value.get("data")
        return read_image(value, allow_paths)
    if isinstance(value, Image.Image):
        return _as_uint8(np.asarray(value.convert("RGBA" if "A" in value.mode else "RGB")))
    if isinstance(value, np.ndarray):
        return _as_uint8(value)
    path = getattr(value, "name", None)  # a tempfile wrapper (older Gradio)
    if path is not None and not isinstance(value, str):
        value = path
    if not isinstance(value, str):
        raise ValueError(f"expected an image, got {type(value).__name__}")
    if allow_paths and os.path.isfile(value):
        with Image.open(value) as opened:
            return read_image(opened.copy())
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        data = base64.b64decode(text, validate=True)
        with Image.open(io.BytesIO(data)) as opened:
            return read_image(opened.copy())
    except Exception:  # noqa: BLE001 - any undecodable value gets the same sentence
        raise ValueError("not a base64-encoded PNG or JPEG") from None


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.max(initial=0) <= 1.0:
        array = array * 255.0
    return np.clip(array, 0, 255).astype(np.uint8)


def whole_image(n_subjects: int) -> Layout:
    """Every subject everywhere: one subject fused with a style covers the whole image (no capture)."""
    return Layout(masks=torch.ones(n_subjects, 1, 1), drawn=[True] * n_subjects)


def locked_from(masks: Tensor, image: int, subjects: list[str], family: str) -> LockedMasks:
    """Image ``image`` of batched masks ``[B, C, h, w]`` as the masks that travel with it."""
    return LockedMasks(family, list(subjects), masks[image].detach().float().cpu().clone())
