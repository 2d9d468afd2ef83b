"""Which LoRAs are subjects, and by which trigger phrase: pure decision logic with user-facing reasons.

Every ``<lora:...>`` in the prompt is a candidate. Its phrase comes from, in order: the user's Subjects box,
the LoRA's "activation text" (user metadata), the safetensors ``modelspec.trigger_phrase``, and the LoRA's
own name. The first phrase that occurs in the prompt makes the LoRA a subject; a LoRA with none stays global
(merged as usual). Once the Subjects box names any LoRA, a LoRA's own name no longer makes it a subject (a
style LoRA called "watercolor" in "watercolor painting of ..." stays global); with three or more subjects of
which some were found by name, a note says how to keep a LoRA global. A LoRA that Forge gave no
weights for this model's denoiser is never a subject, nor is a LoRA the user marked as a style. Fewer than
two subjects (or one subject without a style): FreeFuse does nothing, and says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from freefuse.tokens import PhraseMatch, overlapping_subjects


@dataclass(frozen=True)
class LoraCandidate:
    """A LoRA the prompt activates, with the phrases its files offer."""

    name: str  # as written in <lora:NAME:...>
    filename: str  # Forge's identifier of the loaded file
    activation_text: str = ""  # user metadata "activation text" (may hold several comma-separated tags)
    trigger_phrase: str = ""  # safetensors modelspec.trigger_phrase


@dataclass(frozen=True)
class Subject:
    lora: str
    filename: str
    phrase: str
    source: str  # "subjects box" | "activation text" | "trigger phrase" | "lora name"
    match: PhraseMatch


@dataclass
class SubjectPlan:
    subjects: list[Subject] = field(default_factory=list)
    global_loras: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    styles: list[LoraCandidate] = field(default_factory=list)  # LoRAs the user marked as a style

    @property
    def active(self) -> bool:
        """Two subjects, or one subject and a style (fused over the whole image)."""
        return len(self.subjects) >= 2 or (len(self.subjects) == 1 and bool(self.styles))


def parse_style_names(text: str) -> list[str]:
    """The LoRA names of the Style LoRAs box: comma- or line-separated, in order, once each."""
    return list(dict.fromkeys(n.strip() for n in text.replace("\n", ",").split(",") if n.strip()))


def parse_subject_lines(text: str) -> tuple[dict[str, str], list[str]]:
    """``lora name: trigger phrase`` lines -> {name: phrase}, plus one message per unusable line."""
    mapping: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, phrase = line.partition(":")
        name, phrase = name.strip(), phrase.strip()
        if not sep or not name or not phrase:
            problems.append(f"Subjects line {number} ({line!r}) is not 'lora name: trigger phrase'; ignored")
            continue
        if name in mapping:
            problems.append(f"Subjects line {number} names {name!r} again; the first line wins")
            continue
        mapping[name] = phrase
    return mapping, problems


def _phrase_options(candidate: LoraCandidate, explicit: dict[str, str]) -> list[tuple[str, str]]:
    """(phrase, source) in the order they are tried; the name only while the Subjects box names no LoRA."""
    if candidate.name in explicit:
        return [(explicit[candidate.name], "subjects box")]
    options: list[tuple[str, str]] = []
    activation = candidate.activation_text.strip()
    if activation:
        options.append((activation, "activation text"))
        parts = [p.strip() for p in activation.split(",") if p.strip()]
        if len(parts) > 1:
            options += [(p, "activation text") for p in parts]
    if candidate.trigger_phrase.strip():
        options.append((candidate.trigger_phrase.strip(), "trigger phrase"))
    if not explicit:
        options.append((candidate.name, "lora name"))
    return options


def resolve_subjects(
    candidates: Sequence[LoraCandidate],
    subjects_text: str,
    locate: Callable[[str], PhraseMatch],
    unusable: dict[str, str] | None = None,
    styles: Sequence[str] = (),
) -> SubjectPlan:
    """Decide the subjects. ``locate(phrase)`` finds a phrase in the tokenised prompt; ``unusable`` maps a
    LoRA filename to why it cannot be a subject on this model (it then stays as Forge runs it). ``styles``: LoRA
    names the user marked as a style; they are never subjects."""
    unusable = unusable or {}
    plan = SubjectPlan()
    explicit, problems = parse_subject_lines(subjects_text)
    plan.messages += problems
    names = {c.name for c in candidates}
    for name in explicit:
        if name not in names:
            plan.messages.append(f"Subjects box names {name!r}, but the prompt has no <lora:{name}:...>; ignored")
    for name in styles:
        if name not in names:
            plan.messages.append(f"style LoRA {name!r} is not in the prompt (no <lora:{name}:...>); ignored")
        elif name in explicit:
            plan.messages.append(f"LoRA {name!r} is marked as a style and named in the Subjects box; it is a style")
    candidates = _take_styles(candidates, styles, unusable, plan)

    seen: set[str] = set()
    for candidate in candidates:
        if candidate.filename in seen:
            continue
        seen.add(candidate.filename)
        if candidate.filename in unusable:
            plan.global_loras.append(candidate.name)
            plan.messages.append(
                f"LoRA {candidate.name!r} is not a subject: {unusable[candidate.filename]}; it runs as Forge runs it"
            )
            continue
        chosen = None
        tried = []
        for phrase, source in _phrase_options(candidate, explicit):
            try:
                match = locate(phrase)
            except ValueError:
                continue
            tried.append(phrase)
            if match.found:
                chosen = Subject(candidate.name, candidate.filename, phrase, source, match)
                break
        if chosen is None:
            plan.global_loras.append(candidate.name)
            plan.messages.append(
                f"LoRA {candidate.name!r} stays global: none of its trigger phrases is in the prompt "
                f"(tried {', '.join(repr(t) for t in tried)})"
            )
            continue
        plan.subjects.append(chosen)

    dropped: set[int] = set()
    for i, j in overlapping_subjects([s.match for s in plan.subjects]):
        if i in dropped or j in dropped:
            continue
        dropped.add(j)
        later, earlier = plan.subjects[j], plan.subjects[i]
        plan.messages.append(
            f"LoRA {later.lora!r} stays global: its phrase {later.phrase!r} shares tokens with "
            f"{earlier.lora!r}'s phrase {earlier.phrase!r}"
        )
        plan.global_loras.append(later.lora)
    plan.subjects = [s for k, s in enumerate(plan.subjects) if k not in dropped]

    by_name = [s.lora for s in plan.subjects if s.source == "lora name"]
    if by_name and len(plan.subjects) > 2:  # a style LoRA among the characters, perhaps
        plan.messages.append(
            f"{', '.join(repr(n) for n in by_name)} {'is a subject' if len(by_name) == 1 else 'are subjects'} "
            "because the LoRA's name is a word of the prompt; to keep a LoRA global (a style, say), name the "
            "subjects in the Subjects box ('lora: trigger phrase' lines)"
        )
    if not plan.active:
        found = len(plan.subjects)
        if plan.styles:
            plan.messages.append(
                "style fusion needs a subject LoRA whose trigger phrase is in the prompt; found none, so FreeFuse "
                "does not run for this image (the style LoRA runs as Forge runs it)"
            )
        else:
            plan.messages.append(
                f"needs at least two subject LoRAs whose trigger phrases are in the prompt (or one and a style "
                f"LoRA); found {found}, so FreeFuse does not run for this image"
            )
    return plan


def _take_styles(candidates, styles: Sequence[str], unusable: dict[str, str], plan: SubjectPlan) -> list:
    """Move the LoRAs marked as a style out of the candidates into ``plan.styles`` (once per file)."""
    rest, seen = [], set()
    for candidate in candidates:
        if candidate.name not in styles:
            rest.append(candidate)
            continue
        if candidate.filename in seen:
            continue
        seen.add(candidate.filename)
        if candidate.filename in unusable:
            plan.messages.append(
                f"style LoRA {candidate.name!r} cannot be fused: {unusable[candidate.filename]}; it runs as Forge "
                "runs it"
            )
            continue
        plan.styles.append(candidate)
    return rest
