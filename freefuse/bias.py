"""Additive pre-softmax attention bias that keeps each subject's region and trigger tokens together.

Image tokens in subject l's region are pushed away from the other subjects' text tokens (``-neg_scale``)
and towards l's own tokens (``+pos_scale``); optionally l's text tokens are pushed towards l's region and
away from everything else. Non-subject text tokens are never biased.

The bias is built as ``BiasFactors`` (at most 2C rank-one terms), never as an L x L tensor unless the dense
form is asked for.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from freefuse.call_weights import repeat_positions


def token_owner(subject_positions: Sequence[Sequence[int]], n_txt: int) -> Tensor:
    """Owner subject of every text position: ``[T]`` long, -1 where no subject claims it."""
    owner = torch.full((n_txt,), -1, dtype=torch.long)
    for subject, positions in enumerate(subject_positions):
        for pos in positions:
            pos = int(pos)
            if not 0 <= pos < n_txt:
                raise ValueError(f"subject {subject}: text position {pos} outside 0..{n_txt - 1}")
            claimed = int(owner[pos])
            if claimed not in (-1, subject):
                raise ValueError(f"text position {pos} is claimed by subjects {claimed} and {subject}")
            owner[pos] = subject
    return owner


def _own_tokens(subject_positions: Sequence[Sequence[int]], n_txt: int, device: torch.device) -> Tensor:
    """One-hot ownership ``[C, T]`` float32: 1 where text position t belongs to subject c."""
    owner = token_owner(subject_positions, n_txt).to(device)  # [T]
    subjects = torch.arange(len(subject_positions), device=device)  # [C]
    return (owner[None, :] == subjects[:, None]).float()


def _check_masks(masks: Tensor, subject_positions: Sequence[Sequence[int]]) -> Tensor:
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, C, N_img], got shape {tuple(masks.shape)}")
    if masks.shape[1] != len(subject_positions):
        raise ValueError(f"{masks.shape[1]} masks for {len(subject_positions)} subjects' positions")
    return masks.float()


@dataclass(frozen=True)
class BiasFactors:
    """A pre-softmax bias as a sum of rank-one terms: ``bias[b, i, j] = sum_r query[b, i, r] * key[b, j, r]``.

    Every FreeFuse bias has this form with at most 2C terms (C subjects): region indicator x token weights,
    and, bidirectionally, token indicator x region weights. In that form it rides in R extra query/key
    channels of the attention call (freefuse.attention), and no L_q x L_k tensor is ever made.
    """

    query: Tensor  # [B, L_q, R] float32: per query position
    key: Tensor  # [B, L_k, R] float32: per key position

    @property
    def rank(self) -> int:
        return int(self.query.shape[-1])

    def dense(self) -> Tensor:
        """The bias as a dense ``[B, L_q, L_k]`` float32 tensor (the fallback path, and tests)."""
        return self.query @ self.key.transpose(1, 2)


def _token_weights(own: Tensor, *, neg_scale: float, pos_scale: float, positive: bool) -> Tensor:
    """``[C, T]``: how an image token of subject c's region is biased towards each text token."""
    others = own.sum(dim=0, keepdim=True) - own  # [C, T]: tokens of every subject but c
    weight = -neg_scale * others
    return weight + pos_scale * own if positive else weight


def _region_weights(masks: Tensor, *, neg_scale: float, pos_scale: float, positive: bool) -> Tensor:
    """``[B, C, N_img]``: how subject c's text tokens are biased towards each image token."""
    row = -neg_scale * (1.0 - masks)
    return row + pos_scale * masks if positive else row


def joint_bias_factors(
    masks: Tensor,
    subject_positions: Sequence[Sequence[int]],
    n_txt: int,
    *,
    neg_scale: float,
    pos_scale: float,
    positive: bool = True,
    bidirectional: bool = True,
) -> BiasFactors:
    """Factors of the FLUX joint-sequence bias ``[text | image]`` (query and key positions both T + N_img).

    ``masks``: ``[B, C, N_img]`` in {0, 1}, image tokens row-major; ``subject_positions[c]``: subject c's
    text positions. Image -> text: image token i in c's region gets ``+pos_scale`` on c's tokens and
    ``-neg_scale`` on the other subjects' tokens; bidirectional adds text -> image: c's tokens get
    ``+pos_scale`` on c's region and ``-neg_scale`` elsewhere. Text -> text and image -> image are zero.
    """
    masks = _check_masks(masks, subject_positions)  # [B, C, N_img]
    batch, n_subjects, n_img = masks.shape
    own = _own_tokens(subject_positions, n_txt, masks.device)  # [C, T]
    scales = {"neg_scale": neg_scale, "pos_scale": pos_scale, "positive": positive}
    length = n_txt + n_img
    query = masks.new_zeros(batch, length, n_subjects)
    key = masks.new_zeros(batch, length, n_subjects)
    query[:, n_txt:] = masks.transpose(1, 2)  # image rows of each region
    key[:, :n_txt] = _token_weights(own, **scales).t()  # text columns
    if not bidirectional:
        return BiasFactors(query, key)
    query_back = masks.new_zeros(batch, length, n_subjects)
    key_back = masks.new_zeros(batch, length, n_subjects)
    query_back[:, :n_txt] = own.t()  # each subject's text rows
    key_back[:, n_txt:] = _region_weights(masks, **scales).transpose(1, 2)  # image columns
    return BiasFactors(torch.cat([query, query_back], dim=-1), torch.cat([key, key_back], dim=-1))


def cross_bias_factors(
    masks: Tensor,
    subject_positions: Sequence[Sequence[int]],
    n_txt: int,
    *,
    neg_scale: float,
    pos_scale: float,
    positive: bool = True,
) -> BiasFactors:
    """Factors of the image -> text bias of UNet cross-attention (SDXL): queries N_img, keys T."""
    masks = _check_masks(masks, subject_positions)  # [B, C, N_img]
    own = _own_tokens(subject_positions, n_txt, masks.device)  # [C, T]
    weights = _token_weights(own, neg_scale=neg_scale, pos_scale=pos_scale, positive=positive)  # [C, T]
    return BiasFactors(masks.transpose(1, 2).contiguous(), weights.t().expand(masks.shape[0], -1, -1).contiguous())


def joint_attention_bias(masks: Tensor, subject_positions: Sequence[Sequence[int]], n_txt: int, **scales) -> Tensor:
    """Dense ``[B, T+N_img, T+N_img]`` float32 of ``joint_bias_factors`` (same arguments)."""
    return joint_bias_factors(masks, subject_positions, n_txt, **scales).dense()


def cross_attention_bias(masks: Tensor, subject_positions: Sequence[Sequence[int]], n_txt: int, **scales) -> Tensor:
    """Dense ``[B, N_img, T]`` float32 of ``cross_bias_factors`` (same arguments)."""
    return cross_bias_factors(masks, subject_positions, n_txt, **scales).dense()


def call_bias_factors(
    layout: str,
    masks: Tensor,
    subject_positions: Sequence[Sequence[int]],
    n_txt_cond: int,
    n_txt: int,
    cond_or_uncond: Sequence[int],
    *,
    neg_scale: float,
    pos_scale: float,
    positive: bool = True,
    bidirectional: bool = True,
) -> BiasFactors:
    """The bias of one model call: ``layout`` "joint" (FLUX) or "cross" (UNet), rows in the call's chunk order.

    ``masks`` [B, C, N_img]; positions are in the cond prompt of ``n_txt_cond`` tokens, repeated the way Forge
    repeats a shorter cond up to the call's ``n_txt``; uncond chunks get no bias (zero query factors).
    """
    positions = [repeat_positions(p, n_txt_cond, n_txt) for p in subject_positions]
    scales = {"neg_scale": neg_scale, "pos_scale": pos_scale, "positive": positive}
    if layout == "joint":
        per_image = joint_bias_factors(masks, positions, n_txt, bidirectional=bidirectional, **scales)
    elif layout == "cross":
        per_image = cross_bias_factors(masks, positions, n_txt, **scales)
    else:
        raise ValueError(f"bias layout must be 'joint' or 'cross', got {layout!r}")
    return BiasFactors(bias_for_call(per_image.query, cond_or_uncond), torch.cat([per_image.key] * len(cond_or_uncond)))


def bias_for_call(per_image: Tensor, cond_or_uncond: Sequence[int]) -> Tensor:
    """Per-image rows ``[B_img, ...]`` stacked for a call of ``len(cond_or_uncond)`` chunks of ``B_img`` rows.

    Flag 0 (cond) chunks get ``per_image``; flag 1 (uncond) chunks get zeros.
    """
    if not cond_or_uncond:
        raise ValueError("cond_or_uncond is empty")
    zeros = None
    chunks = []
    for flag in cond_or_uncond:
        if flag == 0:
            chunks.append(per_image)
        elif flag == 1:
            if zeros is None:
                zeros = torch.zeros_like(per_image)
            chunks.append(zeros)
        else:
            raise ValueError(f"cond_or_uncond entries must be 0 (cond) or 1 (uncond), got {flag!r}")
    return torch.cat(chunks, dim=0)


_BLOCK_FORMS = (
    "accepted forms: 'all', 'none', 'double_stream_only', 'single_stream_only', 'last_half_double', "
    "'transformer_blocks.<i>', 'single_transformer_blocks.<i>', "
    "or a list such as 'double:0-18;single:0-37' / 'double:10-18' / 'double:0,2;single:5-7'"
)
_ITEM = re.compile(r"^(?:(double|single)\s*:)?\s*(\d+)\s*(?:-\s*(\d+))?$")


def _parse_block_list(spec: str, n_double: int, n_single: int) -> tuple[frozenset[int], frozenset[int]]:
    chosen: dict[str, set[int]] = {"double": set(), "single": set()}
    limits = {"double": n_double, "single": n_single}
    kind = None
    for item in re.split(r"[;,]", spec):
        found = _ITEM.match(item.strip())
        if found is None:
            raise ValueError(f"bad block item {item.strip()!r} in {spec!r}; {_BLOCK_FORMS}")
        kind = found.group(1) or kind
        if kind is None:
            raise ValueError(f"block list {spec!r} must start with 'double:' or 'single:'; {_BLOCK_FORMS}")
        first = int(found.group(2))
        last = int(found.group(3)) if found.group(3) is not None else first
        if not first <= last < limits[kind]:
            raise ValueError(f"{kind} blocks {first}-{last} outside 0..{limits[kind] - 1} in {spec!r}")
        chosen[kind].update(range(first, last + 1))
    return frozenset(chosen["double"]), frozenset(chosen["single"])


def block_spec_problem(preset: str) -> str | None:
    """Why ``preset`` is not a block preset or list (syntax only, any model size), or None."""
    try:
        bias_blocks(preset, 4096, 4096)  # any real model has fewer blocks
    except ValueError as err:
        return str(err)
    return None


def bias_blocks(preset: str, n_double: int, n_single: int) -> tuple[frozenset[int], frozenset[int]]:
    """Double- and single-stream block indices that get the bias.

    ``last_half_double`` is double blocks ``(n_double + 1) // 2 ..`` (10..18 of FLUX's 19, as official).
    """
    name = preset.strip().lower()
    doubles = frozenset(range(n_double))
    singles = frozenset(range(n_single))
    if name == "all":
        return doubles, singles
    if name == "none":
        return frozenset(), frozenset()
    if name == "double_stream_only":
        return doubles, frozenset()
    if name == "single_stream_only":
        return frozenset(), singles
    if name == "last_half_double":
        return frozenset(range((n_double + 1) // 2, n_double)), frozenset()
    named = re.fullmatch(r"(single_)?transformer_blocks\.(\d+)", name)
    if named:
        name = f"{'single' if named.group(1) else 'double'}:{named.group(2)}"
    if not name:
        raise ValueError(f"empty block preset; {_BLOCK_FORMS}")
    return _parse_block_list(name, n_double, n_single)
