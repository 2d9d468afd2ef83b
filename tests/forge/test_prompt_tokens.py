"""FreeFuse's trigger-token positions on Forge's own tokenisation (real engines, bundled tokenizers).

Forge's T5TextProcessingEngine (FLUX) and ClassicTextProcessingEngine (SDXL CLIP-L / CLIP-G) tokenise the
prompts; the tokenizers are the ones bundled in the Forge checkout, loaded from disk with the classes named in
the bundled model_index.json files. Expected positions are derived here from the engines' own chunk tokens
(searching for the phrase's own token ids), never from FreeFuse.

Stubbed, because `tokenize_line` does not need them but the engine modules or constructors touch them:
``modules.shared.opts`` (only ``opts.emphasis = "Original"``, Forge's default; the webui's modules.shared
cannot be imported without the whole webui) and the text encoder (the constructors read
``text_encoder.transformer`` and, for CLIP, wrap ``...text_model.embeddings.token_embedding``).
"""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from freefuse.forge import subjects as forge_subjects
from freefuse.settings import FreeFuseSettings
from freefuse.subjects import LoraCandidate
from freefuse.tokens import locate_phrase

FLUX_REPO = "backend/huggingface/black-forest-labs/FLUX.1-dev"
SDXL_REPO = "backend/huggingface/stabilityai/stable-diffusion-xl-base-1.0"
CLIP_CHUNK = 77  # [BOS, 75 text tokens, EOS]


# ---------------------------------------------------------------------- Forge's engines, built offline
def _load_tokenizer(root, repo: str, component: str):
    """The tokenizer class named in the repo's model_index.json, from the bundled folder (as backend/loader.py)."""
    import importlib
    import json

    index = json.loads((root / repo / "model_index.json").read_text())
    lib_name, cls_name = index[component]
    cls = getattr(importlib.import_module(lib_name), cls_name)
    tokenizer = cls.from_pretrained(str(root / repo / component), local_files_only=True)
    tokenizer._eventual_warn_about_too_long_sequence = lambda *args, **kwargs: None  # as backend/loader.py
    return tokenizer


def _import_engines():
    """Import Forge's engine modules with a stand-in ``modules.shared`` in sys.modules for the import only."""
    opts = SimpleNamespace(emphasis="Original")
    shared = types.ModuleType("modules.shared")
    shared.opts = opts
    package = types.ModuleType("modules")
    package.__path__ = []
    package.shared = shared
    saved = {name: sys.modules.get(name) for name in ("modules", "modules.shared")}
    sys.modules.update({"modules": package, "modules.shared": shared})
    try:
        from backend.text_processing import classic_engine, t5_engine
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return t5_engine, classic_engine, opts


def _clip_encoder_stub():
    """What ClassicTextProcessingEngine.__init__ touches of a text encoder: the token embedding it wraps."""
    embeddings = SimpleNamespace(token_embedding=torch.nn.Embedding(1, 1))
    return SimpleNamespace(transformer=SimpleNamespace(text_model=SimpleNamespace(embeddings=embeddings)))


@pytest.fixture(scope="module")
def engines(harness):
    """Forge's T5, CLIP-L and CLIP-G engines (constructed as diffusion_engine/flux.py and sdxl.py do)."""
    root = harness.forge.root
    t5_engine, classic_engine, opts = _import_engines()
    saved = (t5_engine.opts, classic_engine.opts)
    t5_engine.opts = classic_engine.opts = opts  # in case the modules were imported before, with other opts
    try:
        t5 = t5_engine.T5TextProcessingEngine(
            SimpleNamespace(transformer=None), _load_tokenizer(root, FLUX_REPO, "tokenizer_2"), min_length=256
        )
        clip_l = classic_engine.ClassicTextProcessingEngine(
            _clip_encoder_stub(), _load_tokenizer(root, SDXL_REPO, "tokenizer"), embedding_key="clip_l"
        )
        clip_g = classic_engine.ClassicTextProcessingEngine(
            _clip_encoder_stub(), _load_tokenizer(root, SDXL_REPO, "tokenizer_2"), embedding_key="clip_g"
        )
    finally:
        t5_engine.opts, classic_engine.opts = saved
    assert type(t5.tokenizer).__name__ == "T5TokenizerFast"
    assert type(clip_l.tokenizer).__name__ == type(clip_g.tokenizer).__name__ == "CLIPTokenizer"
    assert t5.emphasis.name == clip_l.emphasis.name == "Original"
    sd_model = SimpleNamespace(
        text_processing_engine_t5=t5, text_processing_engine_l=clip_l, text_processing_engine_g=clip_g
    )
    return SimpleNamespace(t5=t5, clip_l=clip_l, clip_g=clip_g, sd_model=sd_model)


# ---------------------------------------------------------------------- independent expectations
def _find_all(sequence: list[int], sub: list[int]) -> list[int]:
    """Start indices of every occurrence of ``sub`` as a contiguous run in ``sequence``."""
    n = len(sub)
    return [i for i in range(len(sequence) - n + 1) if sequence[i : i + n] == sub]


def _phrase_ids(engine, phrase: str) -> list[int]:
    return engine.tokenizer(phrase, add_special_tokens=False)["input_ids"]


def _t5_ids(engine, prompt: str) -> tuple[list[int], list[float]]:
    chunks, _ = engine.tokenize_line(prompt)
    assert len(chunks) == 1
    return list(chunks[0].tokens), list(chunks[0].multipliers)


def _clip_rows(engine, prompt: str) -> tuple[list[int], list[float]]:
    """Every chunk's 77 ids (and multipliers) laid end to end: index = the crossattn row."""
    chunks, _ = engine.tokenize_line(prompt)
    ids, mults = [], []
    for chunk in chunks:
        assert len(chunk.tokens) == CLIP_CHUNK and chunk.tokens[0] == engine.id_start
        ids += chunk.tokens
        mults += chunk.multipliers
    return ids, mults


def _pieces_at(engine, ids: list[int], positions) -> list[str]:
    return engine.tokenizer.convert_ids_to_tokens([ids[p] for p in positions])


def _t5_match(engines, prompt: str, phrase: str):
    tokens = forge_subjects.t5_tokens(engines.sd_model, prompt)
    return locate_phrase(tokens.pieces, phrase, sequence_positions=tokens.positions)


def _clip_match(sd_model, prompt: str, phrase: str):
    tokens = forge_subjects.clip_tokens(sd_model, prompt)
    return locate_phrase(tokens.pieces, phrase, sequence_positions=tokens.positions)


# ---------------------------------------------------------------------- T5 (FLUX): position i = token i
def test_t5_trigger_phrase_sits_at_its_own_token_indices(engines):
    t5 = engines.t5
    prompt = "a photo of harry_potter hugging daiyu_lin on a beach"
    ids, _ = _t5_ids(t5, prompt)
    for phrase, kept in (("harry_potter", ["har", "ry", "pot", "ter"]), ("on a beach", ["▁beach"])):
        (start,) = _find_all(ids, _phrase_ids(t5, phrase))
        span = list(range(start, start + len(_phrase_ids(t5, phrase))))
        while _pieces_at(t5, ids, span[:1]) == ["▁"]:  # a bare word-start marker before the phrase's text
            span = span[1:]
        match = _t5_match(engines, prompt, phrase)
        assert match.occurrences == 1
        assert list(match.matched_positions) == span
        assert _pieces_at(t5, ids, match.positions) == kept  # '_', stopwords and 1-char pieces filtered


def test_t5_emphasis_syntax_does_not_break_matching(engines):
    t5 = engines.t5
    plain = "a photo of harry_potter and daiyu_lin hugging"
    emphasised = "a photo of (harry_potter:1.2) and [daiyu_lin] hugging"
    ids, mults = _t5_ids(t5, emphasised)
    assert ids == _t5_ids(t5, plain)[0]  # the syntax characters are gone, nothing else moves
    potter = _t5_match(engines, emphasised, "harry_potter")
    lin = _t5_match(engines, emphasised, "daiyu_lin")
    assert potter == _t5_match(engines, plain, "harry_potter") and potter.found
    assert lin == _t5_match(engines, plain, "daiyu_lin") and lin.found
    assert {mults[p] for p in potter.matched_positions} == {1.2}
    assert [mults[p] for p in lin.matched_positions] == pytest.approx([1 / 1.1] * len(lin.matched_positions))
    text = "".join(_pieces_at(t5, ids, lin.matched_positions)).replace("▁", "")
    assert text == "daiyu_lin"
    assert set(lin.positions) <= set(lin.matched_positions)


def test_t5_eos_position_equals_the_content_length(engines):
    t5 = engines.t5
    cases = [  # (prompt, the same text without emphasis syntax)
        ("ohwx man", "ohwx man"),
        ("a photo of (harry_potter:1.2) and [daiyu_lin] hugging", "a photo of harry_potter and daiyu_lin hugging"),
        ("photo " * 300, "photo " * 300),
    ]
    for prompt, plain in cases:
        ids, _ = _t5_ids(t5, prompt)
        n_content = len(t5.tokenize([plain])[0])
        tokens = forge_subjects.t5_tokens(engines.sd_model, prompt)
        assert tokens.eos_position == n_content == ids.index(t5.id_end) == len(tokens.pieces)
        assert tokens.pieces == t5.tokenizer.convert_ids_to_tokens(ids[:n_content])
        assert tokens.n_txt == len(ids) == max(256, n_content + 1)
        assert tokens.positions is None  # piece i is text position i
    assert forge_subjects.t5_tokens(engines.sd_model, "photo " * 300).n_txt == 301


def test_t5_a_literal_end_of_text_token_in_the_prompt_does_not_cut_it_off(engines):
    prompt = "a photo </s> of ohwx man"
    ids, _ = _t5_ids(engines.t5, prompt)
    assert ids.count(engines.t5.id_end) == 2  # the literal one and the one Forge appends
    tokens = forge_subjects.t5_tokens(engines.sd_model, prompt)
    appended_eos = max(i for i, token in enumerate(ids) if token == engines.t5.id_end)
    assert tokens.eos_position == appended_eos == len(tokens.pieces)
    assert _t5_match(engines, prompt, "ohwx man").found


def test_t5_man_is_not_found_inside_woman_and_absent_phrases_are_not_found(engines):
    t5 = engines.t5
    prompt = "a woman and a man"
    ids, _ = _t5_ids(t5, prompt)
    man = _t5_match(engines, prompt, "man")
    assert man.occurrences == 1 and _pieces_at(t5, ids, man.positions) == ["▁man"]
    assert man.positions == tuple(_find_all(ids, _phrase_ids(t5, "man")[-1:]))
    assert not _t5_match(engines, "a woman on a beach", "man").found
    absent = _t5_match(engines, prompt, "ohwx dog")
    assert not absent.found and absent.positions == () and absent.matched_positions == ()


def test_t5_resolve_picks_the_subjects_whose_phrases_are_in_the_prompt(engines):
    prompt = "(harry_potter:1.2) and [daiyu_lin] hugging on a beach"
    tokens = forge_subjects.t5_tokens(engines.sd_model, prompt)
    settings = FreeFuseSettings.defaults("flux").replace(enabled=True, subjects="hp: harry_potter")
    candidates = [
        LoraCandidate("hp", "hp.safetensors"),
        LoraCandidate("dl", "dl.safetensors", activation_text="daiyu_lin"),
        LoraCandidate("style", "style.safetensors", activation_text="watercolor"),
    ]
    plan = forge_subjects.resolve(settings, tokens, candidates, {})
    assert [(s.lora, s.phrase, s.source) for s in plan.subjects] == [
        ("hp", "harry_potter", "subjects box"),
        ("dl", "daiyu_lin", "activation text"),
    ]
    assert plan.active and plan.global_loras == ["style"]
    ids, _ = _t5_ids(engines.t5, prompt)
    assert _pieces_at(engines.t5, ids, plan.subjects[0].match.positions) == ["har", "ry", "pot", "ter"]
    assert plan.subjects[1].match == _t5_match(engines, prompt, "daiyu_lin")


# ---------------------------------------------------------------------- CLIP (SDXL): chunk*77 + 1 + j
def test_clip_trigger_phrase_sits_at_chunk_row_positions_with_emphasis(engines):
    clip = engines.clip_l
    prompt = "(harry_potter:1.2) and [daiyu_lin] hugging, ohwx man"
    ids, mults = _clip_rows(clip, prompt)
    assert ids == _clip_rows(clip, "harry_potter and daiyu_lin hugging, ohwx man")[0]
    expected = {
        "harry_potter": ["harry</w>", "potter</w>"],
        "daiyu_lin": ["dai", "yu</w>", "lin</w>"],
        "ohwx man": ["ohwx</w>", "man</w>"],
    }
    for phrase, kept in expected.items():
        (start,) = _find_all(ids, _phrase_ids(clip, phrase))
        match = _clip_match(engines.sd_model, prompt, phrase)
        assert list(match.matched_positions) == list(range(start, start + len(_phrase_ids(clip, phrase))))
        assert start == 1 + ids[1:].index(_phrase_ids(clip, phrase)[0])  # chunk 0: row = 1 + text index
        assert _pieces_at(clip, ids, match.positions) == kept
    assert {mults[p] for p in _clip_match(engines.sd_model, prompt, "harry_potter").matched_positions} == {1.2}
    tokens = forge_subjects.clip_tokens(engines.sd_model, prompt)
    assert tokens.n_txt == CLIP_CHUNK and tokens.eos_position == ids.index(clip.id_end) == 1 + len(tokens.pieces)


def test_clip_break_starts_a_new_chunk_and_positions_follow_it(engines):
    clip = engines.clip_l
    prompt = "ohwx man on a beach BREAK a woman with (daiyu_lin:1.1)"
    ids, _ = _clip_rows(clip, prompt)
    assert len(ids) == 2 * CLIP_CHUNK
    second = ids[CLIP_CHUNK:]
    for phrase in ("woman", "daiyu_lin"):
        j = _find_all(second[1:], _phrase_ids(clip, phrase))[0]  # text index inside chunk 1
        match = _clip_match(engines.sd_model, prompt, phrase)
        assert match.matched_positions[0] == 1 * CLIP_CHUNK + 1 + j
    assert _clip_match(engines.sd_model, prompt, "ohwx man").positions == (1, 2)
    tokens = forge_subjects.clip_tokens(engines.sd_model, prompt)
    assert tokens.n_txt == 2 * CLIP_CHUNK
    assert tokens.eos_position == 1 + len(clip.tokenize(["ohwx man on a beach"])[0])  # chunk 0's first EOS


@pytest.mark.parametrize(
    "head",
    ["photo " * 74, "photo " * 10 + ", " + "photo " * 63],  # no comma / a comma far (> 20 tokens) from the end
    ids=["no-comma", "distant-comma"],
)
def test_clip_phrase_crossing_the_75_token_boundary_is_found_in_both_chunks(engines, head):
    clip = engines.clip_l
    prompt = head + "ohwx man"
    ids, _ = _clip_rows(clip, prompt)
    assert len(ids) == 2 * CLIP_CHUNK
    ohwx, man = _phrase_ids(clip, "ohwx man")
    assert ids[1 + 74] == ohwx and ids[1 + 75] == clip.id_end  # last text slot of chunk 0, then its EOS
    assert ids[CLIP_CHUNK] == clip.id_start and ids[CLIP_CHUNK + 1] == man  # first text slot of chunk 1
    match = _clip_match(engines.sd_model, prompt, "ohwx man")
    assert match.occurrences == 1
    assert match.positions == match.matched_positions == (0 * CLIP_CHUNK + 1 + 74, 1 * CLIP_CHUNK + 1 + 0)


def test_clip_comma_padding_moves_the_phrase_to_the_next_chunk_and_positions_follow(engines):
    clip = engines.clip_l
    prompt = "photo " * 73 + ", ohwx man and a cat"  # comma = text token 73; 'man' would be token 75
    ids, _ = _clip_rows(clip, prompt)
    comma = clip.comma_token
    assert ids[1 + 73] == comma and ids[1 + 74] == clip.id_end  # 'ohwx' moved: chunk 0 ends after the comma
    start = _find_all(ids, _phrase_ids(clip, "ohwx man"))
    assert start == [CLIP_CHUNK + 1]
    match = _clip_match(engines.sd_model, prompt, "ohwx man")
    assert match.positions == (CLIP_CHUNK + 1, CLIP_CHUNK + 2)
    assert forge_subjects.clip_tokens(engines.sd_model, prompt).eos_position == 1 + 74


@pytest.mark.parametrize(
    "prompt",
    [
        "(harry_potter:1.2) and [daiyu_lin] hugging, ohwx man",
        "ohwx man on a beach BREAK a woman with (daiyu_lin:1.1)",
        "photo " * 73 + ", ohwx man and a cat",
        "photo, " * 60 + "harry_potter",
        "",
    ],
    ids=["emphasis", "break", "comma-padding", "long", "empty"],
)
def test_clip_l_and_clip_g_give_identical_positions(engines, prompt):
    ids_l, _ = _clip_rows(engines.clip_l, prompt)
    ids_g, _ = _clip_rows(engines.clip_g, prompt)
    assert ids_l == ids_g  # same vocabulary, same chunking (G's pad id only enters later, in process_tokens)
    assert engines.clip_g.id_pad != engines.clip_l.id_pad
    with_g = SimpleNamespace(text_processing_engine_l=engines.clip_g)
    assert forge_subjects.clip_tokens(with_g, prompt) == forge_subjects.clip_tokens(engines.sd_model, prompt)
    for phrase in ("harry_potter", "ohwx man", "daiyu_lin"):
        assert _clip_match(with_g, prompt, phrase) == _clip_match(engines.sd_model, prompt, phrase)


def test_clip_man_is_not_found_inside_woman_and_absent_phrases_are_not_found(engines):
    clip = engines.clip_l
    prompt = "a woman and a man"
    ids, _ = _clip_rows(clip, prompt)
    man = _clip_match(engines.sd_model, prompt, "man")
    assert man.occurrences == 1 and man.positions == tuple(_find_all(ids, _phrase_ids(clip, "man")))
    assert _pieces_at(clip, ids, man.positions) == ["man</w>"]
    assert not _clip_match(engines.sd_model, "a woman on a beach", "man").found
    assert not _clip_match(engines.sd_model, prompt, "ohwx dog").found


def test_clip_resolve_uses_positions_across_a_break(engines):
    prompt = "ohwx man on a beach BREAK a woman with (daiyu_lin:1.1)"
    tokens = forge_subjects.clip_tokens(engines.sd_model, prompt)
    settings = FreeFuseSettings.defaults("sdxl").replace(enabled=True, subjects="m: ohwx man\nw: daiyu_lin")
    plan = forge_subjects.resolve(
        settings, tokens, [LoraCandidate("m", "m.safetensors"), LoraCandidate("w", "w.safetensors")], {}
    )
    assert plan.active and not plan.global_loras
    ids, _ = _clip_rows(engines.clip_l, prompt)
    m, w = (s.match for s in plan.subjects)
    assert _pieces_at(engines.clip_l, ids, m.positions) == ["ohwx</w>", "man</w>"]
    assert m.positions == (1, 2)
    assert all(p > CLIP_CHUNK for p in w.positions)
    assert _pieces_at(engines.clip_l, ids, w.positions) == ["dai", "yu</w>", "lin</w>"]
