"""Latent refinement in Forge: find the CLIP / DINO weights on the user's disk, embed the reference images, and
correct the denoised estimate once per step in the window (the maths is freefuse.refine).

Nothing is downloaded. CLIP vision comes from ``models/clip_vision`` (or ControlNet's preprocessor folder,
where IP-Adapter users keep CLIP-ViT-H-14 / bigG): a single file goes through Forge's own clip vision loader, a
Hugging Face folder through ``transformers`` with ``local_files_only``. DINOv2 is a Hugging Face folder anywhere
one level below ``models/`` (``models/dinov2-small``). The decoder is a private copy of the checkpoint's VAE
decoder (Forge loads weights as inference tensors, which cannot be backpropagated through, and its VAE must not
be moved), made at the first corrected step and dropped when the session ends.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from freefuse import refine
from freefuse.partition import SubjectMasks
from freefuse.refine_inputs import References, to_tensor

log = logging.getLogger("freefuse")
WEIGHT_FILES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_loaded: dict[tuple[str, float], torch.nn.Module] = {}  # (path, mtime) -> model on the CPU, in float32


def clip_dirs() -> list[str]:
    from modules import paths

    dirs = [os.path.join(paths.models_path, "clip_vision")]
    try:
        from modules_forge.shared import preprocessor_dir

        dirs += [os.path.join(preprocessor_dir, "clip_vision"), preprocessor_dir]
    except ImportError:
        pass
    return dirs


def clip_candidates(dirs: list[str]) -> list[str]:
    """CLIP vision weights: files with a weights extension and Hugging Face folders of a CLIP vision model."""
    found = []
    for folder in dirs:
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if (
                os.path.isfile(path)
                and name.lower().endswith(WEIGHT_FILES)
                and "clip" in name.lower()
                or os.path.isdir(path)
                and _model_type(path) in ("clip_vision_model", "clip")
            ):
                found.append(path)
    return found


def dino_candidates(models_dir: str) -> list[str]:
    """Hugging Face DINOv2 folders one or two levels below ``models_dir``."""
    found = []
    if not os.path.isdir(models_dir):
        return found
    for name in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, name)
        if not os.path.isdir(path):
            continue
        if _model_type(path) == "dinov2":
            found.append(path)
            continue
        for inner in sorted(os.listdir(path)) if "dino" in name.lower() else ():
            if _model_type(os.path.join(path, inner)) == "dinov2":
                found.append(os.path.join(path, inner))
    return found


def _model_type(folder: str) -> str | None:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _pick(wanted: str, candidates: list[str]) -> str | None:
    """The candidate the user named (file or folder name, with or without extension), or the first one."""
    if not wanted.strip():
        return candidates[0] if candidates else None
    for path in candidates:
        name = os.path.basename(path)
        if wanted.strip() in (name, os.path.splitext(name)[0], path):
            return path
    return None


def _load(path: str, build) -> torch.nn.Module:
    key = (path, os.path.getmtime(path))
    if key not in _loaded:
        for old in [k for k in _loaded if k[0] == path]:
            del _loaded[old]
        with torch.inference_mode(False):
            model = build(path)
        _loaded[key] = refine.grad_ready(model.float().eval().requires_grad_(False))
    return _loaded[key]


def _load_clip(path: str) -> torch.nn.Module:
    if os.path.isdir(path):
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True)
    from backend.patcher import clipvision

    loaded = clipvision.load(path)
    if loaded is None:
        raise ValueError("it is not a CLIP vision model Forge recognises (ViT-L/14, ViT-H/14 or ViT-bigG/14)")
    return loaded.model


def _load_dino(path: str) -> torch.nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, local_files_only=True)


def prepare(settings, refs: References, loras: list[str], vae) -> tuple[Refinement | None, list[str]]:
    """The refinement of one generation (None when it cannot run) and one sentence per problem."""
    messages = list(refs.messages)
    if refs.empty:
        messages.append(
            "latent refinement is on but no usable reference image was given (a style reference, or subject "
            "references); it did not run"
        )
        return None, messages
    if vae is None or not hasattr(getattr(vae, "first_stage_model", None), "decoder"):
        messages.append("latent refinement needs the checkpoint's VAE, which this model lacks; it did not run")
        return None, messages
    from modules import paths

    dirs = clip_dirs()
    clips = clip_candidates(dirs)
    clip_path = _pick(settings.refine_clip, clips)
    if clip_path is None:
        found = ", ".join(os.path.basename(c) for c in clips) or "none"
        if settings.refine_clip.strip():
            messages.append(
                f"latent refinement did not run: refine_clip {settings.refine_clip!r} is not in {dirs[0]} "
                f"(found: {found})"
            )
        else:
            messages.append(
                f"latent refinement did not run: it needs a CLIP vision model in {dirs[0]} (found: none); put "
                "CLIP-ViT-H-14.safetensors or a Hugging Face CLIPVisionModelWithProjection folder there"
            )
        return None, messages
    dino_path = None
    if any(refs.subjects.values()):
        dinos = dino_candidates(paths.models_path)
        dino_path = _pick(settings.refine_dino, dinos)
        if dino_path is None and settings.refine_dino.strip():
            messages.append(
                f"refine_dino {settings.refine_dino!r} is not a DINOv2 folder in {paths.models_path} (found: "
                f"{', '.join(os.path.basename(d) for d in dinos) or 'none'}); the subject score uses CLIP"
            )
    try:
        clip = _load(clip_path, _load_clip)
        dino = _load(dino_path, _load_dino) if dino_path else None
    except Exception as err:  # noqa: BLE001 - a broken file must not break the generation
        log.exception("FreeFuse: loading refinement models failed")
        messages.append(f"latent refinement could not load its models ({err}); it did not run")
        return None, messages
    clip_encoder = refine.clip_encoder(clip, os.path.basename(clip_path))
    subject_encoder = refine.dino_encoder(dino, os.path.basename(dino_path)) if dino else clip_encoder
    try:
        style = refine.anchor(clip_encoder, [to_tensor(i) for i in refs.style]) if refs.style else None
        anchors = [
            refine.anchor(subject_encoder, [to_tensor(i) for i in refs.subjects.get(lora, [])])
            if refs.subjects.get(lora)
            else None
            for lora in loras
        ]
    except Exception as err:  # noqa: BLE001
        log.exception("FreeFuse: embedding the references failed")
        messages.append(f"latent refinement could not embed the reference images ({err}); it did not run")
        return None, messages
    return Refinement(
        settings, clip, dino, clip_encoder.name, subject_encoder.name, style, anchors, loras, vae
    ), messages


class _Decoder(torch.nn.Module):
    """A model-space latent -> an image in [0, 1], with Forge's own VAE code (process_out, decode) on a private
    copy of the decoder's weights."""

    def __init__(self, first_stage):
        super().__init__()
        self.post_quant_conv = first_stage.post_quant_conv
        self.decoder = first_stage.decoder
        self.scaling_factor, self.shift_factor = first_stage.scaling_factor, first_stage.shift_factor
        self._code = type(first_stage)

    def forward(self, z):
        z = self._code.process_out(self, z).to(self.decoder.conv_in.weight.dtype)
        return ((self._code.decode(self, z).float() + 1.0) / 2.0).clamp(0.0, 1.0)


@dataclass
class Refinement:
    settings: object
    clip: torch.nn.Module
    dino: torch.nn.Module | None
    clip_name: str
    subject_name: str  # the subject encoder's name (the CLIP model's when there is no DINO)
    style_anchor: torch.Tensor | None  # [D] unit
    subject_anchors: list[torch.Tensor | None]  # per subject, [D] unit (None: no reference)
    loras: list[str]
    vae: object
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss before its correction)
    failed: str | None = None
    _decoder: torch.nn.Module | None = None
    _boxes: tuple[int, list] | None = None  # (id of the masks, per subject its box per image)

    def step(self, x0: torch.Tensor, step: int, steps: int, masks: SubjectMasks | None) -> torch.Tensor:
        """The corrected x0 of one evaluation ([B, C, h, w]), or x0 itself outside the window."""
        s = self.settings
        if self.failed or masks is None or not refine.in_window(step, steps, s.refine_start, s.refine_end):
            return x0
        try:
            decoder = self._device_models(x0.device)
            targets = self._targets(masks, x0.device)
            corrected, loss = refine.refine_x0(
                x0, decoder, targets, s.refine_strength, s.refine_style_weight, s.refine_subject_weight
            )
        except Exception as err:  # noqa: BLE001 - finish the image without refinement
            log.exception("FreeFuse: latent refinement failed")
            self.failed = f"latent refinement stopped at step {step} ({err}); the image was finished without it"
            self.close()
            return x0
        self.losses.append((step, float(loss)))
        return corrected

    def _device_models(self, device: torch.device) -> torch.nn.Module:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        if self._decoder is None:
            first_stage = self.vae.first_stage_model
            vae_dtype = getattr(self.vae, "vae_dtype", torch.float32) if device.type == "cuda" else torch.float32
            self._decoder = refine.plain_copy(_Decoder(first_stage)).to(device=device, dtype=vae_dtype)
            for model in (self.clip, self.dino):
                if model is not None:
                    model.to(device=device, dtype=dtype)
        return self._decoder

    def _targets(self, masks: SubjectMasks, device) -> refine.Targets:
        if self._boxes is None or self._boxes[0] != id(masks):
            boxes = [[refine.box_of(masks.masks[b, c]) for b in range(masks.masks.shape[0])]
                     for c in range(masks.masks.shape[1])]  # fmt: skip
            self._boxes = (id(masks), boxes)
        clip = refine.clip_encoder(self.clip, self.clip_name)
        subject = refine.dino_encoder(self.dino, self.subject_name) if self.dino is not None else clip
        subjects = [
            refine.SubjectTarget(subject, anchor.to(device), self._boxes[1][c])
            for c, anchor in enumerate(self.subject_anchors)
            if anchor is not None and c < len(self._boxes[1])
        ]
        style = self.style_anchor.to(device) if self.style_anchor is not None else None
        return refine.Targets(clip if style is not None else None, style, subjects)

    def close(self) -> None:
        """Free the decoder copy and put the encoders back on the CPU (they stay loaded for the next run)."""
        self._decoder = None
        for model in (self.clip, self.dino):
            if model is not None:
                model.to(device="cpu", dtype=torch.float32)

    def report(self, steps: int) -> str:
        """One sentence on what ran, for the image's notes."""
        if self.failed:
            return self.failed
        if not self.losses:
            return (
                "latent refinement ran at no step: its window holds no step after the masks were found (widen "
                "refine_start / refine_end)"
            )
        parts = []
        if self.style_anchor is not None:
            parts.append(f"style by CLIP {self.clip_name}")
        with_refs = [lora for lora, a in zip(self.loras, self.subject_anchors, strict=True) if a is not None]
        if with_refs:
            how = f"DINO {self.subject_name}" if self.dino is not None else f"CLIP {self.clip_name} (no DINOv2 found)"
            parts.append(f"{', '.join(with_refs)} by {how}")
        first, last = self.losses[0][1], self.losses[-1][1]
        return (
            f"latent refinement ran at {len(self.losses)} of {steps} steps ({'; '.join(parts)}); loss "
            f"{first:.3f} -> {last:.3f}"
        )
