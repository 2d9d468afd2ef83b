"""Subjects of one Forge generation: the prompt's LoRAs, their trigger phrases, token positions on T5.

Reads Forge state (the LoRA extension's ``networks`` module, user metadata, the T5 text engine); the decisions
themselves live in ``freefuse.subjects`` and ``freefuse.tokens``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from freefuse.settings import FreeFuseSettings
from freefuse.subjects import LoraCandidate, SubjectPlan, parse_style_names, resolve_subjects
from freefuse.tokens import clip_content_pieces, locate_phrase

_LORA_TAG = re.compile(r"<lora:([^:>]+)[^>]*>", re.IGNORECASE)


@dataclass
class PromptTokens:
    """The cond prompt as the text encoder saw it: content pieces, their positions, the sequence length."""

    pieces: list[str]
    n_txt: int  # length of the text sequence the model attends to (content + EOS + padding)
    eos_position: int | None  # the first end-of-text token, when it can serve as a background channel
    positions: list[int] | None = None  # text position of each piece (None: piece i is at position i)


def prompt_problem(prompt: str, steps: int, family: str = "flux") -> str | None:
    """A user-facing reason FreeFuse cannot work with this prompt's syntax, or None."""
    from modules import prompt_parser

    if len(prompt_parser.get_multicond_prompt_list([prompt])[0][0]) > 1:
        return "the prompt uses AND (several sub-prompts); FreeFuse needs one prompt"
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)[0]
    if len(schedules) > 1:
        return "the prompt uses [from:to:when] or [a|b] scheduling; FreeFuse needs one fixed prompt"
    if family == "flux" and re.search(r"\bBREAK\b", prompt):
        return "the prompt uses BREAK, which FLUX's T5 encoder in Forge does not support with FreeFuse"
    return None


def t5_tokens(sd_model, prompt: str) -> PromptTokens:
    """T5 pieces of ``prompt`` exactly as Forge's T5 engine tokenises it (emphasis syntax removed)."""
    engine = sd_model.text_processing_engine_t5
    chunks, _ = engine.tokenize_line(prompt)
    ids = list(chunks[0].tokens)
    end = len(ids)
    while end > 0 and ids[end - 1] == engine.id_pad:
        end -= 1  # padding after the EOS that Forge appends
    content = ids[: end - 1] if end and ids[end - 1] == engine.id_end else ids[:end]  # a literal "</s>" stays
    pieces = engine.tokenizer.convert_ids_to_tokens(content)
    return PromptTokens(pieces=list(pieces), n_txt=len(ids), eos_position=len(content))


def clip_tokens(sd_model, prompt: str) -> PromptTokens:
    """CLIP pieces of ``prompt`` as Forge's classic engine chunks them: 77 per chunk, [BOS, 75, EOS].

    CLIP-L and CLIP-G chunk the same vocabulary the same way, so CLIP-L's positions hold for both.
    """
    engine = sd_model.text_processing_engine_l
    chunks, _ = engine.tokenize_line(prompt)
    convert = engine.tokenizer.convert_ids_to_tokens
    chunk_pieces = [convert(list(chunk.tokens)) for chunk in chunks]
    bos, eos = convert([engine.id_start])[0], convert([engine.id_end])[0]
    pieces, positions = clip_content_pieces(chunk_pieces, bos=bos, eos=eos)
    first_eos = chunk_pieces[0].index(eos, 1) if eos in chunk_pieces[0][1:] else None
    return PromptTokens(pieces=pieces, n_txt=77 * len(chunks), eos_position=first_eos, positions=positions)


def lora_candidates(prompt_with_tags: str) -> tuple[list[LoraCandidate], list[str]]:
    """The LoRAs Forge loaded for this batch, with their phrase sources; plus messages for missing ones."""
    import networks

    candidates = []
    for net in networks.loaded_networks:
        candidates.append(_candidate(getattr(net, "mentioned_name", None) or net.name, net.network_on_disk))
    return candidates, _not_loaded(prompt_with_tags, {c.name for c in candidates}, "was not loaded by Forge")


def lora_candidates_on_disk(prompt_with_tags: str) -> tuple[list[LoraCandidate], list[str]]:
    """The LoRAs the prompt's tags name, found as Forge's LoRA extension finds them, before it loads them
    (the live preview); plus messages for names Forge does not know."""
    import networks

    candidates = []
    for name in _tags(prompt_with_tags):
        if name.lower() in networks.forbidden_network_aliases:
            on_disk = networks.available_networks.get(name)
        else:
            on_disk = networks.available_network_aliases.get(name)
        if on_disk is not None:
            candidates.append(_candidate(name, on_disk))
    return candidates, _not_loaded(prompt_with_tags, {c.name for c in candidates}, "is not a LoRA Forge knows")


def _candidate(name: str, on_disk) -> LoraCandidate:
    from modules import extra_networks

    metadata = getattr(on_disk, "metadata", None) or {}
    user = extra_networks.get_user_metadata(on_disk.filename) or {}
    return LoraCandidate(
        name=name,
        filename=on_disk.filename,
        activation_text=str(user.get("activation text", "") or ""),
        trigger_phrase=str(metadata.get("modelspec.trigger_phrase", "") or ""),
    )


def _tags(prompt_with_tags: str) -> list[str]:
    return list(dict.fromkeys(m.strip() for m in _LORA_TAG.findall(prompt_with_tags)))


def _not_loaded(prompt_with_tags: str, found: set[str], why: str) -> list[str]:
    return [
        f"LoRA {tag!r} in the prompt {why} (unknown name?); it is not a FreeFuse subject"
        for tag in _tags(prompt_with_tags)
        if tag not in found
    ]


@dataclass
class Resolution:
    """What FreeFuse makes of one prompt on one model: the tokens, the subjects, the background channel."""

    tokens: PromptTokens | None = None
    plan: SubjectPlan | None = None
    background: list[int] | None = None
    messages: list[str] = field(default_factory=list)  # everything to tell the user, in order

    @property
    def active(self) -> bool:
        return self.plan is not None and self.plan.active


def resolve_prompt(
    settings: FreeFuseSettings,
    sd_model,
    family: str,
    prompt: str,
    steps: int,
    candidates: list[LoraCandidate],
    unusable: dict[str, str],
) -> Resolution:
    """The one resolution path of a generation and of the live preview: prompt syntax, the tokens the text
    encoder sees, the subjects and their phrases, the background channel. ``prompt`` is tag-free."""
    found = Resolution()
    problem = prompt_problem(prompt, steps, family)
    if problem:
        found.messages.append(f"{problem}; FreeFuse does not run for this image")
        return found
    found.tokens = t5_tokens(sd_model, prompt) if family == "flux" else clip_tokens(sd_model, prompt)
    found.plan = resolve(settings, found.tokens, candidates, unusable)
    found.messages += found.plan.messages
    if found.plan.active:
        found.background = background_positions(settings, found.tokens, found.messages)
    return found


def background_positions(settings: FreeFuseSettings, tokens: PromptTokens, messages: list[str]) -> list[int] | None:
    """Background channel tokens: the background phrase, else the first EOS (if enabled), else none."""
    if settings.background.strip():
        match = locate_phrase(tokens.pieces, settings.background, sequence_positions=tokens.positions)
        if match.found:
            return list(match.positions)
        messages.append(f"background phrase {settings.background!r} is not in the prompt; ignored")
    if settings.eos_background and tokens.eos_position is not None and tokens.eos_position < tokens.n_txt:
        return [tokens.eos_position]
    return None


def without_denoiser_weights(unet, candidates: list[LoraCandidate]) -> dict[str, str]:
    """filename -> reason, for the LoRAs that have no patch on this denoiser in Forge's ``lora_patches``.

    Forge skips a LoRA made for another model ("LoRA version mismatch") and gives a text-encoder-only LoRA no
    denoiser patch: FreeFuse cannot mask either, so they run as Forge runs them.
    """
    with_weights = {ident[0] for ident, patches in unet.lora_patches.items() if patches}
    return {
        c.filename: "Forge applied none of its weights to this model's denoiser (a LoRA made for another model, "
        "or one that only changes the text encoder)"
        for c in candidates
        if c.filename not in with_weights
    }


def resolve(
    settings: FreeFuseSettings, tokens: PromptTokens, candidates: list[LoraCandidate], unusable: dict[str, str]
) -> SubjectPlan:
    def locate(phrase):
        return locate_phrase(tokens.pieces, phrase, sequence_positions=tokens.positions)

    return resolve_subjects(candidates, settings.subjects, locate, unusable, parse_style_names(settings.style_loras))
