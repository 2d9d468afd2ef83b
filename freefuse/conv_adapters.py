"""Masked low-rank deltas of a Conv2d layer (LoCon), for many LoRAs at once.

A LoCon LoRA of a conv layer is ``down`` [r, in, kh, kw] (the layer's kernel, stride and padding) followed by
``up`` [out, r, 1, 1]; its delta is ``up(down(x)) * scale``. The per-pixel weight of each LoRA is applied
between the two, at the output resolution (``down`` already has the layer's stride):

    h = conv(x, D_all)            # [B, R_total, h', w'], every LoRA's down kernels stacked
    h = h * weights[:, owner(r)]  # per LoRA and output pixel
    y += conv1x1(h, U_all)        # [B, out, h', w'], scale folded into U

Two convolutions per layer for any number of LoRAs. Exactly the merged delta when every weight is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def conv_output_hw(in_hw: tuple[int, int], kernel_size, stride=1, padding=0, dilation=1) -> tuple[int, int]:
    """A Conv2d's output size for an ``in_hw`` input (PyTorch's formula; ``padding`` may be "same"/"valid")."""

    def pair(v):
        return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v), int(v))

    if padding == "same":
        return tuple(in_hw)
    pads = (0, 0) if padding == "valid" else pair(padding)
    kernels, strides, dilations = pair(kernel_size), pair(stride), pair(dilation)
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(in_hw, kernels, strides, pads, dilations, strict=True)
    )


@dataclass(frozen=True)
class ConvLowRankFactor:
    down: Tensor  # [r, in, kh, kw]
    up: Tensor  # [out, r, 1, 1] (or [out, r])
    scale: float  # strength * alpha / r
    owner: int  # which column of the weights scales this factor


class MaskedConvDelta:
    """All runtime LoCon deltas of ONE conv layer (same kernel size, stride, padding, dilation)."""

    def __init__(
        self,
        factors: Sequence[ConvLowRankFactor],
        *,
        stride=1,
        padding=0,
        dilation=1,
        device=None,
        dtype=None,
    ):
        if not factors:
            raise ValueError("a MaskedConvDelta needs at least one factor")
        kernels = {tuple(f.down.shape[1:]) for f in factors}
        if len(kernels) != 1:
            raise ValueError(f"factors of one conv layer must share in-channels and kernel size, got {kernels}")
        outs = {f.up.shape[0] for f in factors}
        if len(outs) != 1:
            raise ValueError(f"factors of one conv layer must share out-channels, got {outs}")
        dtype = dtype or torch.float32
        work = torch.float64 if dtype == torch.float64 else torch.float32  # build in at least float32
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.down = torch.cat([f.down.to(device=device, dtype=work) for f in factors]).to(dtype)
        ups = [f.up.to(device=device, dtype=work).reshape(f.up.shape[0], -1) * f.scale for f in factors]
        self.up = torch.cat(ups, dim=1)[:, :, None, None].to(dtype)  # [out, R_total, 1, 1]
        owners = [torch.full((f.down.shape[0],), f.owner, dtype=torch.long) for f in factors]
        rank_owner = torch.cat(owners)  # [R_total], on the CPU here
        self.rank_owner = rank_owner.to(device)
        self._owner_columns = {int(o): (rank_owner == o).nonzero()[:, 0].to(device) for o in rank_owner.unique()}
        self._factors = list(factors)

    @property
    def n_owners(self) -> int:
        return max(self._owner_columns) + 1

    def to(self, device=None, dtype=None) -> MaskedConvDelta:
        new = object.__new__(MaskedConvDelta)
        new.stride, new.padding, new.dilation, new._factors = self.stride, self.padding, self.dilation, self._factors
        new.down = self.down.to(device=device, dtype=dtype)
        new.up = self.up.to(device=device, dtype=dtype)
        new.rank_owner = self.rank_owner.to(device)
        new._owner_columns = {o: c.to(device) for o, c in self._owner_columns.items()}
        return new

    def ranks(self, x: Tensor) -> Tensor:
        """The rank activations [B, R_total, h', w'] (every LoRA's down conv) that the delta and
        ``owner_delta`` share."""
        return F.conv2d(
            x.to(self.down.dtype), self.down, stride=self.stride, padding=self.padding, dilation=self.dilation
        )

    def owner_delta(self, x, ranks: Tensor, owner: int) -> Tensor:
        """One owner's own delta at a few output pixels: ``ranks`` [..., n, R_total] (rank activations at those
        pixels, channels last) -> [..., n, out], unweighted (``x`` is not needed: ``up`` is 1x1)."""
        columns = self._owner_columns[owner].to(ranks.device)
        return F.linear(ranks.to(self.up.dtype)[..., columns], self.up[:, columns, 0, 0])

    def owner_weight(self, owner: int) -> Tensor:
        """One owner's whole delta weight [out, in * kh * kw], dense, float32 (K-LoRA's scores)."""
        mine = self.rank_owner == owner
        return self.up[:, mine, 0, 0].float() @ self.down[mine].flatten(1).float()

    def __call__(self, x: Tensor, weights: Tensor | None = None, ranks: Tensor | None = None) -> Tensor:
        """Delta [B, out, h', w'] for x [B, in, h, w]; weights [B or 1, A, h', w'] (None = all ones)."""
        h = self.ranks(x) if ranks is None else ranks
        if weights is not None:
            weights = weights.to(h.device, h.dtype)
            if weights.shape[0] not in (1, h.shape[0]):
                weights = weights.repeat(h.shape[0] // weights.shape[0], 1, 1, 1)
            if weights.shape[-2:] != h.shape[-2:]:
                raise ValueError(
                    f"weights cover {tuple(weights.shape[-2:])} pixels, the conv gives {tuple(h.shape[-2:])}"
                )
            h = h * weights[:, self.rank_owner]  # [B, R_total, h', w']
        return F.conv2d(h, self.up).to(x.dtype)

    def add_to(self, out: Tensor, x: Tensor, weights: Tensor | None = None, ranks: Tensor | None = None) -> Tensor:
        return out.add_(self(x, weights, ranks))

    def check_fits(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation) -> None:
        """Raise ValueError unless this delta runs on the conv layer's input (on its own device and dtype, with
        per-pixel weights) and gives the layer's output shape."""
        x = torch.zeros(1, in_channels, 8, 8, device=self.down.device, dtype=self.down.dtype)  # [B, C_in, h, w]
        try:
            y = self(x)  # [B, C_out, h', w']
            self(x, torch.ones(1, self.n_owners, *y.shape[-2:], device=y.device, dtype=y.dtype))
        except RuntimeError as err:
            raise ValueError(f"its LoCon factors do not run on the layer's input ({err})") from None
        expected = conv_output_hw((8, 8), kernel_size, stride, padding, dilation)
        if y.shape[1] != out_channels or tuple(y.shape[-2:]) != expected:
            raise ValueError(
                f"its LoCon factors give {y.shape[1]} channels of {tuple(y.shape[-2:])} pixels, the layer "
                f"{out_channels} of {expected}"
            )

    def reference(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """One down/up pair per LoRA, for tests."""
        total = None
        for f in self._factors:
            down = f.down.to(x.device, self.down.dtype)
            up = f.up.to(x.device, self.down.dtype).reshape(f.up.shape[0], -1)[:, :, None, None]
            h = F.conv2d(x.to(down.dtype), down, stride=self.stride, padding=self.padding, dilation=self.dilation)
            delta = F.conv2d(h, up) * f.scale
            if weights is not None:
                delta = delta * weights[:, f.owner : f.owner + 1].to(delta.dtype)
            total = delta if total is None else total + delta
        return total.to(x.dtype)
