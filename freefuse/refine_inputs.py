"""Refinement's reference images as the user gives them: one style image (or several), and each subject's images.

* style_reference: an image, or a list of images (base64 PNG/JPEG, data URL, numpy, PIL; file paths from the
  web UI only).
* subject_references: the API sends ``{"harry": [image, ...], "daiyu": image}``, keyed by LoRA name; the web
  UI sends files, each named after its LoRA (``harry.png``, ``harry-2.jpg``, ``daiyu_lin 1.webp``: the longest
  subject LoRA name the file name starts with, followed by nothing, a digit or a separator).

Every problem is one sentence; the references that can be read are still used.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from freefuse.layout_inputs import read_image


@dataclass
class References:
    style: list[np.ndarray] = field(default_factory=list)  # each [H, W, 3] uint8
    subjects: dict[str, list[np.ndarray]] = field(default_factory=dict)  # LoRA name -> images [H, W, 3] uint8
    messages: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.style and not any(self.subjects.values())


def read_references(style_value, subject_value, loras: list[str], allow_paths: bool = False) -> References:
    """The reference images of ``style_value`` and ``subject_value`` for the subject LoRAs ``loras``."""
    refs = References(subjects={lora: [] for lora in loras})
    for i, value in enumerate(_as_list(style_value)):
        image = _read(value, allow_paths, refs.messages, "style_reference" + (f" {i + 1}" if i else ""))
        if image is not None:
            refs.style.append(image)
    if isinstance(subject_value, dict):
        for name, values in subject_value.items():
            if name not in refs.subjects:
                refs.messages.append(
                    f"subject_references names {name!r}, which is not a subject LoRA of this prompt "
                    f"({', '.join(loras) or 'none'}); its images are not used"
                )
                continue
            for value in _as_list(values):
                image = _read(value, allow_paths, refs.messages, f"a subject reference of {name}")
                if image is not None:
                    refs.subjects[name].append(image)
    else:
        for value in _as_list(subject_value):
            name = _file_name(value, allow_paths)
            if name is None:
                refs.messages.append(
                    'subject_references must name each image\'s subject: {"<lora name>": [image, ...]}; '
                    "an unnamed image is not used"
                )
                continue
            owner = subject_of(name, loras)
            if owner is None:
                refs.messages.append(
                    f"subject reference {name!r} matches no subject LoRA ({', '.join(loras) or 'none'}); name the "
                    f"file after its LoRA, e.g. {(loras or ['harry'])[0]}-1.png"
                )
                continue
            image = _read(value, allow_paths, refs.messages, f"subject reference {name!r}")
            if image is not None:
                refs.subjects[owner].append(image)
    return refs


def subject_of(file_name: str, loras: list[str]) -> str | None:
    """The LoRA a reference file belongs to: the longest LoRA name its base name starts with (case-insensitive),
    followed by the end, a digit or a separator."""
    stem = os.path.splitext(os.path.basename(file_name))[0].lower()
    for lora in sorted(loras, key=len, reverse=True):
        if re.fullmatch(re.escape(lora.lower()) + r"([\s_\-.()\[\]]|\d).*|" + re.escape(lora.lower()), stem):
            return lora
    return None


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).float() / 255.0


def _as_list(value) -> list:
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _file_name(value, allow_paths: bool) -> str | None:
    """The file name of a web UI upload (a path, a Gradio file dict or tempfile wrapper); None for bare data
    (a base64 string, an array)."""
    if isinstance(value, dict):
        value = value.get("orig_name") or value.get("path") or value.get("name")
    elif not isinstance(value, str):
        value = getattr(value, "orig_name", None) or getattr(value, "name", None)
    elif not (allow_paths and os.path.isfile(value)):
        return None
    return os.path.basename(value) if isinstance(value, str) and value else None


def _read(value, allow_paths: bool, messages: list[str], what: str) -> np.ndarray | None:
    try:
        image = read_image(value, allow_paths)
    except (ValueError, OSError) as err:
        messages.append(f"{what} is not an image ({err}); it is not used")
        return None
    if image is None:
        return None
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]
