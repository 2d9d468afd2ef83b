"""Similarity maps: one distribution over the image tokens per subject, from one attention layer.

Two methods (design/algorithm.md section 0):

* ``official_similarity_maps`` - what the official FreeFuse code runs (algorithm.md 1.4, 2.2): a
  cross-attention score per subject, a contrastive top-k "core", then concept attention on the attention
  outputs of the core tokens, ``softmax(sim / temperature)``.
* ``paper_similarity_maps`` - the paper's section 4.1-4.2 (Eq. 5-10): cross-attention rows of the
  subject's tokens with the attention-sink filter, the top-1 % salient tokens, then the mean of their
  self-attention rows.

All maths is float32. Subject positions are shared by every batch row. No N_img x N_img matrix is ever
formed; large intermediates are computed a few heads at a time.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

# Most float32 elements one head-chunked intermediate may hold (64 MiB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class SimilarityMaps:
    """Per-subject (and optional background) distributions over the image tokens."""

    subjects: torch.Tensor  # [B, C, N_img] float32, each [b, c, :] sums to 1
    background: torch.Tensor | None  # [B, N_img] float32 distribution, or None


# --------------------------------------------------------------------------------------------------
# Input checks


def _check_4d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor [B, H, tokens, D], got {shape}")


def _check_same_bhd(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    (ba, ha, _, da), (bb, hb, _, db) = a.shape, b.shape
    if (ba, ha, da) != (bb, hb, db):
        raise ValueError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} disagree on batch, heads or head dim"
        )


def _check_positions(positions: Sequence[int], n_txt: int, what: str) -> list[int]:
    if isinstance(positions, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of token indices, got a string")
    try:
        items = list(positions)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of token indices, got {type(positions).__name__}") from None
    out = []
    for p in items:
        if isinstance(p, bool):
            raise ValueError(f"{what}: {p!r} is not a token index")
        try:
            i = operator.index(p)
        except TypeError:
            raise ValueError(f"{what}: {p!r} is not a token index") from None
        if not 0 <= i < n_txt:
            raise ValueError(f"{what}: token index {i} is out of range for {n_txt} text tokens")
        out.append(i)
    if not out:
        raise ValueError(f"{what} is empty; each subject (and a background, if given) needs a text token")
    return out


def _check_position_sets(
    subject_positions: Sequence[Sequence[int]], background_positions: Sequence[int] | None, n_txt: int
) -> tuple[list[list[int]], list[int] | None]:
    if isinstance(subject_positions, (str, bytes)):
        raise ValueError("subject_positions must hold one list of token indices per subject, got a string")
    try:
        per_subject = list(subject_positions)
    except TypeError:
        raise ValueError("subject_positions must hold one list of token indices per subject") from None
    if not per_subject:
        raise ValueError("subject_positions is empty; give at least one subject")
    subjects = [_check_positions(p, n_txt, f"subject_positions[{i}]") for i, p in enumerate(per_subject)]
    background = None
    if background_positions is not None:
        background = _check_positions(background_positions, n_txt, "background_positions")
    return subjects, background


def _check_grid(grid_hw: tuple[int, int], n_img: int) -> tuple[int, int]:
    try:
        h, w = (operator.index(v) for v in grid_hw)
    except (TypeError, ValueError):
        h = w = 0
    if h <= 0 or w <= 0 or h * w != n_img:
        raise ValueError(f"grid_hw must be (h, w) positive ints with h * w == N_img = {n_img}, got {grid_hw!r}")
    return h, w


def _check_ratio(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


def _top_count(n: int, ratio: float) -> int:
    """``max(1, floor(n * ratio))``, at most ``n``."""
    return min(n, max(1, int(n * ratio)))


def _heads_per_chunk(n_heads: int, elements_per_head: int) -> int:
    return max(1, min(n_heads, _CHUNK_ELEMENTS // max(1, elements_per_head)))


def _mean_per_set(columns: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Mean over consecutive groups of ``sizes`` along dim 1: [B, sum(sizes), N] -> [B, len(sizes), N]."""
    groups = torch.split(columns, sizes, dim=1)
    return torch.stack([g.mean(dim=1) for g in groups], dim=1)


# --------------------------------------------------------------------------------------------------
# Official method steps


def _official_cross_scores(
    q_img: torch.Tensor,  # [B, H, N, D]
    k_txt: torch.Tensor,  # [B, H, T, D]
    position_sets: list[list[int]],
    logit_scale: float,
    softmax_over: Literal["image", "text"],
) -> torch.Tensor:  # [B, S, N]
    """s: mean over heads and each set's tokens of the image-query x text-key attention."""
    b, n_heads, n_img, _ = q_img.shape
    n_txt = k_txt.shape[2]
    flat = [p for ps in position_sets for p in ps]
    cols = torch.tensor(flat, device=q_img.device, dtype=torch.long)
    width = len(flat) if softmax_over == "image" else n_txt
    step = _heads_per_chunk(n_heads, b * n_img * width)
    summed = torch.zeros(b, len(flat), n_img, device=q_img.device, dtype=torch.float32)  # [B, P, N]
    for h0 in range(0, n_heads, step):
        q = q_img[:, h0 : h0 + step].float()  # [B, h, N, D]
        if softmax_over == "image":
            k = k_txt[:, h0 : h0 + step].index_select(2, cols).float()  # [B, h, P, D]
            logits = torch.einsum("bhnd,bhpd->bhpn", q, k) * logit_scale  # [B, h, P, N]
            probs = logits.softmax(dim=-1)  # over image tokens
        else:
            k = k_txt[:, h0 : h0 + step].float()  # [B, h, T, D]
            logits = torch.einsum("bhnd,bhtd->bhtn", q, k) * logit_scale  # [B, h, T, N]
            probs = logits.softmax(dim=2).index_select(2, cols)  # over all text tokens, then columns P
        summed += probs.sum(dim=1)
    return _mean_per_set(summed / n_heads, [len(ps) for ps in position_sets])


def _contrastive_scores(s: torch.Tensor) -> torch.Tensor:
    """c_l = C * s_l - sum_{m != l} s_m over the subject axis: [B, C, N] -> [B, C, N]."""
    n_subjects = s.shape[1]
    return n_subjects * s - (s.sum(dim=1, keepdim=True) - s)


def _concept_attention(
    o_img: torch.Tensor,  # [B, N, F] float32
    scores: torch.Tensor,  # [B, S, N]
    k: int,
    temperature: float,
) -> torch.Tensor:  # [B, S, N]
    """softmax over N of <mean of o_img over the top-k tokens of each score, o_img[j]> / temperature."""
    core = scores.topk(k, dim=-1).indices  # [B, S, k]
    weights = torch.zeros_like(scores).scatter_(-1, core, 1.0 / k)  # [B, S, N], 1/k on the core
    centre = torch.bmm(weights, o_img)  # [B, S, F] mean core vector
    sim = torch.bmm(centre, o_img.transpose(1, 2))  # [B, S, N]
    return (sim / temperature).softmax(dim=-1)


@torch.no_grad()
def official_similarity_maps(
    q_img: torch.Tensor,  # [B, H, N_img, D] image queries after QK-norm and RoPE
    k_txt: torch.Tensor,  # [B, H, T, D] text keys after QK-norm and RoPE
    o_img: torch.Tensor,  # [B, N_img, F] attention output at the image tokens
    subject_positions: Sequence[Sequence[int]],
    background_positions: Sequence[int] | None = None,
    *,
    logit_scale: float,
    top_k_ratio: float = 0.1,
    temperature: float = 4000.0,
    cross_softmax: Literal["image", "text"] = "image",
) -> SimilarityMaps:
    """Maps as the official code computes them (algorithm.md 1.4 FLUX, 2.2 SDXL).

    ``cross_softmax="image"`` (FLUX): softmax of ``q_img . k_txt[P] * logit_scale`` over the image tokens.
    ``"text"`` (SDXL): softmax over all T text keys, then columns P. Either way the mean over heads and
    the subject's tokens gives s_l; ``C*s_l - sum_{m!=l} s_m`` picks the top ``max(1, int(N*top_k_ratio))``
    core tokens; the map is ``softmax(<mean core o_img, o_img[j]> / temperature)`` over the image tokens.
    The background uses the same steps on its own positions without the contrastive subtraction.
    """
    _check_4d("q_img", q_img)
    _check_4d("k_txt", k_txt)
    _check_same_bhd("q_img", q_img, "k_txt", k_txt)
    if not isinstance(o_img, torch.Tensor) or o_img.dim() != 3:
        raise ValueError(f"o_img must be a 3-D tensor [B, N_img, F], got {getattr(o_img, 'shape', o_img)}")
    if o_img.shape[:2] != q_img.shape[:1] + q_img.shape[2:3]:
        raise ValueError(
            f"o_img {tuple(o_img.shape)} does not match q_img {tuple(q_img.shape)} in batch or image tokens"
        )
    if cross_softmax not in ("image", "text"):
        raise ValueError(f"cross_softmax must be 'image' or 'text', got {cross_softmax!r}")
    _check_ratio("top_k_ratio", top_k_ratio)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(logit_scale) and logit_scale > 0):
        raise ValueError(f"logit_scale must be a positive number, got {logit_scale!r}")
    subjects, background = _check_position_sets(subject_positions, background_positions, k_txt.shape[2])

    sets = subjects + ([background] if background is not None else [])
    s = _official_cross_scores(q_img, k_txt, sets, logit_scale, cross_softmax)  # [B, S, N]
    n_subjects = len(subjects)
    scores = torch.cat([_contrastive_scores(s[:, :n_subjects]), s[:, n_subjects:]], dim=1)
    k = _top_count(q_img.shape[2], top_k_ratio)
    maps = _concept_attention(o_img.float(), scores, k, temperature)  # [B, S, N]
    return SimilarityMaps(
        subjects=maps[:, :n_subjects].contiguous(),
        background=maps[:, n_subjects].contiguous() if background is not None else None,
    )


# --------------------------------------------------------------------------------------------------
# Paper method steps


def _border_tokens(grid_hw: tuple[int, int], border: int, device: torch.device) -> torch.Tensor:
    """[N] bool: tokens within ``border`` tokens of the grid edge (row-major grid)."""
    h, w = grid_hw
    rows = torch.arange(h, device=device).view(h, 1)
    cols = torch.arange(w, device=device).view(1, w)
    near_row = (rows < border) | (rows >= h - border)
    near_col = (cols < border) | (cols >= w - border)
    return (near_row | near_col).reshape(h * w)


def _sink_filter(rows: torch.Tensor, border: torch.Tensor, k: int) -> torch.Tensor:
    """Eq. 6-7 on rows over N (last axis): zero entries >= the row's k-th largest value that lie on
    ``border`` ([N] bool), then divide by the row sum. A row the filter would empty is only normalised."""
    tiny = torch.finfo(rows.dtype).tiny
    kth = rows.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    kept = rows.masked_fill((rows >= kth) & border, 0.0)
    total = kept.sum(dim=-1, keepdim=True)
    fallback = rows / rows.sum(dim=-1, keepdim=True).clamp_min(tiny)
    return torch.where(total > 0, kept / total.clamp_min(tiny), fallback)


def _paper_cross_maps(
    q_img: torch.Tensor,  # [B, H, N, D]
    k_img: torch.Tensor,  # [B, H, N, D]
    q_txt: torch.Tensor | None,  # [B, H, T, D]
    k_txt: torch.Tensor | None,  # [B, H, T, D]
    position_sets: list[list[int]],
    direction: Literal["text_to_image", "image_to_text"],
    border: torch.Tensor,  # [N] bool
    sink_k: int,
) -> torch.Tensor:  # [B, S, N]
    """M (Eq. 8): sink-filtered cross-attention rows, mean over heads and each set's tokens."""
    b, n_heads, n_img, d = q_img.shape
    scale = d**-0.5
    flat = [p for ps in position_sets for p in ps]
    cols = torch.tensor(flat, device=q_img.device, dtype=torch.long)
    width = len(flat) if direction == "text_to_image" else k_txt.shape[2]
    step = _heads_per_chunk(n_heads, b * n_img * width)
    summed = torch.zeros(b, len(flat), n_img, device=q_img.device, dtype=torch.float32)  # [B, P, N]
    for h0 in range(0, n_heads, step):
        if direction == "text_to_image":
            q = q_txt[:, h0 : h0 + step].index_select(2, cols).float()  # [B, h, P, D]
            k = k_img[:, h0 : h0 + step].float()  # [B, h, N, D]
            rows = (torch.einsum("bhpd,bhnd->bhpn", q, k) * scale).softmax(dim=-1)  # [B, h, P, N]
        else:
            q = q_img[:, h0 : h0 + step].float()  # [B, h, N, D]
            k = k_txt[:, h0 : h0 + step].float()  # [B, h, T, D]
            probs = (torch.einsum("bhnd,bhtd->bhtn", q, k) * scale).softmax(dim=2)  # over text [B,h,T,N]
            rows = probs.index_select(2, cols)  # [B, h, P, N], renormalised over N by the sink filter
        summed += _sink_filter(rows, border, sink_k).sum(dim=1)
    return _mean_per_set(summed / n_heads, [len(ps) for ps in position_sets])


def _self_attention_rows(
    q_img: torch.Tensor,  # [B, H, N, D]
    k_img: torch.Tensor,  # [B, H, N, D]
    salient: torch.Tensor,  # [B, S, k] image-token indices
) -> torch.Tensor:  # [B, S, N]
    """Eq. 10: mean over heads and the salient rows of softmax(q_img[i] . k_img^T / sqrt(D))."""
    b, n_heads, n_img, d = q_img.shape
    _, n_sets, k = salient.shape
    index = salient.reshape(b, 1, n_sets * k, 1)
    step = _heads_per_chunk(n_heads, b * n_sets * k * n_img)
    summed = torch.zeros(b, n_sets * k, n_img, device=q_img.device, dtype=torch.float32)
    for h0 in range(0, n_heads, step):
        q_all = q_img[:, h0 : h0 + step]
        q = q_all.gather(2, index.expand(-1, q_all.shape[1], -1, d)).float()  # [B, h, S*k, D]
        k_chunk = k_img[:, h0 : h0 + step].float()  # [B, h, N, D]
        logits = torch.einsum("bhqd,bhnd->bhqn", q, k_chunk) * d**-0.5  # [B, h, S*k, N]
        summed += logits.softmax(dim=-1).sum(dim=1)
    return (summed / n_heads).view(b, n_sets, k, n_img).mean(dim=2)


@torch.no_grad()
def paper_similarity_maps(
    q_img: torch.Tensor,  # [B, H, N_img, D]
    k_img: torch.Tensor,  # [B, H, N_img, D]
    subject_positions: Sequence[Sequence[int]],
    background_positions: Sequence[int] | None = None,
    *,
    grid_hw: tuple[int, int],
    q_txt: torch.Tensor | None = None,  # [B, H, T, D]
    k_txt: torch.Tensor | None = None,  # [B, H, T, D]
    cross_direction: Literal["text_to_image", "image_to_text"] = "text_to_image",
    sink_top_ratio: float = 0.01,
    sink_border: int = 1,
    salient_ratio: float = 0.01,
    q_cross: torch.Tensor | None = None,  # [B, H, N_img, D] cross-attention image queries, if not q_img
) -> SimilarityMaps:
    """Maps as the paper describes them (section 4.1-4.2, Eq. 5-10).

    In a UNet the cross attention (attn2) and the self attention (attn1) have their own image queries:
    ``q_img``/``k_img`` are the self-attention ones and ``q_cross`` the cross-attention queries used by
    ``"image_to_text"``; joint attention (FLUX) has one set and leaves ``q_cross`` None.

    Cross-attention rows per subject token (``"text_to_image"``: softmax of ``q_txt[t] . k_img^T/sqrt(D)``
    over image tokens; ``"image_to_text"``: softmax of ``q_img . k_txt^T/sqrt(D)`` over all text keys,
    column t, renormalised over the image). Sink filter per row and head: entries at least the row's k-th
    largest (``k = max(1, floor(N*sink_top_ratio))``) and within ``sink_border`` tokens of the grid edge
    are zeroed, the row renormalised (``sink_border=0`` switches it off). M_l = mean over heads and tokens;
    the map is the mean self-attention row over the top ``max(1, floor(N*salient_ratio))`` tokens of M_l.
    """
    _check_4d("q_img", q_img)
    _check_4d("k_img", k_img)
    if q_img.shape != k_img.shape:
        raise ValueError(f"q_img {tuple(q_img.shape)} and k_img {tuple(k_img.shape)} must have the same shape")
    if cross_direction == "text_to_image":
        txt_name, txt = "q_txt", q_txt
    elif cross_direction == "image_to_text":
        txt_name, txt = "k_txt", k_txt
    else:
        raise ValueError(f"cross_direction must be 'text_to_image' or 'image_to_text', got {cross_direction!r}")
    if txt is None:
        raise ValueError(f"cross_direction={cross_direction!r} needs {txt_name}")
    _check_4d(txt_name, txt)
    _check_same_bhd("q_img", q_img, txt_name, txt)
    n_img = q_img.shape[2]
    grid = _check_grid(grid_hw, n_img)
    _check_ratio("sink_top_ratio", sink_top_ratio)
    _check_ratio("salient_ratio", salient_ratio)
    if not (isinstance(sink_border, int) and sink_border >= 0):
        raise ValueError(f"sink_border must be a non-negative int, got {sink_border!r}")
    subjects, background = _check_position_sets(subject_positions, background_positions, txt.shape[2])

    sets = subjects + ([background] if background is not None else [])
    border = _border_tokens(grid, sink_border, q_img.device)
    if q_cross is not None and q_cross.shape != q_img.shape:
        raise ValueError(f"q_cross {tuple(q_cross.shape)} must have q_img's shape {tuple(q_img.shape)}")
    cross = _paper_cross_maps(
        q_img if q_cross is None else q_cross,
        k_img,
        q_txt,
        k_txt,
        sets,
        cross_direction,
        border,
        _top_count(n_img, sink_top_ratio),
    )  # [B, S, N]
    salient = cross.topk(_top_count(n_img, salient_ratio), dim=-1).indices  # [B, S, k]
    maps = _self_attention_rows(q_img, k_img, salient)  # [B, S, N]
    n_subjects = len(subjects)
    return SimilarityMaps(
        subjects=maps[:, :n_subjects].contiguous(),
        background=maps[:, n_subjects].contiguous() if background is not None else None,
    )
