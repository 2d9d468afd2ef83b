"""Latent-level refinement: nudge a step's denoised estimate x0 toward reference images.

After classifier-free guidance, x0 (the model-space latent [B, C, h, w] the sampler steps toward) is decoded
to pixels, embedded by image encoders, and moved one gradient step so that:

* the whole image's CLIP embedding comes closer to the style reference's (the style score), and
* each subject's crop (the bounding box of its FreeFuse mask) comes closer to that subject's references
  (the subject score: DINO when a DINO model is given, else CLIP).

Correcting x0 instead of x_t needs no backward pass through the denoiser and works with any sampler. Only the
latent receives a gradient (``torch.autograd.grad`` with the latent as its one input): the decoder and the
encoders are read, never changed, and nothing of the graph outlives the call. The step is scaled per image:
``strength * rms(x0) / rms(grad)``, so its size does not depend on the loss's scale.

Everything here is plain torch on tensors and callables; freefuse.forge.refinement finds the models on disk.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO / DINOv2
IMAGENET_STD = (0.229, 0.224, 0.225)
MOST_DECODED_LATENT = 64  # latents are halved until their shorter side is at most this (512 px images)


@dataclass
class Encoder:
    """An image encoder: ``run(pixels [B, 3, size, size] normalised, in ``dtype``) -> embeddings [B, D]``."""

    name: str  # what the user knows it by: its file or folder name
    run: Callable[[torch.Tensor], torch.Tensor]
    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    dtype: torch.dtype = torch.float32


def preprocess(images: torch.Tensor, encoder: Encoder) -> torch.Tensor:
    """Differentiable resize (shorter side to ``encoder.size``), centre crop and normalisation.

    images: [B, 3, H, W] in [0, 1]. Unlike Forge's clip_preprocess there is no rounding to 8 bits, which would
    stop the gradient.
    """
    size = encoder.size
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    height, width = max(size, round(h * scale)), max(size, round(w * scale))
    resized = F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False)
    top, left = (height - size) // 2, (width - size) // 2
    square = resized[:, :, top : top + size, left : left + size]
    mean = torch.tensor(encoder.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=images.device).view(1, 3, 1, 1)
    return (square - mean) / std


def embed(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Unit-length float32 embeddings [B, D] of images [B, 3, H, W] in [0, 1] (differentiable)."""
    out = encoder.run(preprocess(images, encoder).to(encoder.dtype))
    return F.normalize(out.float(), dim=-1)


def anchor(encoder: Encoder, images: Sequence[torch.Tensor]) -> torch.Tensor:
    """The direction [D] that reference images share: their unit embeddings averaged, made unit again.

    images: each [3, H, W] in [0, 1], any size (embedded one at a time).
    """
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor even when called in inference mode
        embeddings = torch.cat([embed(encoder, image[None].clone()) for image in images])
        return F.normalize(embeddings.mean(0), dim=-1)


def box_of(mask: torch.Tensor, pad: float = 0.1) -> tuple[float, float, float, float] | None:
    """The bounding box of a mask [h, w] as fractions (top, bottom, left, right) of its height and width,
    widened by ``pad`` of its size on each side; None for an empty mask."""
    rows = (mask > 0.5).any(dim=1).nonzero().flatten()
    cols = (mask > 0.5).any(dim=0).nonzero().flatten()
    if rows.numel() == 0:
        return None
    h, w = mask.shape
    top, bottom = int(rows.min()) / h, (int(rows.max()) + 1) / h
    left, right = int(cols.min()) / w, (int(cols.max()) + 1) / w
    dy, dx = pad * (bottom - top), pad * (right - left)
    return max(0.0, top - dy), min(1.0, bottom + dy), max(0.0, left - dx), min(1.0, right + dx)


def crop(images: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """The part of images [B, 3, H, W] inside ``box`` (fractions), at least one pixel each way."""
    h, w = images.shape[-2:]
    top, bottom, left, right = box
    y0, x0 = min(h - 1, math.floor(top * h)), min(w - 1, math.floor(left * w))
    y1, x1 = max(y0 + 1, math.ceil(bottom * h)), max(x0 + 1, math.ceil(right * w))
    return images[:, :, y0:y1, x0:x1]


@dataclass
class SubjectTarget:
    encoder: Encoder
    anchor: torch.Tensor  # [D] unit
    boxes: list[tuple[float, float, float, float] | None]  # per image of the batch (None: not in that image)


@dataclass
class Targets:
    """What the refinement pulls toward: the style (CLIP) and each subject that has references."""

    style_encoder: Encoder | None = None
    style_anchor: torch.Tensor | None = None  # [D] unit
    subjects: Sequence[SubjectTarget] = ()

    @property
    def empty(self) -> bool:
        return self.style_anchor is None and not self.subjects


def loss(
    images: torch.Tensor, targets: Targets, style_weight: float, subject_weight: float, first: int = 0
) -> torch.Tensor:
    """One minus cosine similarity to each anchor, weighted and summed over images and targets.

    images: [B, 3, H, W] in [0, 1], images ``first`` .. ``first + B - 1`` of the batch. Subject terms use each
    image's own box (a single box serves every image); an image a subject is absent from adds nothing for it.
    """
    total = images.new_zeros(())
    if targets.style_anchor is not None and style_weight > 0:
        e = embed(targets.style_encoder, images)
        total = total + style_weight * (1 - e @ targets.style_anchor.to(e).clone()).sum()
    if subject_weight > 0:
        for target in targets.subjects:
            for i in range(images.shape[0]):
                box = _box_for(target.boxes, first + i)
                if box is None:
                    continue
                f = embed(target.encoder, crop(images[i : i + 1], box))
                total = total + subject_weight * (1 - f @ target.anchor.to(f).clone()).sum()
    return total


def _box_for(boxes: Sequence, index: int):
    if len(boxes) == 1:
        return boxes[0]
    return boxes[index] if index < len(boxes) else None


def halvings(h: int, w: int, most: int = MOST_DECODED_LATENT) -> int:
    """How often a latent of h x w is halved (2x2 means) before decoding: until its shorter side <= most."""
    n = 0
    while min(h, w) // 2 ** (n + 1) >= 1 and min(h, w) / 2**n > most:
        n += 1
    return n


def refine_x0(
    x0: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    targets: Targets,
    strength: float,
    style_weight: float = 1.0,
    subject_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 moved one normalised gradient step down the refinement loss, and the loss before the step.

    x0: [B, C, h, w] model-space latent (may be an inference tensor). ``decode(z [B, C, h', w']) -> images
    [B, 3, H, W] in [0, 1]`` is differentiable; the latent is halved (2x2 means) before decoding until its
    shorter side is at most 64. Returns (x0' with x0's dtype and no autograd history, loss [] float32 detached).
    """
    if targets.empty or strength <= 0:
        return x0, x0.new_zeros((), dtype=torch.float32)
    corrected, total = [], x0.new_zeros((), dtype=torch.float32)
    for i in range(x0.shape[0]):  # one image at a time: the decoder's backward pass holds one image's activations
        z, value = _refined(x0[i : i + 1], decode, targets, strength, style_weight, subject_weight, i)
        corrected.append(z)
        total = total + value
    return torch.cat(corrected).to(x0.dtype), total


def _refined(x0, decode, targets, strength, style_weight, subject_weight, index):
    """Image ``index`` of the batch ([1, C, h, w]) moved one normalised step, and its loss (detached)."""
    with torch.inference_mode(False), torch.enable_grad():
        z = x0.detach().clone().float().requires_grad_(True)  # a clone made here is a normal tensor
        small = z
        for _ in range(halvings(*z.shape[-2:])):
            small = F.avg_pool2d(small, 2)
        images = decode(small).float()
        value = loss(images, targets, style_weight, subject_weight, first=index)
        if not value.requires_grad:  # nothing depends on the latent (the subjects are absent, no style)
            return x0.float(), value.detach()
        (grad,) = torch.autograd.grad(value, z)
    grad = torch.nan_to_num(grad.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    z = z.detach()
    step = strength * z.pow(2).mean().sqrt() / (grad.pow(2).mean().sqrt() + 1e-8)
    return z - step * grad, value.detach()


def in_window(step: int, steps: int, start: float, end: float) -> bool:
    """True when step (from 0) of ``steps`` lies in the fraction window [start, end] of the schedule."""
    if steps <= 0:
        return False
    progress = step / steps
    return start - 1e-9 <= progress <= end + 1e-9


def grad_ready(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself when a backward pass through it is possible, else ``plain_copy(module)``.

    Weights created under ``torch.inference_mode`` (Forge loads checkpoints that way) cannot be saved for
    backward. Either way the weights never receive a gradient: the refinement asks autograd for the latent's
    gradient only.
    """
    tensors = list(module.parameters()) + list(module.buffers())
    return plain_copy(module) if any(t.is_inference() for t in tensors) else module


def plain_copy(module: torch.nn.Module, device=None, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A private copy of ``module`` whose weights are plain tensors (new ones, never requiring grad), made on
    ``device`` in ``dtype`` (floating weights only) directly: moving or casting it leaves the original alone, and
    a backward pass through it works even if the original's weights are inference tensors."""

    def fresh(t: torch.Tensor) -> torch.Tensor:
        kind = dtype if dtype is not None and t.is_floating_point() else t.dtype
        return t.detach().to(device=device or t.device, dtype=kind, copy=True)

    with torch.inference_mode(False):
        twin = copy.copy(module)  # a new __dict__ with the same entries; the tensor tables are replaced below
        twin._parameters = {
            k: None if p is None else torch.nn.Parameter(fresh(p), requires_grad=False)
            for k, p in module._parameters.items()
        }
        twin._buffers = {k: None if b is None else fresh(b) for k, b in module._buffers.items()}
        twin._modules = {k: None if m is None else plain_copy(m, device, dtype) for k, m in module._modules.items()}
    return twin


def clip_encoder(model: torch.nn.Module, name: str) -> Encoder:
    """A transformers CLIPVisionModelWithProjection (a Hugging Face folder, or Forge's clip vision loader's
    ``.model``) as an Encoder of its projected image embedding."""
    dtype = next(model.parameters()).dtype
    return Encoder(name, lambda pixels: model(pixel_values=pixels).image_embeds, int(model.config.image_size),
                   CLIP_MEAN, CLIP_STD, dtype)  # fmt: skip


def dino_encoder(model: torch.nn.Module, name: str, size: int = 224) -> Encoder:
    """A transformers Dinov2Model as an Encoder of its pooled CLS token at ``size`` px (224, as DINOv2's own
    evaluation crops: its configs say 518, its pretraining size; the position embeddings are interpolated)."""
    dtype = next(model.parameters()).dtype
    return Encoder(name, lambda pixels: model(pixel_values=pixels).pooler_output, size, IMAGENET_MEAN,
                   IMAGENET_STD, dtype)  # fmt: skip
