"""From captured attention tensors to subject masks: the one place that wires settings to maps and partition.

The Forge layer captures tensors from one block at one step and hands them here as a ``Capture``; what comes
back is a ``SubjectMasks`` on the capture block's token grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from freefuse.layouts import Layout
from freefuse.maps import SimilarityMaps, official_similarity_maps, paper_similarity_maps
from freefuse.partition import BalanceParams, SubjectMasks, partition_balanced, partition_superpixels
from freefuse.settings import FreeFuseSettings
from freefuse.superpixels import default_n_segments, latent_to_rgb


@dataclass(frozen=True)
class FamilyTraits:
    """How a model family's attention differs, as far as the map maths is concerned."""

    name: str
    cross_softmax: str  # official method: "image" (joint attention, FLUX) or "text" (cross attention, SDXL)
    paper_direction: str  # paper method: "text_to_image" (text queries exist) or "image_to_text"
    balance_init: str  # balanced argmax: normalise `running` over "subjects" (FLUX) or "tokens" (SDXL)
    fixed_logit_scale: float | None  # FLUX: 1/1000; None means 1/sqrt(head dim)
    patch: int  # latent pixels per token side at the finest level: FLUX packs 2x2, the UNet's first level 1

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The finest token grid of an image ``height`` x ``width`` pixels (latent = pixels / 8, padded up)."""
        latent_h, latent_w = -(-height // 8), -(-width // 8)
        return -(-latent_h // self.patch), -(-latent_w // self.patch)

    def logit_scale(self, head_dim: int) -> float:
        return self.fixed_logit_scale if self.fixed_logit_scale is not None else 1.0 / math.sqrt(head_dim)


FLUX = FamilyTraits("flux", "image", "text_to_image", "subjects", 1.0 / 1000.0, patch=2)
SDXL = FamilyTraits("sdxl", "text", "image_to_text", "tokens", None, patch=1)
TRAITS = {"flux": FLUX, "sdxl": SDXL}


@dataclass
class Capture:
    """Attention tensors of the capture block, cond rows only (one row per image).

    Joint attention (FLUX): one q/k for text and image. UNet (SDXL): q_img/k_img from the self attention
    (attn1), q_cross/k_txt from the cross attention (attn2), o_img = attn1's output after its out projection.
    """

    q_img: torch.Tensor  # [B, H, N_img, D] image queries after QK-norm and RoPE
    k_img: torch.Tensor  # [B, H, N_img, D] image keys after QK-norm and RoPE
    k_txt: torch.Tensor  # [B, H, T, D]     text keys after QK-norm and RoPE
    o_img: torch.Tensor  # [B, N_img, F]    attention output at the image tokens, before the out projection
    grid_hw: tuple[int, int]  # token grid, h * w == N_img, row-major
    q_txt: torch.Tensor | None = None  # [B, H, T, D] text queries (joint attention only)
    q_cross: torch.Tensor | None = None  # [B, H, N_img, D] cross-attention image queries (UNet attn2; else q_img)


def similarity_maps(
    capture: Capture,
    subject_positions: list[list[int]],
    background_positions: list[int] | None,
    settings: FreeFuseSettings,
    traits: FamilyTraits,
) -> SimilarityMaps:
    """Per-subject similarity maps by the configured method."""
    q_cross = getattr(capture, "q_cross", None)  # also accepts any object with Capture's tensor fields
    if settings.mask_method == "paper":
        return paper_similarity_maps(
            capture.q_img,
            capture.k_img,
            subject_positions,
            background_positions,
            grid_hw=capture.grid_hw,
            q_txt=capture.q_txt,
            k_txt=capture.k_txt,
            cross_direction=traits.paper_direction if capture.q_txt is not None else "image_to_text",
            sink_top_ratio=settings.sink_top_ratio,
            sink_border=settings.sink_border,
            salient_ratio=settings.salient_ratio,
            q_cross=q_cross,
        )
    return official_similarity_maps(
        capture.q_img if q_cross is None else q_cross,
        capture.k_txt,
        capture.o_img,
        subject_positions,
        background_positions,
        logit_scale=traits.logit_scale(capture.q_img.shape[-1]),
        top_k_ratio=settings.top_k_ratio,
        temperature=settings.temperature,
        cross_softmax=traits.cross_softmax,
    )


def balance_params(settings: FreeFuseSettings, traits: FamilyTraits) -> BalanceParams:
    return BalanceParams(
        iterations=settings.balance_iterations,
        lr=settings.balance_lr,
        gravity=settings.gravity,
        spatial=settings.spatial,
        momentum=settings.momentum,
        centroid_margin=settings.centroid_margin,
        border_penalty=settings.border_penalty,
        anisotropy=settings.anisotropy,
        init_norm=traits.balance_init,
    )


def partition_maps(
    maps: SimilarityMaps,
    grid_hw: tuple[int, int],
    settings: FreeFuseSettings,
    traits: FamilyTraits,
    image: torch.Tensor | None = None,
    n_segments: int | None = None,
    layout: Layout | None = None,
) -> SubjectMasks:
    """Similarity maps -> masks: superpixel voting for the paper method when a picture is given
    (``image`` [B, 3, H, W] in [0, 1]; ``n_segments`` default for it), else the balanced argmax. A ``layout``
    the user drew steers the split (a hint) or overrules it for the subjects it covers (given masks)."""
    if layout is not None:
        return layout.apply(
            maps.subjects,
            grid_hw,
            lambda subjects: partition_maps(
                SimilarityMaps(subjects, maps.background), grid_hw, settings, traits, image, n_segments
            ),
        )
    if settings.mask_method == "paper" and image is not None:
        return partition_superpixels(
            maps.subjects,
            maps.background,
            grid_hw,
            image,
            n_segments=settings.slic_segments or n_segments,
            compactness=settings.slic_compactness,
            bg_scale=settings.bg_scale,
        )
    return partition_balanced(
        maps.subjects,
        maps.background,
        grid_hw,
        params=balance_params(settings, traits),
        bg_scale=settings.bg_scale,
        morphology=settings.morphology,
    )


def x0_picture(x0_latent: torch.Tensor, latent_scale: int = 8) -> tuple[torch.Tensor, int]:
    """A predicted-x0 latent [B, C, h, w] as a SLIC picture [B, 3, h, w], and the paper's superpixel count
    for the image it decodes to (round(sqrt(pixel area)), the latent being 1/``latent_scale`` of the pixels)."""
    picture = latent_to_rgb(x0_latent.float().cpu())
    h, w = picture.shape[-2:]
    return picture, default_n_segments(latent_scale * h, latent_scale * w)


def compute_masks(
    capture: Capture,
    subject_positions: list[list[int]],
    background_positions: list[int] | None,
    settings: FreeFuseSettings,
    traits: FamilyTraits,
    image: torch.Tensor | None = None,
    layout: Layout | None = None,
) -> SubjectMasks:
    """Masks for every image of the capture.

    ``image`` ([B, 3, H, W] in [0, 1], the predicted x0) is needed by the paper method's superpixel voting;
    without it the paper maps are partitioned by the balanced argmax instead. ``layout``: see partition_maps.
    """
    maps = similarity_maps(capture, subject_positions, background_positions, settings, traits)
    return partition_maps(maps, capture.grid_hw, settings, traits, image, layout=layout)
