"""Subject + style fusion: at every LoRA layer and step, inside each subject's region, the subject branch or the
style branch is applied, chosen from the features (feature-level selection, arXiv 2602.15539) or from the
weights and the time (K-LoRA, arXiv 2502.18461); the background always gets the style.

Everything here is a function of tensors; the Forge layer gathers them. Layouts:

- ``h0`` ``[B, n, F]``: the layer's base output at n sampled tokens (cond rows only), F output features;
- ``delta_of(owner)`` ``[B, n, F]``: one owner's delta there (owners: the subjects, then the style branch last);
- ``regions`` ``[B, n, C]``: each subject's mask at those tokens (C = A - 1);
- token weights ``[rows, L, A]``: what the runtime LoRA path multiplies each owner's delta by, per token.

The decision ``u`` ``[B, C]`` is 1 where the subject wins (ties go to the subject), 0 where the style wins, or a
soft weight between. With masks M_i, u and a style floor f, a spatial layer's output is

    h = h0 + (1 - sum_i M_i) d_s + sum_i M_i (u_i (d_i + f d_s) + (1 - u_i) d_s)

which is the runtime path with the subject weights ``u_i M_i`` and the style weight ``1 - (1 - f) sum_i u_i M_i``:
the selection only changes token weights, so it adds no matmul to the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

METRICS = ("kl", "var", "l2", "cos")  # feature divergences; "var" and "l2" are KL's cheaper second-order proxies
SELECTORS = (*METRICS, "klora", "sum")  # "sum": both branches everywhere (static stacking, for A/B)
RAMPS = ("s*", "s")  # K-LoRA's time ramps
EMPTY_REGION = 1e-6  # a region with less mask than this at a layer's sampled tokens makes no decision


# ---------------------------------------------------------------------- divergences
def divergence(h0: Tensor, delta: Tensor, metric: str = "kl", base: Tensor | None = None) -> Tensor:
    """How far ``h0 + delta`` moves from ``h0``, per token: ``[..., F]`` -> ``[...]`` float32.

    kl: KL(softmax(h0) || softmax(h0 + delta)) over the features; var: its second-order value, half the
    variance of delta under softmax(h0); l2: the mean squared delta; cos: 1 - cos(h0, h0 + delta).
    ``base``: ``base_of(h0, metric)``, when several deltas are measured against one h0.
    """
    h0, delta = h0.float(), delta.float()
    if base is None:
        base = base_of(h0, metric)
    if metric == "kl":
        log_q = F.log_softmax(h0 + delta, dim=-1)
        return (base.exp() * (base - log_q)).sum(-1)
    if metric == "var":
        mean = (base * delta).sum(-1)
        return 0.5 * ((base * delta * delta).sum(-1) - mean * mean)
    if metric == "l2":
        return (delta * delta).mean(-1)
    if metric == "cos":
        return 1.0 - F.cosine_similarity(h0, h0 + delta, dim=-1, eps=1e-12)
    raise ValueError(f"unknown divergence {metric!r}; one of {', '.join(METRICS)}")


def base_of(h0: Tensor, metric: str) -> Tensor | None:
    """What a divergence needs of ``h0`` alone (kl: its log-softmax, var: its softmax), computed once."""
    if metric == "kl":
        return F.log_softmax(h0.float(), dim=-1)
    if metric == "var":
        return F.softmax(h0.float(), dim=-1)
    return None


def at_tokens(t: Tensor, rows: Tensor, tokens: Tensor) -> Tensor:
    """``t[rows][:, tokens]`` gathered in one step: ``[rows, L, ...]`` -> ``[len(rows), len(tokens), ...]``
    without first copying every token of the rows (a layer's whole output, hundreds of MiB on FLUX)."""
    return t[rows.to(t.device)[:, None], tokens.to(t.device)[None, :]]


def sampled_tokens(n_tokens: int, max_tokens: int, device=None) -> Tensor:
    """A deterministic strided subset of at most ``max_tokens`` of ``n_tokens`` positions (all when fewer)."""
    stride = max(1, math.ceil(n_tokens / max(1, max_tokens)))
    return torch.arange(0, n_tokens, stride, device=device)


def region_scores(per_token: Tensor, regions: Tensor) -> tuple[Tensor, Tensor]:
    """Mask-weighted means of per-token divergences: ``per_token`` ``[B, n]``, ``regions`` ``[B, n, C]`` ->
    (scores ``[B, C]``, present ``[B, C]`` bool: the region has mask at these tokens)."""
    mass = regions.float().sum(1)  # [B, C]
    total = torch.einsum("bn,bnc->bc", per_token.float(), regions.float())
    return total / mass.clamp(min=EMPTY_REGION), mass > EMPTY_REGION


def choose(subject: Tensor, style: Tensor, bias: float | Tensor = 1.0, kappa: float = math.inf) -> Tensor:
    """The subject's share: hard (``kappa`` inf) 1 where ``subject >= bias * style`` else 0; soft
    ``subject^k / (subject^k + (bias * style)^k)``. Shapes broadcast."""
    rival = style * bias
    if math.isinf(kappa):
        return (subject >= rival).float()
    s, r = subject.clamp(min=0) ** kappa, rival.clamp(min=0) ** kappa
    return torch.where(s + r > 0, s / (s + r).clamp(min=1e-30), torch.ones_like(s))


def select(
    h0: Tensor,
    delta_of,
    regions: Tensor,
    metric: str = "kl",
    bias: float | Tensor = 1.0,
    kappa: float = math.inf,
) -> tuple[Tensor, Tensor]:
    """Feature-level selection in each region: ``u`` ``[B, C]`` and which regions decided ``[B, C]``.

    ``delta_of(owner)`` gives one owner's delta ``[B, n, F]`` at the sampled tokens (owners 0..C-1 the subjects,
    C the style); one at a time, so at most two ``[B, n, F]`` tensors live at once. Subject i is compared with
    the style on region i's tokens. A region without mask at these tokens does not decide (u = 0 there: it
    follows the background, which has the style)."""
    n_subjects = regions.shape[-1]
    base = base_of(h0, metric)
    style = divergence(h0, delta_of(n_subjects), metric, base)  # [B, n]
    u, present = [], []
    for i in range(n_subjects):
        region = regions[..., i : i + 1]
        s_subject, has = region_scores(divergence(h0, delta_of(i), metric, base), region)
        s_style, _ = region_scores(style, region)
        u.append(torch.where(has, choose(s_subject, s_style, bias, kappa), torch.zeros_like(s_subject)))
        present.append(has)
    return torch.cat(u, dim=1), torch.cat(present, dim=1)


def select_text(h0: Tensor, delta_of, n_subjects: int, metric: str = "kl", bias=1.0, kappa=math.inf) -> Tensor:
    """Text-side layers: one decision per sample over all tokens, the subjects' summed delta against the
    style's: ``[B]``."""
    base = base_of(h0, metric)
    summed = delta_of(0).float()
    for i in range(1, n_subjects):
        summed = summed + delta_of(i).float()
    subjects = divergence(h0, summed, metric, base).mean(-1)  # [B]
    style = divergence(h0, delta_of(n_subjects), metric, base).mean(-1)
    return choose(subjects, style, bias, kappa)


# ---------------------------------------------------------------------- decisions -> token weights
def fused_image_weights(weights: Tensor, u: Tensor, floor: float = 0.0) -> Tensor:
    """Token weights of image tokens after selection: ``weights`` ``[rows, L, A]`` (subject columns = masks,
    style column = 1), ``u`` ``[rows, C]`` -> subject i gets ``u_i M_i``, the style ``1 - (1 - floor) sum u_i M_i``."""
    chosen = weights[..., :-1] * u[:, None, :].to(weights.dtype)  # [rows, L, C]
    style = 1.0 - (1.0 - floor) * chosen.sum(-1, keepdim=True)  # [rows, L, 1]
    return torch.cat([chosen, style], dim=-1)


def fused_text_weights(weights: Tensor, u: Tensor, floor: float = 0.0) -> Tensor:
    """Token weights of text tokens after the text-side decision ``u`` ``[rows]``: subject columns (token
    exclusion) times u, the style ``1 - (1 - floor) u``."""
    shape = (-1,) + (1,) * (weights.ndim - 1)
    u = u.to(weights.dtype).reshape(shape)
    chosen = weights[..., :-1] * u
    style = (1.0 - (1.0 - floor) * u).expand(*weights.shape[:-1], 1)
    return torch.cat([chosen, style], dim=-1)


def share_with_uncond(u_cond: Tensor, cond_or_uncond: Sequence[int]) -> Tensor:
    """Decisions made on the cond rows ``[B, ...]``, laid out over a call's chunks (cond and uncond rows of
    image b get image b's decision): ``[len(cond_or_uncond) * B, ...]``."""
    return u_cond.repeat(len(cond_or_uncond), *([1] * (u_cond.ndim - 1)))


# ---------------------------------------------------------------------- K-LoRA's rule
def klora_score(delta_weight: Tensor, k: int) -> float:
    """The sum of the ``k`` largest |entries| of a dense delta weight."""
    flat = delta_weight.detach().float().abs().flatten()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def klora_balance(ratios: Sequence[float]) -> float:
    """K-LoRA's global balance: the mean subject/style L1 ratio over layers, recomputed without the layers whose
    ratio is at least three times the first mean."""
    values = [r for r in ratios if math.isfinite(r)]
    if not values:
        return 1.0
    first = sum(values) / len(values)
    kept = [r for r in values if r < 3.0 * first] or values
    return sum(kept) / len(kept)


def klora_ramp(progress: float, pattern: str = "s*") -> float:
    """K-LoRA's style ramp S(t) at ``progress`` (0 at pure noise, 1 at the end): "s" = 1.5 p + 0.5;
    "s*" = (1.5 p + 1.275) mod 1.5 (high for the first 15 %, then from 0 up to 1.275)."""
    if pattern == "s":
        return 1.5 * progress + 0.5
    if pattern == "s*":
        return math.fmod(1.5 * progress + 0.85 * 1.5, 1.5)
    raise ValueError(f"unknown K-LoRA ramp {pattern!r}; one of {', '.join(RAMPS)}")


def klora_uses_subject(subject_score: float, style_score: float, balance: float, ramp: float) -> bool:
    """K-LoRA: the subject (content) delta is used iff (S_c / gamma) / (S_s * S(t)) > 1."""
    return subject_score / balance > style_score * ramp


# ---------------------------------------------------------------------- one layer, one call
def token_split(layout: str, n_tokens: int, n_txt: int) -> tuple[slice, slice]:
    """(text tokens, image tokens) of a layer's token axis by its layout: "image"/"conv" all image, "text" and
    "global" (one vector per row) all text, "joint" the first ``n_txt`` text and the rest image."""
    if layout in ("image", "conv"):
        return slice(0, 0), slice(0, n_tokens)
    if layout == "joint":
        return slice(0, n_txt), slice(n_txt, n_tokens)
    return slice(0, n_tokens), slice(0, 0)


def fuse_layer(
    weights: Tensor,
    h0: Tensor,
    deltas_at,
    *,
    layout: str,
    n_txt: int,
    cond_rows: Tensor,
    n_chunks: int,
    metric: str = "kl",
    max_tokens: int = 256,
    floor: float = 0.0,
    bias: float = 1.0,
    kappa: float = math.inf,
) -> tuple[Tensor, Tensor, Tensor]:
    """Feature-level selection for one layer call: the token weights with each region's branch chosen.

    ``weights`` ``[rows, L, A]`` (``[rows, A]`` for "global", ``[rows, A, h, w]`` for "conv"; style column last),
    ``h0`` the base output ``[rows, L, F]`` (``[rows, F]``; ``[rows, F, h, w]``), ``deltas_at(rows, tokens)`` a
    function of an owner giving its delta ``[len(rows), len(tokens), F]`` there. Decisions are made on
    ``cond_rows`` (one per image) at a strided subset of at most ``max_tokens`` tokens per part and copied to the
    other ``n_chunks - 1`` chunks.
    Returns (weights, u ``[B, C]`` of the image regions, which regions decided ``[B, C]``).
    """
    conv = layout == "conv"
    if conv:
        grid = weights.shape[-2:]
        weights, h0 = weights.flatten(2).transpose(1, 2), h0.flatten(2).transpose(1, 2)  # [rows, hw, A|F]
    flat = weights.ndim == 2  # "global": one vector per row, as one text token
    if flat:
        weights, h0 = weights[:, None, :], h0[:, None, :]
    n_subjects = weights.shape[-1] - 1
    text, image = token_split(layout, weights.shape[1], n_txt)
    fused = weights.clone()
    u = torch.zeros(len(cond_rows), n_subjects, device=weights.device)
    decided = torch.zeros(len(cond_rows), n_subjects, dtype=torch.bool, device=weights.device)
    if image.stop > image.start:
        tokens = image.start + sampled_tokens(image.stop - image.start, max_tokens, weights.device)
        regions = at_tokens(weights, cond_rows, tokens)[..., :-1]  # [B, n, C]: the subjects' masks there
        h0_at = at_tokens(h0, cond_rows, tokens)
        u, decided = select(h0_at, deltas_at(cond_rows, tokens), regions, metric, bias, kappa)
        fused[:, image] = fused_image_weights(weights[:, image], share_with_uncond(u, range(n_chunks)), floor)
    if text.stop > text.start:
        tokens = text.start + sampled_tokens(text.stop - text.start, max_tokens, weights.device)
        h0_at = at_tokens(h0, cond_rows, tokens)
        u_text = select_text(h0_at, deltas_at(cond_rows, tokens), n_subjects, metric, bias, kappa)
        fused[:, text] = fused_text_weights(weights[:, text], share_with_uncond(u_text, range(n_chunks)), floor)
    if flat:
        fused = fused[:, 0]
    if conv:
        fused = fused.transpose(1, 2).reshape(fused.shape[0], -1, *grid)
    return fused, u, decided


def fixed_weights(weights: Tensor, layout: str, n_txt: int, u: Tensor, u_text: float, floor: float = 0.0) -> Tensor:
    """The token weights for decisions made without features (K-LoRA): ``u`` ``[C]`` per region, ``u_text`` for
    the text tokens, the same for every row. Layouts as in ``fuse_layer``."""
    conv = layout == "conv"
    if conv:
        grid = weights.shape[-2:]
        weights = weights.flatten(2).transpose(1, 2)
    flat = weights.ndim == 2
    if flat:
        weights = weights[:, None, :]
    text, image = token_split(layout, weights.shape[1], n_txt)
    fused = weights.clone()
    rows = weights.shape[0]
    if image.stop > image.start:
        fused[:, image] = fused_image_weights(weights[:, image], u.to(weights)[None].expand(rows, -1), floor)
    if text.stop > text.start:
        fused[:, text] = fused_text_weights(weights[:, text], torch.full((rows,), float(u_text)).to(weights), floor)
    if flat:
        fused = fused[:, 0]
    if conv:
        fused = fused.transpose(1, 2).reshape(fused.shape[0], -1, *grid)
    return fused


def klora_layer(owner_weights: Sequence[Tensor], owner_ranks: Sequence[int]) -> dict:
    """K-LoRA's numbers for one layer from each owner's dense delta weight (subjects, then the style last) and
    rank: per subject S_c and S_s with K = r_c r_s and the L1 ratio, and the same for the subjects summed
    (against the style, for text-side tokens)."""
    *subjects, style_weight = owner_weights
    r_s = max(1, owner_ranks[-1])
    per_subject = []
    for weight, rank in zip(subjects, owner_ranks[:-1], strict=False):
        k = max(1, rank) * r_s
        per_subject.append((klora_score(weight, k), klora_score(style_weight, k), _l1_ratio(weight, style_weight)))
    summed = torch.stack([w.float() for w in subjects]).sum(0)
    k = max(1, sum(owner_ranks[:-1])) * r_s
    text = (klora_score(summed, k), klora_score(style_weight, k), _l1_ratio(summed, style_weight))
    return {"subjects": per_subject, "text": text}


def _l1_ratio(subject: Tensor, style_weight: Tensor) -> float:
    denominator = float(style_weight.float().abs().sum())
    return float(subject.float().abs().sum()) / denominator if denominator > 0 else math.inf
