"""Superpixel voting (paper Eq. 11-13): each SLIC superpixel of the predicted image goes to one channel.

SLIC runs on the decoded x0 (``skimage.segmentation.slic``, n_segments = round(sqrt(H * W)),
compactness 10). Each score map is upsampled to the image size **bilinearly** (align_corners=False),
summed over every superpixel, and the channel with the largest sum owns the whole superpixel. The
pixel labels are then reduced to the token grid by a majority vote per grid cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SuperpixelVote:
    """Result of :func:`vote_superpixels`. Labels are channel indices: subjects 0..C-1, background C."""

    segments: Tensor  # [B, H, W] long, SLIC superpixel id per pixel (0-based)
    pixel_labels: Tensor  # [B, H, W] long, winning channel per pixel (constant over a superpixel)
    grid_labels: Tensor  # [B, h, w] long, majority of pixel_labels per token cell


def latent_to_rgb(latent: Tensor) -> Tensor:
    """A predicted-x0 latent [B, C, h, w] as a [B, 3, h, w] picture in [0, 1] for SLIC, without the VAE.

    Per image, the three principal components of the C channels (over pixels), each min-max scaled: the
    directions along which the latent's colours vary most, so SLIC's colour distance still separates regions.
    """
    pictures = []
    for one in latent.detach().float():
        pixels = one.flatten(1).T  # [h*w, C]
        centred = pixels - pixels.mean(dim=0, keepdim=True)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v: [min(C, h*w), C]
        components = centred @ v[:3].T  # [h*w, <=3]
        if components.shape[1] < 3:
            components = F.pad(components, (0, 3 - components.shape[1]))
        low, high = components.amin(dim=0), components.amax(dim=0)
        scaled = (components - low) / (high - low).clamp_min(1e-6)
        pictures.append(scaled.T.reshape(3, *one.shape[1:]))
    return torch.stack(pictures)


def default_n_segments(height: int, width: int) -> int:
    """The paper's superpixel count: the square root of the image area, rounded."""
    return max(1, round(math.sqrt(height * width)))


def slic_segments(image: Tensor, n_segments: int, compactness: float) -> Tensor:
    """SLIC superpixels of one RGB image ``[3, H, W]`` in [0, 1]; returns ``[H, W]`` long ids from 0."""
    from skimage.segmentation import slic  # imported here: only the paper method needs scikit-image

    rgb = image.detach().float().clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy().astype(np.float64)
    labels = slic(rgb, n_segments=n_segments, compactness=compactness, start_label=0, channel_axis=-1)
    return torch.from_numpy(np.ascontiguousarray(labels)).long()


def winner_per_superpixel(scores: Tensor, segments: Tensor) -> Tensor:
    """Channel with the largest summed score in each superpixel, written back to its pixels.

    scores: ``[K, H, W]`` float, segments: ``[H, W]`` long -> ``[H, W]`` long. Ties go to the lower
    channel index (so a subject beats the background on a tie).
    """
    K = scores.shape[0]
    seg = segments.reshape(-1).to(scores.device)  # [H*W]
    n_seg = int(seg.max()) + 1
    sums = torch.zeros(K, n_seg, dtype=scores.dtype, device=scores.device)  # [K, S]
    sums.index_add_(1, seg, scores.reshape(K, -1))
    winner = sums.argmax(dim=0)  # [S]
    return winner[seg].view(segments.shape)


def majority_to_grid(pixel_labels: Tensor, grid_hw: tuple[int, int], n_labels: int) -> Tensor:
    """Reduce ``[B, H, W]`` labels to ``[B, h, w]`` by majority per grid cell (ties: lower label).

    Pixel row r belongs to cell row ``r * h // H`` (likewise for columns), so any H >= h, W >= w works.
    """
    B, H, W = pixel_labels.shape
    h, w = grid_hw
    if h > H or w > W:
        raise ValueError(f"image {H}x{W} is smaller than the token grid {h}x{w}")
    device = pixel_labels.device
    cell_row = torch.arange(H, device=device) * h // H  # [H]
    cell_col = torch.arange(W, device=device) * w // W  # [W]
    cell = (cell_row[:, None] * w + cell_col[None, :]).reshape(-1)  # [H*W]
    out = torch.empty(B, h * w, dtype=torch.long, device=device)
    for b in range(B):
        key = cell * n_labels + pixel_labels[b].reshape(-1)  # [H*W]
        counts = torch.bincount(key, minlength=h * w * n_labels).view(h * w, n_labels)
        out[b] = counts.argmax(dim=1)
    return out.view(B, h, w)


def vote_superpixels(
    scores: Tensor,
    image: Tensor,
    *,
    n_segments: int | None = None,
    compactness: float = 10.0,
) -> SuperpixelVote:
    """SLIC-vote the channels of ``scores`` ``[B, K, h, w]`` over ``image`` ``[B, 3, H, W]`` in [0, 1]."""
    if scores.ndim != 4:
        raise ValueError(f"scores must be [B, K, h, w], got shape {tuple(scores.shape)}")
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [B, 3, H, W], got shape {tuple(image.shape)}")
    B, K, h, w = scores.shape
    if image.shape[0] != B:
        raise ValueError(f"image batch {image.shape[0]} != maps batch {B}")
    H, W = int(image.shape[2]), int(image.shape[3])
    n_seg = default_n_segments(H, W) if n_segments is None else int(n_segments)

    up = F.interpolate(scores.float(), size=(H, W), mode="bilinear", align_corners=False)  # [B, K, H, W]
    segments = torch.empty(B, H, W, dtype=torch.long)
    pixel_labels = torch.empty(B, H, W, dtype=torch.long, device=scores.device)
    for b in range(B):
        segments[b] = slic_segments(image[b], n_seg, compactness)
        pixel_labels[b] = winner_per_superpixel(up[b], segments[b])
    grid_labels = majority_to_grid(pixel_labels, (h, w), K)
    return SuperpixelVote(segments=segments.to(scores.device), pixel_labels=pixel_labels, grid_labels=grid_labels)
