"""The FreeFuse script in everyday Forge workflows, driven in Forge's own callback order (modules/processing.py):
hires fix, batches of several iterations, LoRAs Forge did not apply, messages for API clients.

Runs against either harness's backend, with the webui side faked (tests/forge_common/fake_webui.py).
"""

from __future__ import annotations

import types

import pytest
import torch

from freefuse.forge import session as sessions
from tests.forge_common import script_behaviour
from tests.forge_common.fake_webui import Processing, T5Engine
from tests.forge_common.script_behaviour import N_TXT, ON, PROMPT, entry, recorded_settings, subjects_line

webui, model = script_behaviour.webui, script_behaviour.model  # the fixtures

SUBJECT_LAYER = "diffusion_model.double_blocks.0.img_attn.qkv.weight"


class Job:
    """One txt2img job through the script, batch by batch, with Forge's hires call order when asked."""

    def __init__(self, harness, webui, args, *, prompt=PROMPT, steps=4, n_iter=1, api=False):
        self.harness, self.args, self.steps = harness, args, steps
        self.script = webui.module.FreeFuseScript()
        self.script.ui(False)
        self.p = None
        self.prompt, self.n_iter, self.api = prompt, n_iter, api
        self.hires_seen: list[dict] = []

    def start(self, unet, prompts_per_batch=None):
        p = Processing(self.prompt, unet, steps=self.steps, engine=T5Engine(min_length=N_TXT), api=self.api)
        batches = prompts_per_batch or [self.prompt] * self.n_iter
        p.all_prompts = list(batches)  # batch size 1: one image per batch
        p.n_iter = len(batches)
        self.p = p
        self.script.process(p, *self.args)
        return p

    def batch(self, n, unet, *, hires_unet=None, hires_size=None):
        """Batch ``n``: the first pass on ``unet``, then (hires_size) Forge's sample_hr_pass."""
        p = self.p
        p.iteration = n
        p.prompt = p.all_prompts[n]
        p.prompts = [_strip_tags(p.all_prompts[n])]
        p.is_hr_pass = False

        def first_pass(unet_, sigmas, x, cond, uncond):
            p._sigmas = sigmas
            p.sd_model.forge_objects.unet = unet_  # forge_objects_after_applying_lora.shallow_copy()
            self.script.process_before_every_sampling(p, *self.args, x=x, noise=x, c=cond, uc=uncond)
            return p.sd_model.forge_objects.unet

        self.harness.sample(unet, before_sampling=first_pass, steps=self.steps, n_txt=N_TXT, seed=21 + n)
        active = sessions.active()
        self.first_pass_masks = active.masks if active is not None else None
        if hires_size is not None:
            self._hires(hires_unet or unet, hires_size)
        images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(n))
        self.script.postprocess_batch(p, *self.args, images=images, batch_number=n)

    def _hires(self, after_lora, size):
        """processing.py sample_hr_pass: is_hr_pass, process_before_every_sampling on the model as the first
        pass left it, forge_objects reset from forge_objects_after_applying_lora, process_before_every_sampling
        again, then img2img sampling at the hires size."""
        p = self.p
        p.is_hr_pass = True
        p.hr_prompts = list(p.prompts)

        def hires_pass(unet_, sigmas, x, cond, uncond):
            p._sigmas = sigmas
            self.script.process_before_every_sampling(p, *self.args, x=x, noise=x, c=cond, uc=uncond)
            p.sd_model.forge_objects.unet = unet_
            self.script.process_before_every_sampling(p, *self.args, x=x, noise=x, c=cond, uc=uncond)
            return p.sd_model.forge_objects.unet

        def on_step(i):
            session = sessions.active()
            self.hires_seen.append(
                {
                    "session": session,
                    "weight": self.harness.merged_weight(after_lora, SUBJECT_LAYER) if session else None,
                }
            )

        height, width = size
        n_txt = N_TXT if self.harness.model_kind(after_lora) == "flux" else 77  # SDXL: whole CLIP chunks
        self.harness.sample(
            after_lora, before_sampling=hires_pass, steps=self.steps, height=height, width=width, n_txt=n_txt,
            seed=31, on_step=on_step,
        )  # fmt: skip
        p.is_hr_pass = False

    def finish(self):
        self.processed = processed_like_forge(self.p)
        self.script.postprocess(self.p, self.processed, *self.args)
        return self.p


def processed_like_forge(p):
    """The Processed object postprocess gets: the job's images and the infotext dict (shared with p)."""
    return types.SimpleNamespace(
        images=[object()] * len(p.all_prompts), extra_generation_params=p.extra_generation_params
    )


def _strip_tags(prompt: str) -> str:
    import re

    return re.sub(r"<lora:[^>]*>", "", prompt).strip()


def comments(p) -> str:
    return " ".join(p.comments)


# ---------------------------------------------------------------------- hires fix
def test_hires_fix_in_forges_call_order_runs_freefuse_with_the_first_pass_masks(harness, webui, model):
    unet, both, loras = model
    harness.sample(unet, steps=1)
    plain_weight = harness.merged_weight(unet, SUBJECT_LAYER)  # the layer without any LoRA
    job = Job(harness, webui, [ON])
    job.start(both)
    job.batch(0, both, hires_size=(96, 128))
    p = job.finish()
    assert not p.comments, p.comments
    first_pass_masks = job.first_pass_masks
    assert first_pass_masks is not None
    sessions_in_hires = {id(s["session"]) for s in job.hires_seen}
    assert len(job.hires_seen) == job.steps and len(sessions_in_hires) == 1 and None not in sessions_in_hires
    hires_session = job.hires_seen[0]["session"]
    assert hires_session.masks is first_pass_masks and hires_session.phase1_done  # reused: no capture in hires
    for seen in job.hires_seen:  # the subject LoRAs ran masked at runtime, out of Forge's merge
        torch.testing.assert_close(seen["weight"], plain_weight, rtol=0, atol=0)
    assert len(p.extra_result_images) == 1
    assert subjects_line(p).startswith("A: harry_potter ") and recorded_settings(p) is not None
    assert sessions.active() is None


def test_hires_on_a_checkpoint_of_another_family_says_so_and_samples_without_freefuse(harness, webui, model):
    unet, both, loras = model
    sdxl = harness.make_sdxl_unet(seed=3)
    job = Job(harness, webui, [ON])
    job.start(both)
    job.batch(0, both, hires_unet=sdxl, hires_size=(64, 64))
    p = job.finish()
    assert "the hires checkpoint is sdxl, the first pass was flux" in comments(p)
    assert all(seen["session"] is None for seen in job.hires_seen)
    assert len(p.extra_result_images) == 1  # the first pass's masks are still shown
    assert sessions.active() is None


# ---------------------------------------------------------------------- infotext per image
def test_infotext_records_freefuse_only_for_the_images_it_patched_and_the_grid_takes_the_first(harness, webui, model):
    unet, both, loras = model
    alone = "<lora:A:1> <lora:B:1> photo of harry_potter alone"
    job = Job(harness, webui, [ON])
    job.start(both, prompts_per_batch=[PROMPT, alone])
    job.batch(0, both)
    job.batch(1, both)
    p = job.finish()
    batch_prompts = ["batch 1's prompts"]  # create_infotext in the batch loop: batch-local index, batch prompts
    assert entry(p, "FreeFuse", 0, all_prompts=batch_prompts) is None  # image 2 (batch 1): FreeFuse did not run
    assert entry(p, "FreeFuse subjects", 0, all_prompts=batch_prompts) is None
    assert recorded_settings(p, 0) is not None and subjects_line(p, 0).startswith("A: harry_potter")
    assert recorded_settings(p, 1) is None and subjects_line(p, 1) is None  # Processed.infotext(p, 1)
    grid = entry(p, "FreeFuse subjects", 0, all_prompts=batch_prompts, use_main_prompt=True)
    assert grid == subjects_line(p, 0)  # the grid describes the job's first image, not the last batch's
    assert "at least two subject LoRAs" in entry(p, "FreeFuse notes")


def test_settings_freefuse_could_not_use_leave_no_freefuse_entry_and_a_note_for_api_clients(harness, webui, model):
    unet, both, loras = model
    job = Job(harness, webui, [{"enabled": True, "capture_block": 7, "tempurature": 2}], api=True)
    job.start(both)
    job.batch(0, both)
    p = job.finish()
    assert "FreeFuse" not in p.extra_generation_params or recorded_settings(p) is None
    notes = entry(p, "FreeFuse notes")
    assert notes.startswith("not used for this generation: unknown setting 'tempurature'")
    assert f"FreeFuse: {notes}" in p.comments  # the same words in the web UI's Comments


def test_a_message_from_sampling_reaches_the_notes_entry(harness, webui, model):
    unet, both, loras = model
    job = Job(harness, webui, [{**ON, "capture_block": 7}], api=True)  # the tiny model has double blocks 0-2
    job.start(both)
    job.batch(0, both)
    p = job.finish()
    notes = entry(p, "FreeFuse notes")
    assert "capture_block 7 does not exist" in notes and notes.startswith("not applied to this image")
    assert recorded_settings(p) is None


# ---------------------------------------------------------------------- LoRAs Forge did not apply
def test_a_subject_lora_forge_gave_no_denoiser_weights_is_left_out_and_the_others_run(harness, webui, model):
    unet, both, loras = model
    webui.load_lora("C", "C.safetensors", activation_text="cat")  # loaded, but no patch on this model's denoiser
    prompt = "<lora:A:1> <lora:B:1> <lora:C:1> photo of harry_potter and daiyu_lin hugging a cat"
    job = Job(harness, webui, [ON], prompt=prompt)
    job.start(both)
    job.batch(0, both)
    p = job.finish()
    assert "LoRA 'C' is not a subject: Forge applied none of its weights" in comments(p)
    line = subjects_line(p)
    assert line.startswith("A: harry_potter ") and ", B: daiyu_lin " in line and "C:" not in line
    assert len(p.extra_result_images) == 1


def test_with_only_one_usable_subject_left_freefuse_steps_aside_and_says_why(harness, webui, model):
    unet, both, loras = model
    only_a = harness.add_loras(unet, [(loras["A"], 1.0)])  # B was rejected by Forge for this model
    job = Job(harness, webui, [ON])
    job.start(only_a)
    job.batch(0, only_a)
    p = job.finish()
    assert "LoRA 'B' is not a subject" in comments(p) and "found 1" in comments(p)
    assert recorded_settings(p) is None and p.extra_result_images == []


# ---------------------------------------------------------------------- a failed generation, then any other
def _denoiser_params(unet, step):
    """modules.script_callbacks.CFGDenoiserParams as CFGDenoiser.forward passes it (the fields FreeFuse reads)."""
    sd_model = types.SimpleNamespace(forge_objects=types.SimpleNamespace(unet=unet))
    denoiser = types.SimpleNamespace(inner_model=types.SimpleNamespace(inner_model=sd_model), step=step)
    return types.SimpleNamespace(denoiser=denoiser, sampling_step=step)


def test_the_step_callback_closes_what_a_failed_generation_left_before_another_tabs_model_runs(harness, webui, model):
    unet, both, loras = model
    attention = harness.flux_module.attention
    job = Job(harness, webui, [ON])
    p = job.start(both)

    def first_pass(unet_, sigmas, x, cond, uncond):
        p._sigmas = sigmas
        p.sd_model.forge_objects.unet = unet_
        job.script.process_before_every_sampling(p, ON)
        return p.sd_model.forge_objects.unet

    with pytest.raises(RuntimeError, match="interrupted"):  # Forge then reaches no postprocess callback
        harness.sample(both, before_sampling=first_pass, steps=4, n_txt=N_TXT, raise_at_step=2)
    left_open = sessions.active()
    assert left_open is not None and harness.flux_module.attention is not attention
    other = harness.make_flux_unet(seed=9)  # img2img, say, on another checkpoint: FreeFuse's script is not called
    for callback in webui.callbacks["cfg_denoiser"]:
        callback(_denoiser_params(other, 0))
    assert sessions.active() is None and harness.flux_module.attention is attention


# ---------------------------------------------------------------------- the mask picture beside the saved image
def _save_like_forge(webui, job, p, folder):
    """processing.py's per-image loop: postprocess_image_after_composite, then images.save_image, whose
    image_saved callbacks get the file name; then a grid, saved the same way."""
    from PIL import Image

    saved = []
    for index in range(len(p.all_prompts)):
        pp = types.SimpleNamespace(image=Image.new("RGB", (64, 64)), index=index)
        job.script.postprocess_image_after_composite(p, pp, ON)
        filename = str(folder / f"0000{index}-{21 + index}.png")
        pp.image.save(filename)
        for callback in webui.callbacks["image_saved"]:
            callback(types.SimpleNamespace(image=pp.image, p=p, filename=filename, pnginfo={}))
        saved.append(filename)
    grid = folder / "grid-0000.png"
    for callback in webui.callbacks["image_saved"]:
        callback(types.SimpleNamespace(image=Image.new("RGB", (8, 8)), p=p, filename=str(grid), pnginfo={}))
    return saved


def test_the_mask_picture_is_saved_beside_each_saved_image_when_asked(harness, webui, model, tmp_path):
    unet, both, loras = model
    job = Job(harness, webui, [{**ON, "save_mask_picture": True}], n_iter=2)
    p = job.start(both)
    job.batch(0, both)
    job.batch(1, both)
    saved = _save_like_forge(webui, job, p, tmp_path)  # the images are saved before postprocess
    job.finish()
    for index, filename in enumerate(saved):
        beside = tmp_path / filename.replace(".png", "-freefuse-masks.png").split("/")[-1]
        assert beside.is_file()
        assert beside.read_bytes() == _png_bytes(p.extra_result_images[index])
    assert sorted(f.name for f in tmp_path.iterdir() if "freefuse" in f.name) == [
        "00000-21-freefuse-masks.png",
        "00001-22-freefuse-masks.png",
    ]  # nothing beside the grid


def test_without_the_option_nothing_is_saved_beside_the_images(harness, webui, model, tmp_path):
    unet, both, loras = model
    job = Job(harness, webui, [ON])
    p = job.start(both)
    job.batch(0, both)
    _save_like_forge(webui, job, p, tmp_path)
    job.finish()
    assert not [f for f in tmp_path.iterdir() if "freefuse" in f.name]
    assert len(p.extra_result_images) == 1  # still shown in the gallery


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- what a generation leaves behind
def test_an_xyz_cell_without_freefuse_carries_no_freefuse_entry_from_the_cell_before(harness, webui, model):
    """Forge's XYZ grid runs each cell on copy(p): the cells share one extra_generation_params dict."""
    import copy

    unet, both, loras = model
    job = Job(harness, webui, [{**ON, "capture_block": 7}], api=True)  # a cell that leaves a note
    p = job.start(both)
    job.batch(0, both)
    job.finish()
    assert entry(p, "FreeFuse notes") and "FreeFuse" in p.extra_generation_params
    off_cell = copy.copy(p)
    job.script.process(off_cell, {"enabled": False})
    for key in ("FreeFuse", "FreeFuse subjects", "FreeFuse notes"):
        assert key not in off_cell.extra_generation_params, key
    assert "FreeFuse notes" in p.extra_generation_params  # the earlier cell keeps its own


def test_a_message_is_said_once_even_when_it_holds_the_notes_separator(webui):
    from freefuse.forge.generation import start, tell

    p = Processing(PROMPT, None)
    start(p)
    for _ in range(2):
        tell(p, "phrase 'a | b' is not in the prompt")
    tell(p, "another")
    assert p.extra_generation_params["FreeFuse notes"] == "phrase 'a | b' is not in the prompt | another"
    assert len(p.comments) == 2


def test_nothing_of_a_batchs_model_outlives_it(harness, webui, model):
    unet, both, loras = model
    job = Job(harness, webui, [ON])
    job.start(both)
    job.batch(0, both)
    assert job.script.generation.first_pass is None  # postprocess_batch let go of the first pass's model
    job.finish()
    assert job.script.generation is None
