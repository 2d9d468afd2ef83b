"""Subjects of one Forge generation: the prompt's LoRAs, their trigger phrases, token positions on T5.

Reads Forge state (the LoRA extension's ``networks`` module, user metadata, the T5 text engine); the decisions
themselves live in ``freefuse.subjects`` and ``freefuse.tokens``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from freefuse.settings import FreeFuseSettings
from freefuse.subjects import LoraCandidate, SubjectPlan, resolve_subjects
from freefuse.tokens import locate_phrase

_LORA_TAG = re.compile(r"<lora:([^:>]+)[^>]*>", re.IGNORECASE)


@dataclass
class PromptTokens:
    """The cond prompt as T5 saw it: content pieces (position i = text position i) and sequence length."""

    pieces: list[str]
    n_txt: int  # length of the text sequence the model attends to (content + EOS + padding)
    eos_position: int


def prompt_problem(prompt: str, steps: int) -> str | None:
    """A user-facing reason FreeFuse cannot work with this prompt's syntax, or None."""
    from modules import prompt_parser

    if len(prompt_parser.get_multicond_prompt_list([prompt])[0][0]) > 1:
        return "the prompt uses AND (several sub-prompts); FreeFuse needs one prompt"
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], steps)[0]
    if len(schedules) > 1:
        return "the prompt uses [from:to:when] or [a|b] scheduling; FreeFuse needs one fixed prompt"
    if re.search(r"\bBREAK\b", prompt):
        return "the prompt uses BREAK, which FLUX's T5 encoder in Forge does not support with FreeFuse"
    return None


def t5_tokens(sd_model, prompt: str) -> PromptTokens:
    """T5 pieces of ``prompt`` exactly as Forge's T5 engine tokenises it (emphasis syntax removed)."""
    engine = sd_model.text_processing_engine_t5
    chunks, _ = engine.tokenize_line(prompt)
    ids = list(chunks[0].tokens)
    content = ids[: ids.index(engine.id_end)] if engine.id_end in ids else ids
    pieces = engine.tokenizer.convert_ids_to_tokens(content)
    return PromptTokens(pieces=list(pieces), n_txt=len(ids), eos_position=len(content))


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
        match = locate_phrase(tokens.pieces, settings.background)
        if match.found:
            return list(match.positions)
        messages.append(f"background phrase {settings.background!r} is not in the prompt; ignored")
    if settings.eos_background and tokens.eos_position < tokens.n_txt:
        return [tokens.eos_position]
    return None


def resolve(settings: FreeFuseSettings, tokens: PromptTokens, candidates: list[LoraCandidate]) -> SubjectPlan:
    return resolve_subjects(candidates, settings.subjects, lambda phrase: locate_phrase(tokens.pieces, phrase))
