"""Masked runtime LoRA deltas: every LoRA of one layer applied in a few matmuls, scaled per token.

A low-rank LoRA contributes ``scale * up @ down`` to a layer's weight, possibly only to a slice of the
output features of a fused layer (FLUX ``qkv`` holds to_q/to_k/to_v; ``linear1`` holds q, k, v and
proj_mlp). FreeFuse multiplies each LoRA's output by a per-token weight (its subject mask on image
tokens, token exclusion on text tokens). Because a LoRA's output is linear in its rank activations,
that weight can be applied in rank space, so all LoRAs of a layer share one stacked ``down`` and one
stacked ``up``:

    h = x @ D^T                          # [B, L, R_total]
    h = h * token_weights[..., owner]    # owner of each rank row
    delta = h @ U^T                      # [B, L, out_features]; U holds each up in its slice, scaled

U is zero outside each factor's output slice, so it is kept as one dense block per distinct slice
(rank rows sorted by slice): an unsliced layer costs exactly two matmuls, a fused qkv with per-slice
LoRAs one down matmul plus one up matmul per slice, with no multiplications by the zeros of U.

Token-weight layouts per layer class ("image", "text", "joint", "global") are built by the helpers at
the end of this file.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LowRankFactor:
    """One low-rank delta ``scale * up @ down`` written into ``out_slice`` of a layer's outputs."""

    down: Tensor  # [r, in_features]
    up: Tensor  # [size, r]; size = out_features, or out_slice's size
    scale: float  # strength * alpha / r, folded by the caller
    owner: int  # column of token_weights that scales this factor (one column per LoRA)
    out_slice: tuple[int, int] | None = None  # (start, size) on the output features


@dataclass(frozen=True)
class DenseDelta:
    """A precomputed dense delta weight (LoHa, LoKr, DoRA, ...), already scaled."""

    weight: Tensor  # [size, in_features]
    owner: int
    out_slice: tuple[int, int] | None = None  # (start, size) on the output features


def _slice_bounds(out_slice: tuple[int, int] | None, out_features: int, rows: int, what: str) -> tuple[int, int]:
    """(start, stop) of a term's output rows; checks the slice fits the layer and the term."""
    start, size = (0, out_features) if out_slice is None else out_slice
    if start < 0 or size <= 0 or start + size > out_features:
        raise ValueError(f"{what}: out_slice {out_slice} does not fit out_features={out_features}")
    if rows != size:
        raise ValueError(f"{what}: has {rows} output rows but its slice holds {size}")
    return start, start + size


def _common_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class MaskedDelta:
    """All runtime LoRA deltas of ONE linear layer, any number of LoRAs, in a few stacked matmuls.

    One down matmul for every LoRA, then one up matmul per distinct output slice (one for an unsliced
    layer). The factors as given are kept (not copied) for ``reference``.
    """

    def __init__(
        self,
        out_features: int,
        factors: Sequence[LowRankFactor],
        dense: Sequence[DenseDelta] = (),
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factors, dense = list(factors), list(dense)
        out_features = operator.index(out_features)  # a numpy integer from a quantised layer's shape too
        if out_features <= 0:
            raise ValueError(f"out_features must be positive, got {out_features}")
        for i, f in enumerate(factors):
            if f.up.ndim != 2 or f.down.ndim != 2 or f.up.shape[1] != f.down.shape[0]:
                raise ValueError(f"factor {i}: up {tuple(f.up.shape)} does not match down {tuple(f.down.shape)}")
        for i, d in enumerate(dense):
            if d.weight.ndim != 2:
                raise ValueError(f"dense {i}: weight must be 2-D, got {tuple(d.weight.shape)}")
        in_sizes = {f.down.shape[1] for f in factors} | {d.weight.shape[1] for d in dense}
        if len(in_sizes) > 1:
            raise ValueError(f"all terms of one layer need the same in_features, got {sorted(in_sizes)}")
        owners = [f.owner for f in factors] + [d.owner for d in dense]
        if any(o < 0 for o in owners):
            raise ValueError(f"owners must be >= 0, got {owners}")
        tensors = [f.down for f in factors] + [d.weight for d in dense]
        if dtype is None:
            dtype = _common_dtype(tensors) if tensors else torch.float32
        device = torch.device(device) if device is not None else (tensors[0].device if tensors else None)

        self.out_features = out_features
        self.in_features: int | None = in_sizes.pop() if in_sizes else None
        self._n_owners = max(owners) + 1 if owners else 0
        self._factors = tuple(factors)  # as given, for reference()
        self._dense_terms = tuple(dense)
        self._reference_cache: tuple | None = None

        # Fold in float32 at least (float64 stays float64), then cast once.
        build = _common_dtype([*tensors, torch.empty(0, dtype=torch.float32)])
        bounds = [_slice_bounds(f.out_slice, out_features, f.up.shape[0], f"factor {i}") for i, f in enumerate(factors)]
        order = sorted(range(len(factors)), key=lambda i: bounds[i])  # stable: rank rows grouped by slice
        downs, owners_per_rank = [], []
        blocks: list[tuple[int, int, int, int, list[Tensor]]] = []  # (start, stop, r0, r1, ups)
        r0 = 0
        for i in order:
            f, (start, stop) = factors[i], bounds[i]
            r = f.down.shape[0]
            downs.append(f.down.detach().to(device, build))
            owners_per_rank += [f.owner] * r
            up = f.up.detach().to(device, build) * f.scale  # [size, r]
            if blocks and blocks[-1][:2] == (start, stop):
                blocks[-1] = (start, stop, blocks[-1][2], r0 + r, [*blocks[-1][4], up])
            else:
                blocks.append((start, stop, r0, r0 + r, [up]))
            r0 += r
        in_f = self.in_features or 0
        self.down = (torch.cat(downs) if downs else torch.zeros(0, in_f)).to(device, dtype)  # [R_total, in]
        self.rank_owner = torch.tensor(owners_per_rank, dtype=torch.long, device=device)  # [R_total]
        # (start, stop, r0, r1, U_block [stop - start, r1 - r0]): output rows start:stop from ranks r0:r1
        self.up_blocks = [(a, b, q0, q1, torch.cat(ups, dim=1).to(device, dtype)) for a, b, q0, q1, ups in blocks]
        # owner -> [(up block, positions of its rank columns in that block)], for owner_delta without a host sync
        self._owner_columns: dict[int, list[tuple[int, Tensor]]] = {}
        for index, (_, _, q0, q1, _) in enumerate(self.up_blocks):
            for owner in sorted(set(owners_per_rank[q0:q1])):
                columns = [k for k in range(q1 - q0) if owners_per_rank[q0 + k] == owner]
                self._owner_columns.setdefault(owner, []).append((index, torch.tensor(columns, device=device)))

        # Dense terms: one summed weight per (owner, slice).
        grouped: dict[tuple[int, int, int], Tensor] = {}
        for i, d in enumerate(dense):
            start, stop = _slice_bounds(d.out_slice, out_features, d.weight.shape[0], f"dense {i}")
            key = (d.owner, start, stop)
            w = d.weight.detach().to(device, build)
            grouped[key] = grouped[key] + w if key in grouped else w
        self.dense = [(o, a, b, w.to(device, dtype)) for (o, a, b), w in grouped.items()]  # w [b-a, in]

    @property
    def n_owners(self) -> int:
        """Number of token-weight columns this layer reads (max owner + 1)."""
        return self._n_owners

    @property
    def rank(self) -> int:
        """Total stacked rank R_total."""
        return self.down.shape[0]

    @property
    def up(self) -> Tensor:
        """The full stacked up matrix U [out_features, R_total] (zeros outside each slice), assembled."""
        full = torch.zeros(self.out_features, self.rank, device=self.device, dtype=self.dtype)
        for start, stop, r0, r1, block in self.up_blocks:
            full[start:stop, r0:r1] = block
        return full

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    @property
    def device(self) -> torch.device:
        return self.down.device

    def nbytes(self) -> int:
        """Bytes held on the device by the stacked weights."""
        tensors = [self.down, self.rank_owner] + [u for *_, u in self.up_blocks] + [w for *_, w in self.dense]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> MaskedDelta:
        """A copy on another device and/or dtype (the stacked weights are moved, not rebuilt)."""
        other = object.__new__(MaskedDelta)
        other.__dict__.update(self.__dict__)
        dtype = dtype or self.dtype
        device = device if device is not None else self.device
        other.down = self.down.to(device, dtype)
        other.up_blocks = [(a, b, r0, r1, u.to(device, dtype)) for a, b, r0, r1, u in self.up_blocks]
        other.rank_owner = self.rank_owner.to(device)
        other.dense = [(o, a, b, w.to(device, dtype)) for o, a, b, w in self.dense]
        other._owner_columns = {o: [(i, c.to(device)) for i, c in cols] for o, cols in self._owner_columns.items()}
        other._reference_cache = None
        return other

    # ------------------------------------------------------------------ forward

    def _weights_for(self, x: Tensor, token_weights: Tensor) -> Tensor:
        """token_weights shaped like x[..., :-1] + (A,), batch repeated per CFG chunk when needed."""
        lead = x.shape[:-1]  # [B, L] or [B]
        tw = token_weights
        if tw.ndim != len(lead) + 1:
            raise ValueError(f"token_weights {tuple(tw.shape)} does not match input {tuple(x.shape)}")
        if tw.shape[-1] < self._n_owners:
            raise ValueError(f"token_weights has {tw.shape[-1]} columns, layer needs {self._n_owners}")
        if tw.ndim >= 3 and tw.shape[-2] != lead[-1]:
            raise ValueError(f"token_weights covers {tw.shape[-2]} tokens, the layer input has {lead[-1]}")
        b, b_tw = lead[0], tw.shape[0]
        if b_tw not in (1, b):
            if b % b_tw:
                raise ValueError(f"token_weights batch {b_tw} does not divide input batch {b}")
            tw = tw.repeat(b // b_tw, *([1] * (tw.ndim - 1)))  # chunk-major, like cond/uncond chunks
        return tw.to(self.device, self.dtype)

    def __call__(self, x: Tensor, token_weights: Tensor | None = None) -> Tensor:
        """Delta [..., L, out_features] (or [B, out] for 2-D x), in x's dtype.

        x: [B, L, in] (any leading dims) or [B, in]. token_weights: [B, L, A] ([B, A] for 2-D x),
        batch 1 or a divisor of B (repeated per chunk); None means all ones.
        """
        out = torch.zeros(*x.shape[:-1], self.out_features, device=x.device, dtype=self.dtype)
        return self.add_to(out, x, token_weights).to(x.dtype)

    def ranks(self, x: Tensor) -> Tensor:
        """The rank activations ``x @ D^T`` [..., L, R_total] that ``add_to`` and ``owner_delta`` share."""
        return F.linear(x.to(self.dtype), self.down)

    def owner_delta(self, x: Tensor, ranks: Tensor, owner: int) -> Tensor:
        """One owner's own delta at a few tokens: x [..., n, in] and its ``ranks`` [..., n, R_total] ->
        [..., n, out_features], unweighted. Costs n x r_owner x out, no base matmul, no host sync."""
        out = torch.zeros(*ranks.shape[:-1], self.out_features, device=ranks.device, dtype=self.dtype)
        for block_index, columns in self._owner_columns.get(owner, ()):
            start, stop, r0, r1, block = self.up_blocks[block_index]
            columns = columns.to(ranks.device)
            out[..., start:stop] += F.linear(ranks[..., r0:r1].to(self.dtype)[..., columns], block[:, columns])
        for o, start, stop, w in self.dense:
            if o == owner:
                out[..., start:stop] += F.linear(x.to(self.dtype), w)
        return out

    def owner_weight(self, owner: int) -> Tensor:
        """One owner's whole delta weight [out_features, in_features], dense, float32 (K-LoRA's scores)."""
        weight = torch.zeros(self.out_features, self.in_features or 0, device=self.device, dtype=torch.float32)
        mine = self.rank_owner == owner
        for start, stop, r0, r1, block in self.up_blocks:
            rows = mine[r0:r1]
            weight[start:stop] += block[:, rows].float() @ self.down[r0:r1][rows].float()
        for o, start, stop, w in self.dense:
            if o == owner:
                weight[start:stop] += w.float()
        return weight

    def add_to(
        self, out: Tensor, x: Tensor, token_weights: Tensor | None = None, ranks: Tensor | None = None
    ) -> Tensor:
        """Add delta(x) to out [..., L, out_features] in place (e.g. a layer's output); returns out. ``ranks``:
        ``self.ranks(x)`` when the caller has it already."""
        xc = x.to(self.dtype)
        tw = None if token_weights is None else self._weights_for(xc, token_weights)
        if self.rank:
            h = self.ranks(xc) if ranks is None else ranks  # [..., L, R_total]
            if tw is not None:
                h = h * tw[..., self.rank_owner]  # [..., L, R_total]
            if out.dtype == self.dtype and out.is_contiguous():
                out2d = out.view(-1, self.out_features)  # [B*L, out]
                h2d = h.reshape(-1, h.shape[-1])  # [B*L, R_total]
                for start, stop, r0, r1, block in self.up_blocks:
                    out2d[:, start:stop].addmm_(h2d[:, r0:r1], block.t())
            else:
                for start, stop, r0, r1, block in self.up_blocks:
                    out[..., start:stop].add_(F.linear(h[..., r0:r1], block))
        for owner, start, stop, w in self.dense:
            d = F.linear(xc, w)  # [..., L, stop-start]
            if tw is not None:
                d = d * tw[..., owner : owner + 1]
            out[..., start:stop] += d
        return out

    def check_fits(self, out_features: int, in_features: int) -> None:
        """Raise ValueError unless this delta runs on the layer's input (one token, on the delta's own device and
        dtype, with per-token weights) and writes the layer's output width."""
        if self.out_features != out_features:
            raise ValueError(f"its factors write {self.out_features} outputs, the layer has {out_features}")
        x = torch.zeros(1, 1, in_features, device=self.device, dtype=self.dtype)
        out = torch.zeros(1, 1, out_features, device=self.device, dtype=self.dtype)
        try:
            self.add_to(out, x, torch.ones(1, 1, max(self._n_owners, 1), device=self.device, dtype=self.dtype))
        except RuntimeError as err:
            raise ValueError(f"its factors do not run on the layer's input ({err})") from None

    # ---------------------------------------------------------------- reference

    def reference(self, x: Tensor, token_weights: Tensor | None = None) -> Tensor:
        """The plain per-LoRA loop (one down/up pair per factor), for tests and benchmarks."""
        if self._reference_cache is None:
            dev, dt = self.device, self.dtype
            lowrank = [(f.down.to(dev, dt), f.up.to(dev, dt), f.scale, f.owner, f.out_slice) for f in self._factors]
            dense = [(d.weight.to(dev, dt), d.owner, d.out_slice) for d in self._dense_terms]
            self._reference_cache = (lowrank, dense)
        lowrank, dense = self._reference_cache
        xc = x.to(self.dtype)
        tw = None if token_weights is None else self._weights_for(xc, token_weights)
        out = torch.zeros(*x.shape[:-1], self.out_features, device=xc.device, dtype=self.dtype)
        terms = [(F.linear(F.linear(xc, dn), up) * s, o, sl) for dn, up, s, o, sl in lowrank]
        for w, o, sl in dense:
            terms.append((F.linear(xc, w), o, sl))
        for delta, owner, out_slice in terms:
            if tw is not None:
                delta = delta * tw[..., owner : owner + 1]
            start, size = (0, self.out_features) if out_slice is None else out_slice
            out[..., start : start + size] += delta
        return out.to(x.dtype)
