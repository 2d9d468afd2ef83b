"""Pictures of subject masks: a colour overlay and one grey image per subject."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

# Subject colours in order; the list repeats when there are more subjects.
PALETTE: list[tuple[int, int, int]] = [
    (255, 0, 0),  # red
    (0, 255, 0),  # green
    (0, 0, 255),  # blue
    (255, 255, 0),  # yellow
    (255, 0, 255),  # magenta
    (0, 255, 255),  # cyan
    (255, 128, 0),  # orange
    (128, 0, 255),  # purple
    (0, 128, 64),  # dark green
    (255, 128, 192),  # pink
]
BACKGROUND_COLOUR: tuple[int, int, int] = (128, 128, 128)  # grey


def upsample_nearest(grid: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Nearest upsampling [..., h, w] -> [..., H, W]; pixel centres pick their cell, any aspect ratio."""
    h, w = grid.shape[-2:]
    height, width = size_hw
    rows = ((torch.arange(height, dtype=torch.float64) + 0.5) * h / height).floor().long().clamp_(max=h - 1)
    cols = ((torch.arange(width, dtype=torch.float64) + 0.5) * w / width).floor().long().clamp_(max=w - 1)
    return grid[..., rows, :][..., cols]


def _as_masks(masks: Tensor) -> Tensor:
    masks = masks.detach().float().cpu()
    if masks.ndim == 2:
        masks = masks.unsqueeze(0)
    if masks.ndim != 3:
        raise ValueError(f"masks must be [C, h, w], got {tuple(masks.shape)}")
    return masks.clamp(0.0, 1.0)


def tensor_to_image(image: Tensor) -> Image.Image:
    """A decoded image [3, H, W] in [0, 1] (Forge's postprocess_batch layout) as an RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def mask_overlay(
    masks: Tensor,
    size_hw: tuple[int, int],
    *,
    image: Image.Image | None = None,
    background: Tensor | None = None,
    alpha: float = 0.5,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """Colour each subject's mask (PALETTE order, background grey) and blend it over image or black.

    masks: [C, h, w] in [0, 1] on the token grid; background: [h, w] or None. Pixels covered by a mask
    become (1 - alpha) * image + alpha * colour; uncovered pixels keep the image. Overlapping or soft masks
    mix their colours by weight. labels (one per subject) are drawn as a legend in the top-left corner.
    """
    masks = _as_masks(masks)  # [C, h, w]
    height, width = size_hw
    colours = [PALETTE[i % len(PALETTE)] for i in range(masks.shape[0])]
    if background is not None:
        bg = _as_masks(background)
        if bg.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"background grid {tuple(bg.shape[-2:])} differs from masks {tuple(masks.shape[-2:])}")
        masks = torch.cat([masks, bg[:1]], dim=0)
        colours.append(BACKGROUND_COLOUR)
    if labels is not None and len(labels) != len(colours) - (background is not None):
        raise ValueError(f"got {len(labels)} labels for {len(colours) - (background is not None)} masks")

    layers = upsample_nearest(masks, (height, width)).double()  # [C', H, W]
    palette = torch.tensor(colours, dtype=torch.float64)  # [C', 3]
    total = layers.sum(dim=0)  # [H, W]
    colour = torch.einsum("chw,ck->hwk", layers, palette) / total.clamp(min=1.0)[..., None]  # [H, W, 3]
    cover = alpha * total.clamp(max=1.0)[..., None]  # [H, W, 1]

    if image is None:
        base = torch.zeros(height, width, 3, dtype=torch.float64)
    else:
        picture = image.convert("RGB")
        if picture.size != (width, height):
            picture = picture.resize((width, height), Image.Resampling.BILINEAR)
        base = torch.from_numpy(np.asarray(picture, dtype=np.float64).copy())  # [H, W, 3]
    blended = base * (1.0 - cover) + colour * cover
    result = Image.fromarray(blended.round().clamp(0, 255).to(torch.uint8).numpy())
    if labels:
        names = list(labels) + (["background"] if background is not None else [])
        _draw_legend(result, names, colours)
    return result


def _draw_legend(picture: Image.Image, names: Sequence[str], colours: Sequence[tuple[int, int, int]]) -> None:
    """Swatch + name per line in the top-left corner, on a dark box (PIL default font)."""
    draw = ImageDraw.Draw(picture)
    line, swatch, pad = 14, 10, 3
    text_w = max(int(draw.textlength(str(n))) for n in names)
    draw.rectangle([0, 0, 2 * pad + swatch + 4 + text_w, 2 * pad + line * len(names)], fill=(0, 0, 0))
    for i, (name, colour) in enumerate(zip(names, colours, strict=False)):
        top = pad + i * line
        draw.rectangle([pad, top + 2, pad + swatch, top + 2 + swatch], fill=colour)
        draw.text((pad + swatch + 4, top), str(name), fill=(255, 255, 255))


def mask_images(masks: Tensor, size_hw: tuple[int, int]) -> list[Image.Image]:
    """One grey "L" image per subject at size_hw (H, W): 255 where the mask is 1, 0 where it is 0."""
    layers = upsample_nearest(_as_masks(masks), size_hw)  # [C, H, W]
    grey = (layers * 255.0).round().to(torch.uint8).numpy()
    return [Image.fromarray(g) for g in grey]


STYLE_COLOUR: tuple[int, int, int] = (40, 20, 60)  # a cell where the style always won
UNDECIDED_COLOUR: tuple[int, int, int] = (200, 200, 200)  # a cell where no decision was made


def style_map_picture(style_share: Tensor, labels: Sequence[str], cell: int = 6) -> Image.Image:
    """Where the style won, per region: one panel per subject, a column per step and a row per LoRA layer.

    style_share: [steps, layers, C] float in [0, 1] (the share of decisions the style won in that cell; NaN: no
    decision). A cell is the subject's colour (PALETTE) where the subject always won, STYLE_COLOUR where the
    style always won, mixed in between; undecided cells are light grey. Each panel is titled with its label.
    """
    share = style_share.detach().float().cpu()
    steps, layers, regions = share.shape
    title, gap = 14, 4
    panel_w, panel_h = max(steps * cell, 60), layers * cell
    picture = Image.new("RGB", (regions * (panel_w + gap) + gap, title + panel_h + gap), (0, 0, 0))
    style = torch.tensor(STYLE_COLOUR, dtype=torch.float64)
    undecided = torch.tensor(UNDECIDED_COLOUR, dtype=torch.float64)
    draw = ImageDraw.Draw(picture)
    for c in range(regions):
        own = torch.tensor(PALETTE[c % len(PALETTE)], dtype=torch.float64)
        s = share[..., c].double().T  # [layers, steps]
        rgb = own * (1.0 - s.nan_to_num(0.0))[..., None] + style * s.nan_to_num(0.0)[..., None]
        rgb = torch.where(s.isnan()[..., None], undecided, rgb)
        cells = rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1).round().to(torch.uint8).numpy()
        left = gap + c * (panel_w + gap)
        picture.paste(Image.fromarray(cells), (left, title))
        draw.text((left, 1), str(labels[c]), fill=(255, 255, 255))
    return picture
