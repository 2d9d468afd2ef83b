"""Latent refinement in Forge: find the CLIP / DINO weights on the user's disk, embed the reference images, and
correct the denoised estimate once per step in the window (the maths is freefuse.refine).

Nothing is downloaded. CLIP vision comes from ``models/clip_vision`` (or ControlNet's preprocessor folder,
where IP-Adapter users keep CLIP-ViT-H-14 / bigG): a single file goes through Forge's own clip vision loader, a
Hugging Face folder through ``transformers`` with ``local_files_only``. DINOv2 is a Hugging Face folder directly in
``models/`` (``models/dinov2-small``) or in a ``models/dino*`` folder. A file that does not load is named in the
notes and not tried again while it stays unchanged. The decoder is a private copy of the checkpoint's VAE
decoder (Forge loads weights as inference tensors, which cannot be backpropagated through, and its VAE must not
be moved), made at the first corrected step and dropped when the session ends.
"""

from __future__ import annotations

import dataclasses
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
_loaded: dict[str, tuple[tuple[str, float], torch.nn.Module]] = {}  # kind -> ((path, mtime), model on the CPU,
# float32): the last CLIP and the last DINO used, never moved or cast (each session works on its own device copy)


_unloadable: dict[tuple[str, float], str] = {}  # (path, mtime) -> why it did not load (not tried again)


def release() -> None:
    """Forget the loaded CLIP / DINO models (a FreeFuse generation without refinement frees their memory)."""
    _loaded.clear()


def compute_dtype(device: torch.device) -> torch.dtype:
    """The encoders' dtype during refinement: half precision on a GPU, float32 on the CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


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
    """CLIP vision weights: weight files and Hugging Face CLIP vision folders in ``dirs`` (in a folder not named
    clip_vision, only files whose name says CLIP: ControlNet's preprocessor folder holds many other models)."""
    found = []
    for folder in dirs:
        if not os.path.isdir(folder):
            continue
        any_file = os.path.basename(os.path.normpath(folder)) == "clip_vision"
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                if _model_type(path) in ("clip_vision_model", "clip"):
                    found.append(path)
            elif name.lower().endswith(WEIGHT_FILES) and (any_file or "clip" in name.lower()):
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


def _load(kind: str, path: str, build) -> torch.nn.Module:
    key = (path, os.path.getmtime(path))
    if key in _unloadable:
        raise ValueError(_unloadable[key])
    if kind not in _loaded or _loaded[kind][0] != key:
        _loaded.pop(kind, None)  # at most one model of each kind stays loaded
        try:
            with torch.inference_mode(False):
                model = build(path)
                model = refine.grad_ready(model.float().eval().requires_grad_(False))
        except Exception as err:
            _unloadable[key] = str(err)
            raise
        _loaded[kind] = (key, model)
    return _loaded[kind][1]


def _first_loading(kind: str, wanted: str, candidates: list[str], build, messages: list[str]):
    """(path, model) of the named candidate, or of the first candidate that loads; (None, None) when none does.
    A candidate that fails to load is named once in ``messages``."""
    named = _pick(wanted, candidates)
    order = [named] if wanted.strip() else candidates
    for path in order:
        if path is None:
            continue
        try:
            return path, _load(kind, path, build)
        except Exception as err:  # noqa: BLE001 - a broken or foreign file must not break the generation
            log.exception("FreeFuse: loading %s failed", path)
            messages.append(f"could not load {os.path.basename(path)} for latent refinement ({err})")
    return None, None


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
        if messages:  # each unusable input was named; say once what it meant
            messages[-1] += "; with no usable reference image, latent refinement did not run"
        else:
            messages.append(
                "latent refinement is on but no reference image was given (a style reference, or subject "
                "references); it did not run"
            )
        return None, messages
    uses_style = bool(refs.style) and settings.refine_style_weight > 0
    uses_subjects = any(refs.subjects.values()) and settings.refine_subject_weight > 0
    if settings.refine_strength <= 0 or not (uses_style or uses_subjects):
        why = "refine_strength is 0" if settings.refine_strength <= 0 else "the weights of the given references are 0"
        messages.append(f"latent refinement did not run: {why}")
        return None, messages
    if vae is None or not hasattr(getattr(vae, "first_stage_model", None), "decoder"):
        messages.append("latent refinement needs the checkpoint's VAE, which this model lacks; it did not run")
        return None, messages
    from modules import paths

    dirs = clip_dirs()
    clips = clip_candidates(dirs)
    clip_path, clip = _first_loading("clip", settings.refine_clip, clips, _load_clip, messages)
    if clip is None:
        found = ", ".join(os.path.basename(c) for c in clips) or "none"
        if settings.refine_clip.strip() and _pick(settings.refine_clip, clips) is None:
            messages.append(
                f"latent refinement did not run: refine_clip {settings.refine_clip!r} is not in {dirs[0]} "
                f"(found: {found})"
            )
        elif clips:
            messages[-1] += "; with no usable CLIP vision model, latent refinement did not run"
        else:
            messages.append(
                f"latent refinement did not run: it needs a CLIP vision model in {dirs[0]} (found: none); put "
                "CLIP-ViT-H-14.safetensors or a Hugging Face CLIPVisionModelWithProjection folder there"
            )
        return None, messages
    dino_path, dino = None, None
    if uses_subjects:
        dinos = dino_candidates(paths.models_path)
        if settings.refine_dino.strip() and _pick(settings.refine_dino, dinos) is None:
            messages.append(
                f"refine_dino {settings.refine_dino!r} is not a DINOv2 folder in {paths.models_path} (found: "
                f"{', '.join(os.path.basename(d) for d in dinos) or 'none'}); the subject score uses CLIP"
            )
        else:
            dino_path, dino = _first_loading("dino", settings.refine_dino, dinos, _load_dino, messages)
    clip_encoder = refine.clip_encoder(clip, os.path.basename(clip_path))
    subject_encoder = refine.dino_encoder(dino, os.path.basename(dino_path)) if dino is not None else clip_encoder
    try:
        style = refine.anchor(clip_encoder, [to_tensor(i) for i in refs.style]) if uses_style else None
        anchors = [
            refine.anchor(subject_encoder, [to_tensor(i) for i in refs.subjects[lora]])
            if uses_subjects and refs.subjects.get(lora)
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
    masks_seen: bool = False  # the masks existed at some evaluation (else the window could not matter)
    _device: dict | None = None  # this session's copies on the sampling device: decoder, clip, dino
    _targets_for: tuple | None = None  # (the masks, the targets built for them on the device)

    def fresh(self) -> Refinement:
        """The same models and anchors with nothing run yet (one per sampling pass)."""
        return dataclasses.replace(self, losses=[], failed=None, masks_seen=False, _device=None, _targets_for=None)

    def step(self, x0: torch.Tensor, step: int, steps: int, masks: SubjectMasks | None) -> torch.Tensor:
        """The corrected x0 of a step's first evaluation ([B, C, h, w]), or x0 itself (outside the window, or
        another evaluation of a step already corrected)."""
        s = self.settings
        self.masks_seen = self.masks_seen or masks is not None
        if self.failed or masks is None or not refine.in_window(step, steps, s.refine_start, s.refine_end):
            return x0
        if any(done == step for done, _ in self.losses):  # a second-order sampler's other evaluations of this
            return x0  # step: one correction per step, whatever the sampler
        try:
            with torch.inference_mode(False):  # Forge samples in inference mode; the copies must be plain tensors
                models = self._device_models(x0.device)
            targets = self._targets(masks, models, x0.device)
            corrected, loss = refine.refine_x0(
                x0, models["decoder"], targets, s.refine_strength, s.refine_style_weight, s.refine_subject_weight
            )
        except Exception as err:  # noqa: BLE001 - finish the image without refinement
            log.exception("FreeFuse: latent refinement failed")
            self.failed = f"latent refinement stopped at step {step} ({err}); the image was finished without it"
            self.close()
            return x0
        self.losses.append((step, float(loss)))
        return corrected

    def _device_models(self, device: torch.device) -> dict:
        """Private copies on the sampling device, made once per session: Forge's VAE and the loaded encoders are
        never moved or cast."""
        if self._device is None:
            vae_dtype = getattr(self.vae, "vae_dtype", torch.float32) if device.type == "cuda" else torch.float32
            dtype = compute_dtype(device)
            decoder = _Decoder(self.vae.first_stage_model)
            self._device = {
                "decoder": refine.plain_copy(decoder, device, vae_dtype),
                "clip": refine.plain_copy(self.clip, device, dtype),
                "dino": refine.plain_copy(self.dino, device, dtype) if self.dino is not None else None,
            }
        return self._device

    def _targets(self, masks: SubjectMasks, models: dict, device) -> refine.Targets:
        """The targets on the device with each subject's box per image, built once per set of masks."""
        if self._targets_for is not None and self._targets_for[0] is masks:
            return self._targets_for[1]
        clip = refine.clip_encoder(models["clip"], self.clip_name)
        dino = models["dino"]
        subject = refine.dino_encoder(dino, self.subject_name) if dino is not None else clip
        subjects = [
            refine.SubjectTarget(subject, anchor.to(device), [refine.box_of(m) for m in masks.masks[:, c]])
            for c, anchor in enumerate(self.subject_anchors)
            if anchor is not None and c < masks.masks.shape[1]
        ]
        style = self.style_anchor.to(device) if self.style_anchor is not None else None
        targets = refine.Targets(clip if style is not None else None, style, subjects)
        self._targets_for = (masks, targets)
        return targets

    def close(self) -> None:
        """Free this session's device copies (the loaded encoders stay on the CPU for the next run)."""
        self._device = None
        self._targets_for = None

    def report(self, steps: int) -> str:
        """One sentence on what ran, for the image's notes."""
        if self.failed:
            return self.failed
        if not self.losses:
            if not self.masks_seen:
                return "latent refinement did not run: it needs the subject masks, and none were found"
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
