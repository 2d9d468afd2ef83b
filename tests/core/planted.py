"""Synthetic attention with planted subject regions: inputs whose right masks are known.

Every subject l has a random unit direction (plus one for the background), rotated differently in each
head. Image queries and keys inside subject l's region carry l's direction; the remaining image tokens carry
the background direction. Subject l's text tokens (queries and keys) carry l's direction, the background
text token (an "EOS") the background direction, the other text tokens small random vectors. ``o_img``
carries one feature vector per region (and one for the background). All with a little noise.

Scales: a query and a key with the same direction give the logit ``MATCH_LOGIT`` at ``1/sqrt(dim)`` (the
paper's scale and ``case.logit_scale``); two ``o_img`` features of the same region give
``MATCH_LOGIT * case.temperature``, so ``official_similarity_maps(..., temperature=case.temperature)``
sees the same contrast.

Regions are disjoint boxes ("rect") or irregular blobs inside them ("blob"), one token away from the grid
edge and from each other, covering about 50-70 % of the grid. Batch row b gives subject l the slot
``(l + b) % C`` and odd rows are mirrored, so every subject moves between rows 0 and 1.

With ``sinks=True`` the first ``max(1, floor(N / 100))`` tokens of ``sink_tokens`` (corners first, all on the
grid edge, all background) get keys ``SINK_GAIN`` times stronger and aligned with every text direction: the
attention-sink pathology. These are exactly as many as the paper's sink filter removes at p = 1 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from freefuse.maps import SimilarityMaps, official_similarity_maps, paper_similarity_maps

MATCH_LOGIT = 3.0  # logit of a matching query/key pair at scale 1/sqrt(dim)
SINK_GAIN = 2.0  # sink keys give SINK_GAIN * MATCH_LOGIT against every text direction
FILLER_GAIN = 0.5  # size of the non-subject text tokens relative to subject tokens
TEMPERATURE = 4000.0  # the FLUX default; o_img is scaled to suit it


@dataclass
class PlantedCase:
    q_img: torch.Tensor  # [B, H, N, D]
    k_img: torch.Tensor  # [B, H, N, D]
    o_img: torch.Tensor  # [B, N, F]
    q_txt: torch.Tensor  # [B, H, T, D]
    k_txt: torch.Tensor  # [B, H, T, D]
    subject_positions: list[list[int]]
    background_positions: list[int]
    regions: torch.Tensor  # [B, C, h, w] bool, disjoint; background = in no region
    grid_hw: tuple[int, int]
    sink_tokens: list[int] = field(default_factory=list)  # flat image indices of planted sinks
    logit_scale: float = 1.0  # cross-logit scale at which a match gives MATCH_LOGIT: 1/sqrt(D)
    temperature: float = TEMPERATURE  # concept-attention temperature that suits o_img's scale

    @property
    def labels(self) -> torch.Tensor:  # [B, h, w] long: owning subject, or C for background
        b, c, h, w = self.regions.shape
        owner = torch.full((b, h, w), c, dtype=torch.long)
        for subject in range(c):
            owner[self.regions[:, subject]] = subject
        return owner


def _slot_grid(n_slots: int, h: int, w: int) -> tuple[int, int]:
    """Rows x columns of slots: a line along the longer side for up to 3, else near-square."""
    if n_slots <= 3:
        return (1, n_slots) if w >= h else (n_slots, 1)
    rows = math.ceil(math.sqrt(n_slots))
    cols = math.ceil(n_slots / rows)
    return (rows, cols) if h >= w else (cols, rows)


def _edges(lo: int, hi: int, parts: int) -> list[int]:
    return [lo + round(i * (hi - lo) / parts) for i in range(parts + 1)]


def _slot_boxes(h: int, w: int, n_slots: int) -> tuple[list[tuple[int, int, int, int]], tuple[int, int]]:
    """Boxes (r0, r1, c0, c1), half-open, inside a 1-token margin with 1-token gaps between them."""
    grid = _slot_grid(n_slots, h, w)
    row_edges, col_edges = _edges(1, h - 1, grid[0]), _edges(1, w - 1, grid[1])
    boxes = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            r0, r1 = row_edges[i], row_edges[i + 1] - (1 if i < grid[0] - 1 else 0)
            c0, c1 = col_edges[j], col_edges[j + 1] - (1 if j < grid[1] - 1 else 0)
            if r1 - r0 < 1 or c1 - c0 < 1:
                raise ValueError(f"grid {h}x{w} is too small for {n_slots} planted regions")
            boxes.append((r0, r1, c0, c1))
    return boxes[:n_slots], grid


def _box_region(h: int, w: int, box: tuple[int, int, int, int], shape: str, gen: torch.Generator) -> torch.Tensor:
    r0, r1, c0, c1 = box
    region = torch.zeros(h, w, dtype=torch.bool)
    if shape == "rect":
        region[r0:r1, c0:c1] = True
        return region
    # blob: a wobbly ellipse around a jittered centre, clipped to the box
    jitter = (torch.rand(2, generator=gen) - 0.5) * 0.2
    cy = (r0 + r1 - 1) / 2 + jitter[0].item() * (r1 - r0)
    cx = (c0 + c1 - 1) / 2 + jitter[1].item() * (c1 - c0)
    phase = torch.rand(2, generator=gen) * 2 * math.pi
    rows = torch.arange(h, dtype=torch.float32).view(h, 1)
    cols = torch.arange(w, dtype=torch.float32).view(1, w)
    u, v = (rows - cy) / ((r1 - r0) / 2), (cols - cx) / ((c1 - c0) / 2)
    angle = torch.atan2(u, v)
    radius = 1.15 * (1 + 0.12 * torch.sin(3 * angle + phase[0]) + 0.08 * torch.sin(2 * angle + phase[1]))
    region[r0:r1, c0:c1] = (u.square() + v.square()).sqrt()[r0:r1, c0:c1] <= radius[r0:r1, c0:c1]
    return region


def planted_regions(
    grid_hw: tuple[int, int], n_subjects: int, *, batch: int = 1, shape: str = "rect", seed: int = 0
) -> torch.Tensor:  # [B, C, h, w] bool
    """Disjoint planted subject regions; row b moves subject l to slot (l + b) % C, odd rows mirrored."""
    if shape not in ("rect", "blob"):
        raise ValueError(f"shape must be 'rect' or 'blob', got {shape!r}")
    h, w = grid_hw
    gen = torch.Generator().manual_seed(seed)
    boxes, grid = _slot_boxes(h, w, n_subjects)
    regions = torch.zeros(batch, n_subjects, h, w, dtype=torch.bool)
    for b in range(batch):
        for subject in range(n_subjects):
            regions[b, subject] = _box_region(h, w, boxes[(subject + b) % n_subjects], shape, gen)
        if b % 2 == 1:  # mirror across the line of slots so that swapped slots do not swap back
            regions[b] = regions[b].flip(-2 if grid[1] >= grid[0] else -1)
    return regions


def _orthonormal(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:  # [n, dim]
    q, _ = torch.linalg.qr(torch.randn(dim, n, generator=gen))
    return q.T.contiguous()


def _sink_tokens(h: int, w: int, count: int) -> list[int]:
    corners = [0, w - 1, (h - 1) * w, h * w - 1]
    edge = [c for c in range(w)] + [(h - 1) * w + c for c in range(w)]
    edge += [r * w for r in range(h)] + [r * w + w - 1 for r in range(h)]
    ordered = list(dict.fromkeys(corners + edge))
    return ordered[:count]


def planted_case(
    grid_hw: tuple[int, int],
    n_subjects: int,
    *,
    batch: int = 1,
    heads: int = 4,
    dim: int = 32,
    n_txt: int = 24,
    tokens_per_subject: int = 2,
    noise: float = 0.1,
    sinks: bool = True,
    seed: int = 0,
    shape: Literal["rect", "blob"] = "rect",
    o_dim: int = 64,
) -> PlantedCase:
    """Synthetic q/k/o for one attention layer with known subject regions (see the module docstring)."""
    h, w = grid_hw
    n_img, n_sets = h * w, n_subjects + 1
    if n_subjects < 1 or dim < n_sets or o_dim < n_sets:
        raise ValueError("need n_subjects >= 1 and dim, o_dim >= n_subjects + 1")
    if n_txt < n_subjects * tokens_per_subject + 1:
        raise ValueError(f"n_txt={n_txt} is too small for {n_subjects} x {tokens_per_subject} tokens + EOS")
    gen = torch.Generator().manual_seed(seed)

    regions = planted_regions(grid_hw, n_subjects, batch=batch, shape=shape, seed=seed + 1)
    labels = torch.full((batch, n_img), n_subjects, dtype=torch.long)  # [B, N], C = background
    for subject in range(n_subjects):
        labels[regions[:, subject].reshape(batch, n_img)] = subject

    # One direction per subject + background, rotated differently per head: [H, C+1, D]
    directions = _orthonormal(n_sets, dim, gen)
    rotations = torch.stack([_orthonormal(dim, dim, gen) for _ in range(heads)])  # [H, D, D]
    head_dirs = torch.einsum("sd,hde->hse", directions, rotations)
    amp = math.sqrt(MATCH_LOGIT * math.sqrt(dim))

    def image_vectors() -> torch.Tensor:  # [B, H, N, D]
        base = head_dirs[:, labels].permute(1, 0, 2, 3)  # [B, H, N, D]
        return amp * (base + noise * torch.randn(base.shape, generator=gen))

    q_img, k_img = image_vectors(), image_vectors()

    # Text: random positions for each subject's tokens and for the background ("EOS") token.
    order = torch.randperm(n_txt, generator=gen).tolist()
    subject_positions = [
        sorted(order[s * tokens_per_subject : (s + 1) * tokens_per_subject]) for s in range(n_subjects)
    ]
    background_positions = [order[n_subjects * tokens_per_subject]]
    filler = torch.randn(heads, n_txt, dim, generator=gen)
    txt_dirs = FILLER_GAIN * filler / filler.norm(dim=-1, keepdim=True)  # [H, T, D]
    for s, positions in enumerate([*subject_positions, background_positions]):
        txt_dirs[:, positions] = head_dirs[:, s : s + 1]

    def text_vectors() -> torch.Tensor:  # [B, H, T, D]
        base = txt_dirs.expand(batch, -1, -1, -1)
        return amp * (base + noise * torch.randn(base.shape, generator=gen))

    q_txt, k_txt = text_vectors(), text_vectors()

    # Attention output: one feature per region label, |f|^2 = MATCH_LOGIT * TEMPERATURE.
    features = math.sqrt(MATCH_LOGIT * TEMPERATURE) * _orthonormal(n_sets, o_dim, gen)  # [C+1, F]
    o_base = features[labels]  # [B, N, F]
    o_img = o_base + noise * math.sqrt(MATCH_LOGIT * TEMPERATURE / o_dim) * torch.randn(o_base.shape, generator=gen)

    sink_tokens: list[int] = []
    if sinks:
        sink_tokens = _sink_tokens(h, w, max(1, n_img // 100))
        aligned = head_dirs.sum(dim=1)  # [H, D]: dot 1 with every text direction
        k_img[:, :, sink_tokens] = SINK_GAIN * amp * aligned.view(1, heads, 1, dim)

    return PlantedCase(
        q_img=q_img,
        k_img=k_img,
        o_img=o_img,
        q_txt=q_txt,
        k_txt=k_txt,
        subject_positions=subject_positions,
        background_positions=background_positions,
        regions=regions,
        grid_hw=(h, w),
        sink_tokens=sink_tokens,
        logit_scale=1.0 / math.sqrt(dim),
        temperature=TEMPERATURE,
    )


def maps_by_method(case, background: bool = True) -> dict[str, SimilarityMaps]:
    """Each method in each softmax direction on a planted case, by name."""
    bg = case.background_positions if background else None
    q, positions, grid = case.q_img, case.subject_positions, case.grid_hw
    official = dict(logit_scale=case.logit_scale, temperature=case.temperature)
    return {
        "official/image": official_similarity_maps(q, case.k_txt, case.o_img, positions, bg, **official),
        "official/text": official_similarity_maps(
            q, case.k_txt, case.o_img, positions, bg, cross_softmax="text", **official
        ),
        "paper/text_to_image": paper_similarity_maps(q, case.k_img, positions, bg, grid_hw=grid, q_txt=case.q_txt),
        "paper/image_to_text": paper_similarity_maps(
            q, case.k_img, positions, bg, grid_hw=grid, k_txt=case.k_txt, cross_direction="image_to_text"
        ),
    }
