"""Per-token LoRA weights for one model call.

A model call stacks ``len(cond_or_uncond)`` chunks of ``images`` rows each (Forge: 0 = cond, 1 = uncond;
uncond first when both are present). Every subject LoRA gets one weight per token:

- image tokens: the subject's mask for that image (cond and uncond alike, so CFG does not amplify the
  difference between a masked and an unmasked LoRA);
- text tokens: 1, except 0 at the OTHER subjects' trigger tokens in cond rows (token exclusion). Text positions
  are positions in the cond prompt; when Forge repeats a shorter cond up to the uncond's length, the pattern
  repeats with it (position ``t`` of the call is position ``t % n_txt_cond`` of the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

OFF, FULL, MASKED = "off", "full", "masked"


@dataclass(frozen=True)
class CallShape:
    cond_or_uncond: tuple[int, ...]  # one entry per chunk of rows
    images: int  # rows per chunk
    n_img: int  # image tokens per row
    n_txt: int  # text tokens per row in this call

    @property
    def rows(self) -> int:
        return len(self.cond_or_uncond) * self.images


def image_weights(shape: CallShape, masks: torch.Tensor | None, n_subjects: int, mode: str) -> torch.Tensor:
    """[rows, N_img, C] weights of the image tokens.

    ``masks`` [images, C, h, w] (h * w == N_img) is used in MASKED mode; OFF gives zeros, FULL ones.
    """
    if mode != MASKED:
        fill = 0.0 if mode == OFF else 1.0
        return torch.full((shape.rows, shape.n_img, n_subjects), fill)
    if masks is None:
        raise ValueError("MASKED mode needs masks")
    per_image = masks.flatten(2).transpose(1, 2).float()  # [images, N_img, C]
    if per_image.shape != (shape.images, shape.n_img, n_subjects):
        raise ValueError(
            f"masks give {tuple(per_image.shape)} but the call has {shape.images} images x {shape.n_img} tokens "
            f"x {n_subjects} subjects"
        )
    return per_image.repeat(len(shape.cond_or_uncond), 1, 1)


def exclusion_pattern(subject_positions: Sequence[Sequence[int]], n_txt_cond: int) -> torch.Tensor:
    """[n_txt_cond, C]: 1 everywhere, 0 where another subject's trigger tokens sit."""
    n_subjects = len(subject_positions)
    pattern = torch.ones(n_txt_cond, n_subjects)
    for owner, positions in enumerate(subject_positions):
        index = torch.as_tensor([p for p in positions if p < n_txt_cond], dtype=torch.long)
        for other in range(n_subjects):
            if other != owner and index.numel():
                pattern[index, other] = 0.0
    return pattern


def text_weights(
    shape: CallShape,
    pattern: torch.Tensor | None,
    n_subjects: int,
    mode: str,
) -> torch.Tensor:
    """[rows, n_txt, C] weights of the text tokens; ``pattern`` from exclusion_pattern (None = no exclusion)."""
    if mode == OFF:
        return torch.zeros(shape.rows, shape.n_txt, n_subjects)
    weights = torch.ones(shape.rows, shape.n_txt, n_subjects)
    if mode == FULL or pattern is None:
        return weights
    repeated = pattern[torch.arange(shape.n_txt) % pattern.shape[0]]  # [n_txt, C]
    for chunk, kind in enumerate(shape.cond_or_uncond):
        if kind == 0:
            weights[chunk * shape.images : (chunk + 1) * shape.images] = repeated
    return weights


def repeat_positions(positions: Sequence[int], n_cond: int, n_call: int) -> list[int]:
    """Cond text positions as they recur when Forge repeats a shorter cond up to a call's text length."""
    return [p + r * n_cond for r in range(max(1, n_call // n_cond)) for p in positions if p + r * n_cond < n_call]


def cond_rows(shape: CallShape) -> torch.Tensor:
    """Row indices of the cond chunks of a call, in order (one per image)."""
    rows = [
        chunk * shape.images + i
        for chunk, kind in enumerate(shape.cond_or_uncond)
        if kind == 0
        for i in range(shape.images)
    ]
    return torch.tensor(rows, dtype=torch.long)
