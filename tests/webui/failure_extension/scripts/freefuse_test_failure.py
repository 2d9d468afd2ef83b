"""Test-only Forge extension (copied into the test copy's extensions/ by tests/webui/forge_copy.py).

AlwaysOn script "FreeFuse test failure", API args ``[raise_at_step]``: with a step >= 0 the generation
raises a RuntimeError inside sampling at that denoiser step, so the exception leaves ``process_images``
(the API answers HTTP 500), as a crash in a sampler, a model or another extension would. Exceptions raised
in script callbacks themselves are caught by Forge, so the error is raised from a ``sampler_pre_cfg_function``
added to a clone of the unet; model_options travel with later clones, so other scripts' clones keep it.
"""

import gradio as gr
from modules import script_callbacks, scripts

TITLE = "FreeFuse test failure"
_STEP = {"value": None}  # the denoiser step about to run (any generation)


def _track_step(params) -> None:
    _STEP["value"] = getattr(getattr(params, "denoiser", None), "step", None)


def _raise_at(step: int):
    def pre_cfg(model, cond, uncond, x, timestep, model_options):
        if _STEP["value"] == step:
            raise RuntimeError(f"{TITLE}: raised at sampling step {step} as asked")
        return model, cond, uncond, x, timestep, model_options

    return pre_cfg


class FreeFuseTestFailure(scripts.Script):
    sorting_priority = 0

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        with gr.Accordion(TITLE, open=False):
            raise_at_step = gr.Number(value=-1, precision=0, label="Raise at sampling step (-1: off)")
        return [raise_at_step]

    def process_before_every_sampling(self, p, raise_at_step=-1, *args, **kwargs):
        step = int(raise_at_step if raise_at_step is not None else -1)
        if step < 0:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        unet.add_sampler_pre_cfg_function(_raise_at(step))
        p.sd_model.forge_objects.unet = unet


script_callbacks.on_cfg_denoiser(_track_step)
