"""Stabilised balanced argmax: similarity maps -> one subject index per token.

Restates the official FreeFuse routine (algorithm.md 1.6): each subject gets a bias that is nudged so
its hard token count moves towards N / C, and the scores gain a neighbour vote and lose a squared
distance to the subject's soft centroid ("gravity"). The update order and constants follow the
official code. Two deliberate changes: the coordinates are aspect-aware (one token step is the same
distance along both axes) and the logit scale is taken per batch row, not over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

_NORM_EPS = 1e-8  # official linear-normalisation epsilon
_MASS_EPS = 1e-6  # official centroid-mass epsilon
_MIN_SCALE = 1e-4  # floor of the per-row logit range
_MAX_BIAS_FACTOR = 10.0  # |bias| <= 10 * logit range
_LR_DECAY = 0.95  # step size shrinks by this factor each iteration
_BORDER_STEPS = 1.5  # a token closer than this many steps to an edge is "border"


@dataclass(frozen=True)
class BalanceParams:
    """Knobs of :func:`balanced_argmax`. Defaults are the official FLUX ones (``FLUX_BALANCE``);
    ``SDXL_BALANCE`` holds the official SDXL ones.

    ``gravity``, ``spatial`` and ``border_penalty`` are in absolute logit units; the maps are softmax
    distributions of size ~1/N, so their relative strength depends on N (algorithm.md pitfall 11).
    ``border_penalty`` is the same for every subject at a token and the loop normalises over subjects,
    so it cannot change the result (true of the official FLUX code too); it is kept for parity.
    """

    iterations: int = 15
    lr: float = 0.01
    gravity: float = 4e-5
    spatial: float = 4e-5
    momentum: float = 0.2
    centroid_margin: float = 0.0
    border_penalty: float = 0.0
    anisotropy: float = 1.1
    init_norm: Literal["subjects", "tokens"] = "subjects"

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if self.anisotropy <= 0.0:
            raise ValueError(f"anisotropy must be > 0, got {self.anisotropy}")
        if not 0.0 <= self.centroid_margin < 1.0:
            raise ValueError(f"centroid_margin must be in [0, 1), got {self.centroid_margin}")
        if self.init_norm not in ("subjects", "tokens"):
            raise ValueError(f"init_norm must be 'subjects' or 'tokens', got {self.init_norm!r}")


FLUX_BALANCE = BalanceParams()
SDXL_BALANCE = BalanceParams(gravity=3e-5, spatial=3e-5, anisotropy=1.3, init_norm="tokens")


def check_grid(n_tokens: int, grid_hw: tuple[int, int]) -> tuple[int, int]:
    """Return ``(h, w)`` as ints after checking ``h * w == n_tokens``."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h < 1 or w < 1 or h * w != n_tokens:
        raise ValueError(f"grid {h}x{w} does not hold {n_tokens} tokens")
    return h, w


def _minmax(x: Tensor, dim: int) -> Tensor:
    """Linear rescale of ``x`` to [0, 1] along ``dim`` (official ``linear_normalize``)."""
    lo = x.amin(dim=dim, keepdim=True)
    hi = x.amax(dim=dim, keepdim=True)
    return (x - lo) / (hi - lo + _NORM_EPS)


def _neighbour_mean(x: Tensor) -> Tensor:
    """Sum of the 8 neighbours / 8 with zero padding, per channel: ``[B, C, h, w]`` -> same.

    The official 3x3 grouped convolution (ones / 8, centre 0), written as shifted slices: same
    numbers, and far faster than torch's grouped conv2d on CPU for these small grids.
    """
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))  # [B, C, h+2, w+2]
    total = torch.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            if (dy, dx) != (1, 1):
                total = total + padded[..., dy : dy + h, dx : dx + w]
    return total / 8.0


@dataclass(frozen=True)
class _Grid:
    y: Tensor  # [1, 1, N] row coordinate
    x: Tensor  # [1, 1, N] column coordinate, stretched by anisotropy
    y_limit: float  # centroid clamp bound for y before the margin
    x_limit: float  # centroid clamp bound for x before the margin (not stretched, as officially)
    border: Tensor  # [1, 1, N] float, 1 on the outer rows / columns


def token_coordinates(
    h: int, w: int, anisotropy: float = 1.0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Aspect-aware ``(y, x)`` coordinates of the token grid, each ``[h, w]`` float32.

    The longer side spans [-1, 1] and both axes share one step, 2 / (max(h, w) - 1); x is then
    multiplied by ``anisotropy``. On a square grid this is the official linspace(-1, 1) layout; the
    official code uses linspace(-1, 1) on both axes of a non-square grid too, so its steps differ.
    """
    step = 2.0 / max(max(h, w) - 1, 1)
    ys = (torch.arange(h, device=device, dtype=torch.float32) - (h - 1) / 2.0) * step  # [h]
    xs = (torch.arange(w, device=device, dtype=torch.float32) - (w - 1) / 2.0) * step  # [w]
    grid_y, grid_x = torch.meshgrid(ys, xs * anisotropy, indexing="ij")  # [h, w] each
    return grid_y, grid_x


def _grid(h: int, w: int, anisotropy: float, device: torch.device) -> _Grid:
    grid_y, grid_x = token_coordinates(h, w, anisotropy, device)  # [h, w] each

    # Border: tokens fewer than 1.5 steps from an edge, i.e. the outer two rows and columns. The
    # official test works in stretched x, so anisotropy 1.1 widens its x border; counted in steps here.
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    row_edge = torch.minimum(rows, h - 1 - rows) < _BORDER_STEPS  # [h]
    col_edge = torch.minimum(cols, w - 1 - cols) < _BORDER_STEPS  # [w]
    border = row_edge[:, None] | col_edge[None, :]  # [h, w]

    return _Grid(
        y=grid_y.reshape(1, 1, h * w),
        x=grid_x.reshape(1, 1, h * w),
        y_limit=float(grid_y.abs().max()),
        x_limit=float(grid_x.abs().max()) / anisotropy,
        border=border.reshape(1, 1, h * w).float(),
    )


def balanced_argmax(logits: Tensor, grid_hw: tuple[int, int], params: BalanceParams = FLUX_BALANCE) -> Tensor:
    """Subject index per token from similarity maps, balanced towards N / C tokens each.

    logits: ``[B, C, N]`` similarity maps (row-major over ``grid_hw``). Returns ``[B, N]`` long.
    With C == 1 every token belongs to subject 0. Batch rows are independent.
    """
    if logits.ndim != 3:
        raise ValueError(f"logits must be [B, C, N], got shape {tuple(logits.shape)}")
    B, C, N = logits.shape
    h, w = check_grid(N, grid_hw)
    if C < 1:
        raise ValueError("need at least one subject map")
    if C == 1:
        return torch.zeros(B, N, dtype=torch.long, device=logits.device)

    p = params
    logits = logits.float()  # [B, C, N]
    grid = _grid(h, w, p.anisotropy, logits.device)
    target = N / C

    # Official init: normalise over subjects (FLUX) or over tokens (SDXL).
    running = _minmax(logits, dim=1 if p.init_norm == "subjects" else 2)  # [B, C, N]

    # Step size and bias cap from the logit range, per batch row (official: one range for the batch).
    flat = logits.reshape(B, C * N)
    scale = (flat.amax(dim=1) - flat.amin(dim=1)).clamp_min(_MIN_SCALE).view(B, 1, 1)  # [B, 1, 1]
    eff_lr = p.lr * scale  # [B, 1, 1]
    max_bias = _MAX_BIAS_FACTOR * scale  # [B, 1, 1]

    bias = torch.zeros(B, C, 1, device=logits.device)  # [B, C, 1]
    current = logits.clone()  # [B, C, N]
    for i in range(p.iterations):
        # Official quirk, kept: `current` already holds `-bias` from the previous iteration and the
        # bias is subtracted again here, so both the normalised scores and the counts see it twice.
        shifted = current - bias  # [B, C, N]
        probs = _minmax(shifted, dim=1)  # [B, C, N]
        running = (1.0 - p.momentum) * probs + p.momentum * running

        mass = running.sum(dim=2, keepdim=True) + _MASS_EPS  # [B, C, 1]
        cy = (running * grid.y).sum(dim=2, keepdim=True) / mass  # [B, C, 1]
        cx = (running * grid.x).sum(dim=2, keepdim=True) / mass  # [B, C, 1]
        if p.centroid_margin > 0:
            ly = grid.y_limit * (1.0 - p.centroid_margin)
            lx = grid.x_limit * (1.0 - p.centroid_margin)
            cy = cy.clamp(-ly, ly)
            cx = cx.clamp(-lx, lx)
        dist2 = (grid.y - cy) ** 2 + (grid.x - cx) ** 2  # [B, C, N]

        counts = F.one_hot(shifted.argmax(dim=1), C).sum(dim=1).float()  # [B, C]
        lr_i = eff_lr * (_LR_DECAY**i)  # [B, 1, 1]
        bias = bias + torch.sign(counts - target).unsqueeze(2) * lr_i
        bias = torch.maximum(torch.minimum(bias, max_bias), -max_bias)

        votes = _neighbour_mean(running.view(B, C, h, w)).view(B, C, N)  # [B, C, N]

        current = logits - bias + p.spatial * votes - p.gravity * dist2 - p.border_penalty * grid.border

    return current.argmax(dim=1)
