"""Masks the user gives or keeps: drawings and mask images turned into subject masks on a model's token grid,
hints that steer the automatic split, and masks written compactly into an image's infotext and read back.

Shapes: a drawing is ``[H, W, 3]`` or ``[H, W, 4]`` uint8 (RGB / RGBA, any size); per-subject masks on the image
are ``[C, H, W]`` float32 in {0, 1}; on a token grid ``[C, h, w]``; batched ``SubjectMasks`` are ``[B, C, h, w]``.
Subject c's colour is ``freefuse.preview.PALETTE[c]`` (the mask picture's colours), in Subjects order.
"""

from __future__ import annotations

import base64
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from freefuse.partition import SubjectMasks
from freefuse.preview import PALETTE

COLOUR_TOLERANCE = 80.0  # RGB distance within which a pixel is a palette colour (anti-aliased brush edges)
INK_TOLERANCE = 48.0  # black, white and near-greys are paper, not ink
MAX_DRAWING_SIDE = 1024  # drawings are classified at this resolution at most (masks go to a coarser grid anyway)
_GRID_TEXT = re.compile(r"^(\d+)x(\d+):([A-Za-z0-9+/=]+)$")


@dataclass
class Layout:
    """Subject masks on the image (``[C, H, W]``) and which subjects the user drew, with what was wrong."""

    masks: Tensor  # [C, H, W] float32 in {0, 1}
    drawn: list[bool]  # per subject: the drawing covers it (an empty mask means "automatic")
    problems: list[str] = field(default_factory=list)
    use: str = "masks"  # "masks": the drawn subjects' masks are exactly the drawing; "hint": it steers the split
    strength: float = 1.0  # for a hint: 0 ignores it, 1 is the drawing itself

    @property
    def exact(self) -> bool:
        """The drawing is used as masks (a hint at full strength is the drawing itself)."""
        return self.use == "masks" or self.strength >= 1.0

    @property
    def complete(self) -> bool:
        """Every subject's mask is given: no automatic masks are needed, so nothing is captured."""
        return self.exact and all(self.drawn)

    def apply(self, maps: Tensor, grid_hw: tuple[int, int], partition) -> SubjectMasks:
        """The split of subject maps ``[B, C, N]`` on ``grid_hw`` with this layout: ``partition(maps)`` gives the
        automatic masks, steered by a hint first, or overruled by the drawn masks after."""
        grid = on_grid(self.masks, grid_hw)
        if not self.exact:
            return partition(hinted_maps(maps, grid, self.drawn, self.strength))
        return combine(grid, self.drawn, partition(maps), maps.shape[0])

    def cropped(self, box: tuple[float, float, float, float]) -> Layout:
        """The layout of a part of the image: ``box`` = (left, top, right, bottom) as fractions of its width
        and height (an inpaint "only masked" region, which Forge then stretches to the image size)."""
        height, width = self.masks.shape[-2:]
        left, top, right, bottom = box
        x0, x1 = int(round(left * width)), max(int(round(left * width)) + 1, int(round(right * width)))
        y0, y1 = int(round(top * height)), max(int(round(top * height)) + 1, int(round(bottom * height)))
        masks = self.masks[:, y0:y1, x0:x1].clone()  # [C, h', w']
        return Layout(masks, [d and bool(m.any()) for d, m in zip(self.drawn, masks, strict=True)], list(self.problems),
                      self.use, self.strength)  # fmt: skip

    def given(self, grid_hw: tuple[int, int], batch: int) -> SubjectMasks:
        """Every subject's masks as drawn (``complete`` layouts), on ``grid_hw``, for ``batch`` images."""
        return combine(on_grid(self.masks, grid_hw), self.drawn, None, batch)


def layout_from_drawing(image: np.ndarray, n_subjects: int) -> Layout:
    """A colour-coded drawing -> one mask per subject (pixel in subject c's palette colour -> subject c).

    Transparent, black, white and grey pixels are paper. A colour that is no subject's (another palette colour,
    or none) is reported once and ignored.
    """
    image = np.asarray(image)
    step = -(-max(image.shape[:2]) // MAX_DRAWING_SIDE)  # a huge upload is classified at most 1024 px a side
    rgb, ink = _ink(image[::step, ::step] if step > 1 else image)  # [H, W, 3] float64, [H, W] bool
    palette = np.asarray(PALETTE, dtype=np.float64)  # [P, 3]
    distance = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, P]
    nearest = distance.argmin(-1)  # [H, W]
    close = distance.min(-1) <= COLOUR_TOLERANCE
    problems = []
    foreign = ink & (~close | (nearest >= n_subjects))
    if foreign.mean() > 0.001:
        example = tuple(int(v) for v in rgb[foreign][0])
        problems.append(
            f"the layout drawing has colours that are no subject's (e.g. RGB {example}); they are ignored "
            f"(subjects' colours in Subjects order: {', '.join(_colour_names(n_subjects))})"
        )
    masks = np.stack([ink & close & (nearest == c) for c in range(n_subjects)]).astype(np.float32)
    return Layout(torch.from_numpy(masks), [bool(m.any()) for m in masks], problems)


def layout_from_masks(images: list[np.ndarray | None], n_subjects: int) -> Layout:
    """One black/white image per subject (white = the subject), in Subjects order; None = automatic."""
    problems = []
    if len(images) > n_subjects:
        problems.append(f"got {len(images)} mask images for {n_subjects} subjects; the extra ones are ignored")
    images = list(images[:n_subjects]) + [None] * max(0, n_subjects - len(images))
    sizes = {tuple(img.shape[:2]) for img in images if img is not None}
    if not sizes:
        return Layout(torch.zeros(n_subjects, 1, 1), [False] * n_subjects, problems)
    height, width = max(sizes)
    planes = []
    for c, img in enumerate(images):
        if img is None:
            planes.append(np.zeros((height, width), dtype=np.float32))
            continue
        grey = _luminance(img)
        if ((grey > 0.2) & (grey < 0.8)).mean() > 0.05:
            problems.append(f"mask image {c + 1} is not a black/white mask (many grey pixels); it is ignored")
            planes.append(np.zeros((height, width), dtype=np.float32))
            continue
        if not (grey >= 0.5).any():
            problems.append(f"mask image {c + 1} is empty (all black); that subject's mask is automatic")
        plane = torch.from_numpy((grey >= 0.5).astype(np.float32))[None, None]
        planes.append(F.interpolate(plane, size=(height, width), mode="nearest-exact")[0, 0].numpy())
    masks = np.stack(planes)
    return Layout(torch.from_numpy(masks), [bool(m.any()) for m in masks], problems)


def on_grid(masks: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """``[C, H, W]`` image masks -> ``[C, h, w]`` grid masks: a token belongs to a subject when at least half of
    its area does (any size and aspect ratio; the drawing is stretched to the image)."""
    area = F.adaptive_avg_pool2d(masks.float()[None], grid_hw)[0]  # [C, h, w] share of each token
    return (area >= 0.5).float()


def combine(given: Tensor, drawn: list[bool], automatic: SubjectMasks | None, batch: int) -> SubjectMasks:
    """Given masks where the user drew them, automatic ones for the other subjects, never overlapping.

    ``given`` ``[C, h, w]`` on the grid of ``automatic`` (``[B, C, h, w]``), or any grid when every subject is
    drawn (``automatic`` None). A drawn subject keeps exactly its drawing (an earlier subject wins a pixel two
    drawings share); an automatic subject loses the pixels any drawing holds.
    """
    given = given.float()
    claimed = torch.zeros_like(given[0])  # [h, w]
    exact = torch.zeros_like(given)
    for c, is_drawn in enumerate(drawn):
        if is_drawn:
            exact[c] = given[c] * (1 - claimed)
            claimed = (claimed + exact[c]).clamp(max=1)
    if automatic is None:
        if not all(drawn):
            raise ValueError("automatic masks are needed for the subjects that were not drawn")
        masks = exact[None].expand(batch, -1, -1, -1).clone()
    else:
        if tuple(automatic.grid_hw) != tuple(given.shape[-2:]):
            raise ValueError(f"given masks on {tuple(given.shape[-2:])}, automatic on {automatic.grid_hw}")
        keep = torch.tensor([0.0 if d else 1.0 for d in drawn])[None, :, None, None]  # [1, C, 1, 1]
        masks = automatic.masks * keep * (1 - claimed) + exact[None] * (1 - keep)
    return SubjectMasks(masks=masks, background=(1 - masks.amax(dim=1)).clamp(0, 1))


def hinted_maps(maps: Tensor, hint: Tensor, drawn: list[bool], strength: float) -> Tensor:
    """Subject similarity maps ``[B, C, N]`` steered towards a hint ``[C, h, w]`` (h * w = N) before the split.

    A drawn subject's map becomes ``(1 - s) * map + s * top * hint``, with ``top`` the image's largest map value:
    its drawing pulls the split towards it in the maps' own units (the split's regularisers work in those),
    and the outline still follows the maps wherever they are clear. Strength 0 leaves the maps as they are;
    strength 1 leaves only the drawing (the caller uses the drawing as given masks then, which is exact).
    Subjects without a drawing keep their maps.
    """
    if strength <= 0.0 or not any(drawn):
        return maps
    flat = hint.float().flatten(1).to(maps.device, maps.dtype)  # [C, N]
    if flat.shape[-1] != maps.shape[-1]:
        raise ValueError(f"hint covers {flat.shape[-1]} tokens, the maps {maps.shape[-1]}")
    top = maps.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
    mixed = (1 - strength) * maps + strength * top * flat[None]
    on = torch.tensor(drawn, device=maps.device)[None, :, None]
    return torch.where(on, mixed, maps)


def encode_masks(masks: Tensor) -> str:
    """``[C, h, w]`` disjoint binary grid masks -> ``"<h>x<w>:<base64>"``: a zlib-packed label map (0 for
    background, c + 1 for subject c), a few hundred characters for a 64x64 grid, no comma or colon inside."""
    c, h, w = masks.shape
    labels = torch.zeros(h, w, dtype=torch.uint8)
    for subject in range(c):
        labels[masks[subject] > 0.5] = subject + 1
    packed = base64.b64encode(zlib.compress(labels.numpy().tobytes(), 9)).decode()
    return f"{h}x{w}:{packed}"


def decode_masks(text: str, n_subjects: int) -> Tensor:
    """``encode_masks`` output -> ``[C, h, w]``; ValueError when the text is no such map or has other subjects."""
    found = _GRID_TEXT.match(text.strip())
    if found is None:
        raise ValueError("not a FreeFuse mask map")
    h, w = int(found.group(1)), int(found.group(2))
    try:
        raw = zlib.decompress(base64.b64decode(found.group(3)))
    except (ValueError, zlib.error) as err:
        raise ValueError(f"the mask map is damaged ({err})") from None
    if len(raw) != h * w:
        raise ValueError(f"the mask map holds {len(raw)} tokens, not {h}x{w}")
    labels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(h, w).long()
    if int(labels.max()) > n_subjects:
        raise ValueError(f"the mask map has {int(labels.max())} subjects, this prompt {n_subjects}")
    return torch.stack([(labels == c + 1).float() for c in range(n_subjects)])


def _ink(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"a layout drawing must be an RGB or RGBA image, got shape {array.shape}")
    rgb = array[..., :3].astype(np.float64)
    opaque = array[..., 3] > 127 if array.shape[-1] == 4 else np.ones(array.shape[:2], dtype=bool)
    grey = rgb.max(-1) - rgb.min(-1) <= INK_TOLERANCE  # black, white and greys: paper
    return rgb, opaque & ~grey


def _luminance(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image).astype(np.float64)
    if array.ndim == 3:
        alpha = array[..., 3] / 255.0 if array.shape[-1] == 4 else 1.0
        array = array[..., :3].mean(-1) * alpha
    return array / 255.0


def _colour_names(n: int) -> list[str]:
    names = ["red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "dark green", "pink"]
    return [names[c % len(names)] for c in range(n)]
