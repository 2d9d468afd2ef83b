"""A stand-in for the webui side of Forge that scripts/freefuse.py touches (not the backend).

Mirrors, from Forge's source: ``modules.scripts`` (Script, AlwaysVisible, scripts_data), ``script_callbacks``
(on_before_ui, on_script_unloaded), ``modules.ui_components.InputAccordion``, ``modules.prompt_parser`` (AND
split and prompt schedules: the two functions FreeFuse calls, simplified to what decides "one fixed prompt"),
``modules.extra_networks.get_user_metadata``, the LoRA extension's ``networks.loaded_networks``, a gradio
that records components, and a txt2img processing object with the attributes FreeFuse reads. The T5 engine's
``tokenize_line`` follows backend/text_processing/t5_engine.py: segment tokens, EOS (id 1), pad (id 0) to 256.
"""

from __future__ import annotations

import re
import sys
import tempfile
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


# ---------------------------------------------------------------------- gradio
class Component:
    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.value = kwargs.get("value")
        self.events: list[tuple[str, object, list, list]] = []  # (event, fn, inputs, outputs)

    def _listen(self, event, fn, inputs=None, outputs=None, **kwargs):
        self.events.append((event, fn, list(inputs or []), list(outputs or [])))

    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        self._listen("change", fn, inputs, outputs)

    def input(self, fn=None, inputs=None, outputs=None, **kwargs):
        self._listen("input", fn, inputs, outputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    for name in (
        "Textbox",
        "Radio",
        "Checkbox",
        "Slider",
        "Number",
        "Dropdown",
        "Markdown",
        "Row",
        "Column",
        "Accordion",
        "ImageEditor",
        "Image",
        "File",
        "Brush",
    ):
        setattr(gr, name, type(name, (Component,), {}))
    gr.update = lambda **kw: {"__type__": "update", **kw}
    return gr


# ---------------------------------------------------------------------- modules.*
def _modules(state) -> dict[str, types.ModuleType]:
    modules = types.ModuleType("modules")
    modules.__path__ = []

    scripts = types.ModuleType("modules.scripts")

    class Script:
        on_after_component_elem_id = None

        def elem_id(self, item):
            return f"script_txt2img_freefuse_{item}"

        def on_after_component(self, callback, *, elem_id):
            self.on_after_component_elem_id = [*(self.on_after_component_elem_id or []), (elem_id, callback)]

    scripts.Script = Script
    scripts.AlwaysVisible = object()
    scripts.scripts_data = state.scripts_data

    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.on_before_ui = lambda fn: state.callbacks.setdefault("before_ui", []).append(fn)
    callbacks.on_script_unloaded = lambda fn: state.callbacks.setdefault("script_unloaded", []).append(fn)
    callbacks.on_cfg_denoiser = lambda fn: state.callbacks.setdefault("cfg_denoiser", []).append(fn)
    callbacks.on_image_saved = lambda fn: state.callbacks.setdefault("image_saved", []).append(fn)

    shared = types.ModuleType("modules.shared")
    shared.opts = state.opts

    ui_components = types.ModuleType("modules.ui_components")

    class InputAccordion(Component):
        def __init__(self, value, **kwargs):
            super().__init__(value=value, **kwargs)

    ui_components.InputAccordion = InputAccordion

    prompt_parser = types.ModuleType("modules.prompt_parser")

    def get_multicond_prompt_list(prompts):
        return [[(i, 1.0) for i, _ in enumerate(re.split(r"\bAND\b", p))] for p in prompts], [], {}

    def get_learned_conditioning_prompt_schedules(prompts, steps, *args, **kwargs):
        scheduled = re.compile(r"\[[^\[\]]*(:[^\[\]]*:|\|)[^\[\]]*\]")
        return [[[steps, p]] if not scheduled.search(p) else [[steps // 2, p], [steps, p]] for p in prompts]

    prompt_parser.get_multicond_prompt_list = get_multicond_prompt_list
    prompt_parser.get_learned_conditioning_prompt_schedules = get_learned_conditioning_prompt_schedules

    extra_networks = types.ModuleType("modules.extra_networks")
    extra_networks.get_user_metadata = lambda filename, lister=None: dict(state.user_metadata.get(filename, {}))
    extra_networks.parse_prompt = lambda prompt: (re.sub(r"<(\w+):([^>]+)>", "", prompt), {})

    networks = types.ModuleType("networks")
    networks.loaded_networks = state.loaded_networks
    networks.available_networks = state.available_networks
    networks.available_network_aliases = state.available_networks  # by name and alias, as Forge fills it
    networks.forbidden_network_aliases = {}

    samplers_common = types.ModuleType("modules.sd_samplers_common")

    def setup_img2img_steps(p, steps=None):  # as modules/sd_samplers_common.py
        if getattr(state.opts, "img2img_fix_steps", False) or steps is not None:
            requested = steps or p.steps
            steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
            return steps, requested - 1
        return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)

    samplers_common.setup_img2img_steps = setup_img2img_steps

    sd_models = types.ModuleType("modules.sd_models")
    sd_models.model_data = state.model_data

    paths = types.ModuleType("modules.paths")  # where the user's models are (refinement's CLIP / DINO)
    paths.models_path = state.models_path
    state.paths = paths

    modules.scripts, modules.script_callbacks, modules.ui_components = scripts, callbacks, ui_components
    modules.prompt_parser, modules.extra_networks, modules.shared = prompt_parser, extra_networks, shared
    modules.sd_models, modules.sd_samplers_common, modules.paths = sd_models, samplers_common, paths
    return {
        "modules.paths": paths,
        "modules.sd_samplers_common": samplers_common,
        "modules.shared": shared,
        "modules.sd_models": sd_models,
        "gradio": _gradio(),
        "modules": modules,
        "modules.scripts": scripts,
        "modules.script_callbacks": callbacks,
        "modules.ui_components": ui_components,
        "modules.prompt_parser": prompt_parser,
        "modules.extra_networks": extra_networks,
        "networks": networks,
    }


@dataclass
class WebuiState:
    scripts_data: list = field(default_factory=list)
    callbacks: dict = field(default_factory=dict)
    loaded_networks: list = field(default_factory=list)
    user_metadata: dict = field(default_factory=dict)
    opts: types.SimpleNamespace = field(default_factory=lambda: types.SimpleNamespace(forge_preset="flux"))
    available_networks: dict = field(default_factory=dict)  # the LoRA folder, as networks lists it
    model_data: types.SimpleNamespace = field(default_factory=lambda: types.SimpleNamespace(sd_model=None))
    models_path: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="freefuse-models-"))
    paths: types.ModuleType | None = None

    def load_lora(self, name: str, filename: str, metadata: dict | None = None, activation_text: str = ""):
        """What networks.load_networks leaves behind for one <lora:name:w> tag (the file is also on disk)."""
        on_disk = self.put_lora(name, filename, metadata, activation_text)
        self.loaded_networks.append(types.SimpleNamespace(name=name, mentioned_name=name, network_on_disk=on_disk))

    def put_lora(self, name: str, filename: str, metadata: dict | None = None, activation_text: str = ""):
        """A LoRA file in the LoRA folder, as networks.list_available_networks lists it."""
        on_disk = types.SimpleNamespace(filename=filename, name=name, alias=name, metadata=metadata or {})
        self.available_networks[name] = on_disk
        if activation_text:
            self.user_metadata[filename] = {"activation text": activation_text}
        return on_disk


@contextmanager
def installed_webui():
    """Put the fake webui modules into sys.modules (and the script module), restoring everything after."""
    state = WebuiState()
    fakes = _modules(state)
    saved = {name: sys.modules.get(name) for name in [*fakes, "freefuse_script"]}
    sys.modules.update(fakes)
    try:
        yield state
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# ---------------------------------------------------------------------- T5 engine and processing object
class ToyT5Tokenizer:
    """SentencePiece-shaped pieces: '▁word' per word, '_' split out ("harry_potter" -> ▁harry _ potter)."""

    def __init__(self):
        self.vocab: dict[str, int] = {"<pad>": 0, "</s>": 1}

    def _id(self, piece):
        return self.vocab.setdefault(piece, len(self.vocab))

    def __call__(self, texts, add_special_tokens=False, **kwargs):
        out = []
        for text in texts:
            ids = []
            for word in text.split():
                parts = [p for p in re.split(r"(_|,)", word) if p]
                ids += [self._id(("▁" if i == 0 else "") + part) for i, part in enumerate(parts)]
            out.append(ids)
        return {"input_ids": out}

    def convert_ids_to_tokens(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return [inverse[i] for i in ids]


class T5Engine:
    """tokenize_line as backend/text_processing/t5_engine.py: emphasis removed, EOS, padded to min_length."""

    id_end, id_pad = 1, 0

    def __init__(self, tokenizer=None, min_length=8):
        self.tokenizer = tokenizer or ToyT5Tokenizer()
        self.min_length = min_length

    def tokenize_line(self, line):
        text = re.sub(r"\(([^():]*)(:[\d.]+)?\)", r"\1", line)  # "(word:1.2)" -> "word"
        ids = self.tokenizer([text], add_special_tokens=False)["input_ids"][0] + [self.id_end]
        ids += [self.id_pad] * max(0, self.min_length - len(ids))
        return [types.SimpleNamespace(tokens=ids, multipliers=[1.0] * len(ids))], len(ids)


class ToyClipTokenizer(ToyT5Tokenizer):
    """CLIP-BPE-shaped pieces: 'word</w>' per word, '_' and ',' split out as their own words."""

    def __init__(self):
        self.vocab = {"!": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}

    def __call__(self, texts, add_special_tokens=False, **kwargs):
        out = []
        for text in texts:
            words = [w for part in text.lower().split() for w in re.split(r"(_|,)", part) if w]
            out.append(
                [self._id(word + "</w>") if word not in ("_", ",") else self._id(word + "</w>") for word in words]
            )
        return {"input_ids": out}


class ClipEngine:
    """tokenize_line as backend/text_processing/classic_engine.py: 75-token chunks as [BOS, 75, EOS]."""

    id_start, id_end, id_pad = 1, 2, 2

    def __init__(self):
        self.tokenizer = ToyClipTokenizer()

    def tokenize_line(self, line):
        text = re.sub(r"\(([^():]*)(:[\d.]+)?\)", r"\1", line)
        chunks, ids = [], []
        for segment in re.split(r"\bBREAK\b", text):
            ids = self.tokenizer([segment])["input_ids"][0]
            for start in range(0, max(len(ids), 1), 75):
                body = ids[start : start + 75]
                tokens = [self.id_start] + body + [self.id_end] * (76 - len(body))
                chunks.append(types.SimpleNamespace(tokens=tokens, multipliers=[1.0] * 77))
        return chunks, sum(len(c.tokens) for c in chunks)


class Processing:
    """The attributes of StableDiffusionProcessingTxt2Img that FreeFuse reads or writes."""

    def __init__(
        self,
        prompt_with_tags: str,
        unet,
        *,
        steps=4,
        batch_size=1,
        engine=None,
        sigmas=None,
        api=False,
        size=(64, 64),
        vae=None,
    ):
        self.prompt = prompt_with_tags
        self.is_api = api  # Forge sets it for /sdapi/v1 requests
        clean = re.sub(r"<lora:[^>]*>", "", prompt_with_tags).strip()
        self.prompts = [clean] * batch_size  # Forge strips the tags from p.prompts only
        self.all_prompts = [prompt_with_tags] * batch_size
        self.steps, self.batch_size, self.iteration = steps, batch_size, 0
        self.is_hr_pass = False
        self.height, self.width = size
        self.denoising_strength, self.hr_second_pass_steps = 0.7, 0  # the hires pass's (img2img: the image's)
        self.extra_generation_params: dict = {}
        self.extra_result_images: list = []
        self.comments: dict = {}
        self.sd_model = types.SimpleNamespace(
            forge_objects=types.SimpleNamespace(unet=unet, vae=vae),
            text_processing_engine_t5=engine or T5Engine(),
            text_processing_engine_l=ClipEngine(),
        )
        self._sigmas = sigmas  # a fixed schedule, or None: linear in ``steps``
        self.sampler = types.SimpleNamespace(get_sigmas=self._get_sigmas)

    def _get_sigmas(self, p, steps):
        return self._sigmas if self._sigmas is not None else torch.linspace(1.0, 0.0, steps + 1)

    def comment(self, text):
        self.comments[text] = 1
