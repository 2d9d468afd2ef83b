"""Subjects of one Forge generation: the prompt's LoRAs, their trigger phrases, token positions on T5.

Reads Forge state (the LoRA extension's ``networks`` module, user metadata, the T5 text engine); the decisions
themselves live in ``freefuse.subjects`` and ``freefuse.tokens``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from freefuse.settings import FreeFuseSettings
from freefuse.subjects import LoraCandidate, SubjectPlan, resolve_subjects
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
    from modules import extra_networks

    candidates = []
    loaded_names = set()
    for net in networks.loaded_networks:
        on_disk = net.network_on_disk
        metadata = getattr(on_disk, "metadata", None) or {}
        user = extra_networks.get_user_metadata(on_disk.filename) or {}
        name = getattr(net, "mentioned_name", None) or net.name
        loaded_names.add(name)
        candidates.append(
            LoraCandidate(
                name=name,
                filename=on_disk.filename,
                activation_text=str(user.get("activation text", "") or ""),
                trigger_phrase=str(metadata.get("modelspec.trigger_phrase", "") or ""),
            )
        )
    messages = [
        f"LoRA {tag!r} in the prompt was not loaded by Forge (unknown name?); it is not a FreeFuse subject"
        for tag in dict.fromkeys(m.strip() for m in _LORA_TAG.findall(prompt_with_tags))
        if tag not in loaded_names
    ]
    return candidates, messages


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

    return resolve_subjects(candidates, settings.subjects, locate, unusable)
