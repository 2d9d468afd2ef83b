"""Similarity maps -> disjoint binary subject masks on the token grid.

Two methods:

* :func:`partition_balanced` (official): stabilised balanced argmax over the subject maps, times a
  foreground mask (background channel, then a 2x2 open/close).
* :func:`partition_superpixels` (paper Eq. 11-13): SLIC superpixels of the predicted image, each
  superpixel to the channel (subjects and background) with the largest summed map.

Maps are ``[B, C, N]`` with N = h * w tokens in row-major order; masks come back as ``[B, C, h, w]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from freefuse.balance import FLUX_BALANCE, SDXL_BALANCE, BalanceParams, balanced_argmax, check_grid
from freefuse.superpixels import vote_superpixels

__all__ = [
    "FLUX_BALANCE",
    "SDXL_BALANCE",
    "BalanceParams",
    "SubjectMasks",
    "balanced_argmax",
    "foreground",
    "open_close",
    "partition_balanced",
    "partition_superpixels",
    "resize_masks",
]


@dataclass(frozen=True)
class SubjectMasks:
    """Disjoint hard masks on the token grid."""

    masks: Tensor  # [B, C, h, w] float32 in {0, 1}, at most one subject per token
    background: Tensor  # [B, h, w] float32 in {0, 1}, 1 where no subject owns the token

    @property
    def coverage(self) -> Tensor:
        """``[B, C]`` fraction of grid tokens each subject owns."""
        return self.masks.mean(dim=(2, 3))

    @property
    def grid_hw(self) -> tuple[int, int]:
        return int(self.masks.shape[-2]), int(self.masks.shape[-1])

    def resized(self, size_hw: tuple[int, int]) -> SubjectMasks:
        """The same masks on another grid (hires pass, another UNet level), nearest so they stay hard."""
        masks = resize_masks(self.masks, size_hw, mode="nearest")
        return SubjectMasks(masks=masks, background=(1.0 - masks.amax(dim=1)).clamp(0.0, 1.0))


def _max_window(x: Tensor, kernel: int, pad_before: int, value: float) -> Tensor:
    """Max over a ``kernel`` x ``kernel`` window; pads ``pad_before`` rows/cols before, the rest after."""
    pad_after = kernel - 1 - pad_before
    padded = F.pad(x, (pad_before, pad_after, pad_before, pad_after), value=value)
    return F.max_pool2d(padded, kernel_size=kernel, stride=1)


def open_close(mask: Tensor, kernel: int = 2) -> Tensor:
    """Opening (erode, dilate) then closing (dilate, erode) of ``[B, h, w]`` bool masks.

    Removes foreground specks and fills background holes that no ``kernel`` x ``kernel`` square fits
    into; the output has the input's size, in place. The official FreeFuse code pads k//2 on every side,
    which for k = 2 gives an (h+1) x (w+1) result that it nearest-resizes back to h x w: each of its four
    passes then reads the window [i-1, i], and one opening plus one closing moves its whole foreground by
    +2 rows and +2 columns (measured on identical inputs: a block at rows 4-9, columns 5-10 comes out at
    rows 6-11, columns 7-12; 32 pixels on FLUX at 1024x1024). It also never erodes from the top and left
    borders and drops what is pushed past the bottom and right ones. Here the windows are placed
    asymmetrically instead: erosion looks at the window starting at the pixel, dilation at the window
    ending at it, which makes a true opening / closing with no shift, so FreeFuse's masks differ from the
    official code's by exactly that shift.
    Outside the grid counts as background: the mask is computed on a canvas with a (k-1)-pixel empty
    margin (wide enough for the closing's dilation to spill into) and cropped back.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be [B, h, w], got shape {tuple(mask.shape)}")
    if kernel <= 1:
        return mask.bool().clone()
    B, h, w = mask.shape
    m = kernel - 1
    canvas = F.pad(mask.float().unsqueeze(1), (m, m, m, m), value=0.0)  # [B, 1, h+2m, w+2m]
    before_erode = (kernel - 1) // 2
    before_dilate = kernel // 2

    def dilate(t: Tensor) -> Tensor:
        return _max_window(t, kernel, before_dilate, 0.0)

    def erode(t: Tensor) -> Tensor:
        return -_max_window(-t, kernel, before_erode, -1.0)

    opened = dilate(erode(canvas))
    closed = erode(dilate(opened))
    return closed[:, 0, m : m + h, m : m + w] > 0.5


def foreground(
    subject_maps: Tensor,
    background: Tensor | None,
    grid_hw: tuple[int, int],
    *,
    bg_scale: float = 0.95,
    morphology: bool = True,
) -> Tensor:
    """``[B, h, w]`` bool, True where some subject map is at least ``background * bg_scale``.

    subject_maps ``[B, C, N]``, background ``[B, N]`` or None (then every token is foreground).
    A token is background only when the scaled background strictly beats every subject map (ties
    go to the subjects, like the official argmax with the background channel last).
    """
    B, _, N = subject_maps.shape
    h, w = check_grid(N, grid_hw)
    if background is None:
        return torch.ones(B, h, w, dtype=torch.bool, device=subject_maps.device)
    if background.shape != (B, N):
        raise ValueError(f"background must be [B, N] = {(B, N)}, got {tuple(background.shape)}")
    best_subject = subject_maps.float().amax(dim=1)  # [B, N]
    fg = (background.float() * bg_scale <= best_subject).view(B, h, w)  # [B, h, w]
    return open_close(fg, 2) if morphology else fg


def _masks_from_labels(labels: Tensor, n_subjects: int, fg: Tensor | None = None) -> SubjectMasks:
    """labels ``[B, h, w]`` long (values >= C mean background) -> SubjectMasks, optionally times ``fg``."""
    channels = torch.arange(n_subjects, device=labels.device).view(1, -1, 1, 1)  # [1, C, 1, 1]
    masks = labels.unsqueeze(1) == channels  # [B, C, h, w]
    if fg is not None:
        masks = masks & fg.unsqueeze(1)
    masks = masks.float()
    return SubjectMasks(masks=masks, background=1.0 - masks.amax(dim=1))


def partition_balanced(
    subject_maps: Tensor,
    background: Tensor | None,
    grid_hw: tuple[int, int],
    *,
    params: BalanceParams = FLUX_BALANCE,
    bg_scale: float = 0.95,
    morphology: bool = True,
) -> SubjectMasks:
    """Official partition: balanced argmax over subjects, then zero every subject on background tokens."""
    if subject_maps.ndim != 3:
        raise ValueError(f"subject_maps must be [B, C, N], got shape {tuple(subject_maps.shape)}")
    B, C, N = subject_maps.shape
    h, w = check_grid(N, grid_hw)
    fg = foreground(subject_maps, background, (h, w), bg_scale=bg_scale, morphology=morphology)
    labels = balanced_argmax(subject_maps, (h, w), params).view(B, h, w)  # [B, h, w]
    return _masks_from_labels(labels, C, fg)


def partition_superpixels(
    subject_maps: Tensor,
    background: Tensor | None,
    grid_hw: tuple[int, int],
    image: Tensor,
    *,
    n_segments: int | None = None,
    compactness: float = 10.0,
    bg_scale: float = 0.95,
) -> SubjectMasks:
    """Paper partition: SLIC superpixel voting on ``image`` ``[B, 3, H, W]`` in [0, 1] (any H >= h, W >= w).

    Channels are the subject maps plus ``background * bg_scale`` when given; a superpixel won by the
    background belongs to no subject. See :mod:`freefuse.superpixels` for the steps.
    """
    if subject_maps.ndim != 3:
        raise ValueError(f"subject_maps must be [B, C, N], got shape {tuple(subject_maps.shape)}")
    B, C, N = subject_maps.shape
    h, w = check_grid(N, grid_hw)
    scores = subject_maps.float()  # [B, C, N]
    if background is not None:
        if background.shape != (B, N):
            raise ValueError(f"background must be [B, N] = {(B, N)}, got {tuple(background.shape)}")
        scores = torch.cat([scores, background.float().unsqueeze(1) * bg_scale], dim=1)  # [B, C+1, N]
    vote = vote_superpixels(scores.view(B, -1, h, w), image, n_segments=n_segments, compactness=compactness)
    return _masks_from_labels(vote.grid_labels, C)


def resize_masks(masks: Tensor, size_hw: tuple[int, int], mode: Literal["nearest", "bilinear"] = "nearest") -> Tensor:
    """Resize ``[B, C, h, w]`` masks to ``[B, C, h2, w2]`` float32 (other UNet levels, hires fix).

    "nearest" uses centre-aligned sampling (torch "nearest-exact", no half-pixel shift) and keeps the
    masks binary and disjoint; "bilinear" (align_corners=False, as in diffusers' SDXL path) softens edges.
    """
    if masks.ndim != 4:
        raise ValueError(f"masks must be [B, C, h, w], got shape {tuple(masks.shape)}")
    size = (int(size_hw[0]), int(size_hw[1]))
    x = masks.float()
    if tuple(x.shape[-2:]) == size:
        return x.clone()
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
