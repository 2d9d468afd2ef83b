"""Latent refinement inside Forge, on FLUX and SDXL: it corrects the steps of its window from tiny random CLIP /
DINOv2 models found on "disk", changes only the latent, says what ran, and every missing piece is one message
with the image still generated. Runs against either harness's backend (tests/forge_common/)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from freefuse.forge import refinement as forge_refinement
from freefuse.forge import session as sessions
from tests.forge_common import script_behaviour
from tests.forge_common.script_behaviour import ON, generate
from tests.tiny.encoders import save_clip_folder, save_dino_folder, tiny_vae

webui, model, sdxl_model = script_behaviour.webui, script_behaviour.model, script_behaviour.sdxl_model  # fixtures
FLUX_LATENT = 16


def _png(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def on_disk(webui, tmp_path):
    """A models folder with a CLIP vision folder in models/clip_vision and a DINOv2 folder in models/."""
    models = tmp_path / "models"
    save_clip_folder(models / "clip_vision" / "tiny-clip")
    save_dino_folder(models / "dinov2-tiny")
    webui.paths.models_path = str(models)
    forge_refinement._loaded.clear()
    forge_refinement._unloadable.clear()
    yield models
    forge_refinement._loaded.clear()
    forge_refinement._unloadable.clear()


REFINE = {**ON, "refine": True, "refine_strength": 0.05}
REFS = {"style_reference": _png(1), "subject_references": {"A": [_png(2), _png(3)]}}


def _notes(p):
    return [c for c in p.comments if "refinement" in c]


def test_refinement_corrects_the_steps_of_its_window_and_says_what_ran(harness, webui, model, on_disk):
    unet, both, _ = model
    vae = tiny_vae(FLUX_LATENT)
    weights = [t.clone() for t in vae.first_stage_model.state_dict().values()]
    plain = generate(harness, webui, both, [ON], vae=vae)
    refined = generate(harness, webui, both, [{**REFINE, **REFS}], vae=vae)
    assert not torch.equal(refined.latent, plain.latent)
    (note,) = _notes(refined)
    assert note.startswith(
        "FreeFuse: latent refinement ran at 3 of 4 steps (style by CLIP tiny-clip; A by DINO dinov2-tiny); loss "
    ), note
    assert all(torch.equal(a, b) for a, b in zip(weights, vae.first_stage_model.state_dict().values(), strict=True))
    assert all(p.grad is None for p in vae.first_stage_model.parameters())
    assert sessions.active() is None
    assert set(forge_refinement._loaded) == {"clip", "dino"}
    for _, kept in forge_refinement._loaded.values():  # the encoders stay loaded, untouched, on the CPU
        for w in kept.parameters():
            assert w.device.type == "cpu" and w.dtype == torch.float32 and w.grad is None and not w.requires_grad
            assert not w.is_inference()
    after = generate(harness, webui, both, [ON], vae=vae)
    assert torch.equal(after.latent, plain.latent)  # nothing of the refinement stays behind


def test_zero_strength_is_freefuse_alone_bit_for_bit(harness, webui, model, on_disk):
    unet, both, _ = model
    vae = tiny_vae(FLUX_LATENT)
    plain = generate(harness, webui, both, [ON], vae=vae)
    zero = generate(harness, webui, both, [{**REFINE, "refine_strength": 0.0, **REFS}], vae=vae)
    assert torch.equal(zero.latent, plain.latent)


def test_a_window_of_the_last_step_only_corrects_one_step(harness, webui, model, on_disk):
    unet, both, _ = model
    p = generate(
        harness, webui, both, [{**REFINE, "refine_start": 0.75, "refine_end": 1.0, **REFS}], vae=tiny_vae(16)
    )  # fmt: skip
    assert _notes(p)[0].startswith("FreeFuse: latent refinement ran at 1 of 4 steps"), p.comments


def test_without_dino_the_subjects_are_scored_by_clip(harness, webui, model, on_disk):
    import shutil

    shutil.rmtree(on_disk / "dinov2-tiny")
    unet, both, _ = model
    p = generate(harness, webui, both, [{**REFINE, **REFS}], vae=tiny_vae(FLUX_LATENT))
    assert "A by CLIP tiny-clip (no DINOv2 found)" in _notes(p)[0], p.comments


def test_runs_when_forge_samples_in_inference_mode_and_casts_the_encoders(harness, webui, model, on_disk, monkeypatch):
    """On a GPU the encoders run in half precision: a cast made inside Forge's inference mode would give inference
    tensors, which cannot be backpropagated through. float64 here forces a real cast on the CPU."""
    unet, both, _ = model
    monkeypatch.setattr(forge_refinement, "compute_dtype", lambda device: torch.float64)
    with torch.inference_mode():
        p = generate(harness, webui, both, [{**REFINE, **REFS}], vae=tiny_vae(FLUX_LATENT))
    assert _notes(p)[0].startswith("FreeFuse: latent refinement ran at 3 of 4 steps"), p.comments
    for _, kept in forge_refinement._loaded.values():  # the loaded models were neither cast nor made inference
        assert all(w.dtype == torch.float32 and not w.is_inference() for w in kept.parameters())


def test_a_run_without_refinement_frees_the_loaded_models_and_says_unused_references(harness, webui, model, on_disk):
    unet, both, _ = model
    generate(harness, webui, both, [{**REFINE, **REFS}], vae=tiny_vae(FLUX_LATENT))
    assert forge_refinement._loaded
    p = generate(harness, webui, both, [{**ON, **REFS}], vae=tiny_vae(FLUX_LATENT))
    assert not forge_refinement._loaded
    assert [c for c in p.comments if "reference images were given but refine is off" in c], p.comments


def test_zero_weights_are_said_once_instead_of_a_run_that_did_nothing(harness, webui, model, on_disk):
    unet, both, _ = model
    p = generate(harness, webui, both, [{**REFINE, "refine_style_weight": 0, **REFS, "subject_references": None}],
                 vae=tiny_vae(FLUX_LATENT))  # fmt: skip
    assert _notes(p) == ["FreeFuse: latent refinement did not run: the weights of the given references are 0"]


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"style_reference": None, "subject_references": None}, "no reference image was given"),
        ({"refine_clip": "ViT-H"}, "did not run: CLIP vision model 'ViT-H' is not in"),
        ({"refine_dino": "dino-giant"}, "DINO model 'dino-giant' is not a DINOv2 folder"),
        ({"style_reference": "not an image"}, "style_reference is not an image"),
        ({"style_reference": "???", "subject_references": None}, "with no usable reference image, latent refinement"),
        ({"subject_references": {"Z": _png(4)}}, "subject_references names 'Z', which is not a subject LoRA"),
    ],
)
def test_each_missing_piece_is_one_message_and_the_image_is_generated(harness, webui, model, on_disk, change, said):
    unet, both, _ = model
    p = generate(harness, webui, both, [{**REFINE, **REFS, **change}], vae=tiny_vae(FLUX_LATENT))
    assert len([c for c in p.comments if said in c]) == 1, p.comments
    assert len(_notes(p)) == 1, p.comments  # one message for one bad input
    assert p.latent is not None and sessions.active() is None
    assert script_behaviour.subjects_line(p).startswith("A: harry_potter ")


def test_no_clip_model_on_disk_is_said_and_freefuse_still_runs(harness, webui, model, on_disk):
    import shutil

    shutil.rmtree(on_disk / "clip_vision")
    unet, both, _ = model
    vae = tiny_vae(FLUX_LATENT)
    p = generate(harness, webui, both, [{**REFINE, **REFS}], vae=vae)
    plain = generate(harness, webui, both, [ON], vae=vae)
    (note,) = _notes(p)
    assert "latent refinement did not run: it needs a CLIP vision model in" in note and "clip_vision" in note
    assert torch.equal(p.latent, plain.latent)


def test_a_model_without_a_vae_is_said(harness, webui, model, on_disk):
    unet, both, _ = model
    p = generate(harness, webui, both, [{**REFINE, **REFS}], vae=None)
    assert [c for c in p.comments if "needs the checkpoint's VAE" in c], p.comments


def test_refinement_on_sdxl(harness, webui, sdxl_model, on_disk):
    unet, both, _ = sdxl_model
    vae = tiny_vae(4)
    plain = generate(harness, webui, both, [ON], cfg=5.0, n_txt=77, vae=vae)
    p = generate(harness, webui, both, [{**REFINE, **REFS}], cfg=5.0, n_txt=77, vae=vae)
    assert _notes(p)[0].startswith("FreeFuse: latent refinement ran at 3 of 4 steps"), p.comments
    assert not torch.equal(p.latent, plain.latent)


def test_a_clip_file_that_does_not_load_is_said_and_the_next_one_is_used(harness, webui, model, on_disk):
    (on_disk / "clip_vision" / "clip-broken.safetensors").write_bytes(b"not weights")  # listed before tiny-clip
    unet, both, _ = model
    p = generate(harness, webui, both, [{**REFINE, **REFS}], vae=tiny_vae(FLUX_LATENT))
    assert [c for c in p.comments if c.startswith("FreeFuse: could not load clip-broken.safetensors")], p.comments
    assert [c for c in p.comments if "(style by CLIP tiny-clip; " in c], p.comments
    again = generate(harness, webui, both, [{**REFINE, **REFS}], vae=tiny_vae(FLUX_LATENT))  # not loaded again,
    assert [c for c in again.comments if c.startswith("FreeFuse: could not load clip-broken")]  # still said


def test_models_and_anchors_are_prepared_once_per_job_and_each_pass_starts_fresh(webui, on_disk, monkeypatch):
    import types

    from freefuse.forge.generation import Generation
    from freefuse.settings import FreeFuseSettings

    calls = []
    real = forge_refinement.prepare

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(forge_refinement, "prepare", counting)
    settings = FreeFuseSettings.from_dict({**REFINE, "refine": True})
    generation = Generation(settings, "flux", dict(REFS))
    p = types.SimpleNamespace(
        is_api=True, extra_generation_params={}, sd_model=types.SimpleNamespace(
            forge_objects=types.SimpleNamespace(vae=tiny_vae(FLUX_LATENT)))
    )  # fmt: skip
    first = generation._refinement(p, ["A", "B"])
    first.losses.append((1, 0.5))  # what a pass leaves behind
    second = generation._refinement(p, ["A", "B"])  # the next batch of the same job
    assert len(calls) == 1
    assert second is not first and second.losses == [] and second.clip is first.clip
    generation.finish()
    generation._refinement(p, ["A", "B"])  # a new job prepares again
    assert len(calls) == 2
